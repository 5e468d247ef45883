"""Sharded checkpoints of a data-parallel group, written by every worker together.

Layout (one folder per checkpoint):
    .metadata, __<rank>_0.distcp   torch distributed checkpoint of {"model", "optim"}: sharded
                                    weights and AdamW moments, re-shardable to any worker count
    trainer.pt                      scheduler and data-stream position of every worker's lanes (rank 0)
    rng_rank<r>.pt                  each worker's RNG states
    files_rank<r>.json              each worker's files and sizes: a checkpoint is intact when
                                    every worker's listed files are there, whole
    meta.json, config.yaml          step, model args, worker count (rank 0)

Two stores keep them: ``ShardedFolderCheckpoints`` (``mot train --process-group``: a folder of the
run, or a shared one) and Ray Train's storage (``mot_core.distributed.ray_train``). At the end
of a run, ``export_final`` writes the last state as a ``mot train`` checkpoint in the run folder,
which ``mot eval``, ``mot generate`` and ``mot train`` read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from mot_core.errors import MotError
from mot_core.training import checkpoint as ckpt
from mot_core.training import storage
from mot_core.training.runtime import CheckpointStore, Parallelism, rng_state, set_rng_state


@dataclasses.dataclass
class LastSaved:
    """What the newest checkpoint of this process held: the final export writes it again,
    gathered whole."""

    step: int
    state: dict
    config_yaml: str
    args: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


def write_sharded(path: Path, step: int, model, optimizer, state: dict, config_yaml: str, args,
                  parallel: Parallelism, shared: bool) -> None:
    """This worker's part of a checkpoint in ``path`` (a collective: every worker calls it).
    ``shared``: every worker writes into the same folder (not a folder of its own that Ray
    uploads), so the listings wait until all the files are written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
    torch.save(rng_state(), path / f"rng_rank{parallel.rank}.pt")
    if parallel.is_main:
        torch.save(state, path / "trainer.pt")
        (path / "config.yaml").write_text(config_yaml)
        meta = {"step": step, "model_args": json.loads(json.dumps(dataclasses.asdict(args))),
                "workers": parallel.world, "strategy": getattr(parallel, "strategy", None)}
        (path / "meta.json").write_text(json.dumps(meta, indent=2))
    if shared:
        parallel.barrier()
    # written last, after the other files: the checkpoint is intact once every worker's
    # listing is there and matches
    listing = {p.name: p.stat().st_size for p in path.iterdir() if not p.name.startswith("files_rank")}
    (path / f"files_rank{parallel.rank}.json").write_text(json.dumps(listing))


def load_sharded(folder: Path, model, optimizer, args, rank: int, where: Path) -> tuple[dict, dict]:
    """Restore weights, AdamW moments and this worker's RNG from a sharded checkpoint (any
    worker count wrote it); returns (meta, trainer state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = json.loads((folder / "meta.json").read_text())
    ckpt.check_compatible(meta["model_args"], args, where)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=False)
    own = folder / f"rng_rank{rank}.pt"
    # a relaunch on more workers than wrote the checkpoint: new workers take rank 0's
    set_rng_state(torch.load(own if own.is_file() else folder / "rng_rank0.pt", weights_only=False))
    return meta, trainer


def export_final(last: LastSaved | None, run_dir: Path, keep: int, parallel: Parallelism) -> None:
    """Gather the final weights and optimizer state (a collective: every worker calls it) and
    write them on rank 0 as a ``mot train`` checkpoint in ``run_dir``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    if last is None:
        return
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(last.model, options=options)
    optim_state = get_optimizer_state_dict(last.model, last.optimizer, options=options)
    if parallel.is_main:
        trainer = {**last.state, "optimizer_by_name": optim_state, "rng": rng_state()}
        saved = ckpt.save_checkpoint(run_dir, last.step, weights, trainer, last.config_yaml, last.args, keep)
        print(f"exported {saved} (a mot train checkpoint: mot eval / mot generate / mot train read it)")


class LocalFolder:
    """A checkpoint folder with the two members of ``ray.train.Checkpoint`` the stores use."""

    def __init__(self, path: str):
        self.path = path

    def __str__(self) -> str:
        return self.path

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class ShardedStore(CheckpointStore):
    """What both sharded stores share: reading a checkpoint, and the export at the end."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.last: LastSaved | None = None

    def saved_config(self, handle) -> str:
        with handle.as_directory() as folder:
            return (Path(folder) / "config.yaml").read_text()

    def load(self, handle, model, optimizer, args, parallel) -> tuple[dict, dict]:
        with handle.as_directory() as folder:
            return load_sharded(Path(folder), model, optimizer, args, parallel.rank, Path(handle.path))

    def remember(self, step, model, optimizer, state, config_yaml, args) -> None:
        self.last = LastSaved(step, state, config_yaml, args, model, optimizer)

    def finish(self, keep: int, parallel: Parallelism) -> None:
        export_final(self.last, self.run_dir, keep, parallel)

    def refuse_newer_local_checkpoints(self, found: list[tuple[int, str]], who: str) -> None:
        """``mot train`` continued the run past this store's newest checkpoint (or trained it
        alone): resuming (or starting) here would lose those steps."""
        local = ckpt.latest_intact(self.run_dir, report=lambda line: None)
        if local is None or (found and ckpt.step_of(local) <= found[-1][0]):
            return
        mine = f"none of {who}" if not found else f"{who}'s newest is step {found[-1][0]}"
        raise MotError(f"{self.run_dir} holds a `mot train` checkpoint of step {ckpt.step_of(local)} and {mine}: "
                       f"starting here would lose those steps; continue it with `mot train`, warm-start from it "
                       "(model.warm_start), or use a new run.dir")


class ShardedFolderCheckpoints(ShardedStore):
    """``mot train --process-group``: ``<run.dir>/distributed_checkpoints/checkpoint_<step>``."""

    FOLDER = "distributed_checkpoints"

    def latest(self, report: Callable[[str], None] = print):
        found = storage.intact_checkpoints(str(self.run_dir), self.FOLDER)
        self.refuse_newer_local_checkpoints(found, "`mot train --process-group`")
        return LocalFolder(found[-1][1]) if found else None

    def save(self, step, model, optimizer, state, config_yaml, args, keep, record, parallel) -> str:
        self.remember(step, model, optimizer, state, config_yaml, args)
        root = self.run_dir / self.FOLDER
        final = root / f"checkpoint_{step:07d}"
        staging = root / f".checkpoint_{step:07d}.partial"
        if parallel.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        parallel.barrier()
        write_sharded(staging, step, model, optimizer, state, config_yaml, args, parallel, shared=True)
        parallel.barrier()
        if parallel.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            for _, old in storage.intact_checkpoints(str(self.run_dir), self.FOLDER)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        parallel.barrier()
        return str(final)
