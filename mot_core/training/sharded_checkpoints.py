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
of a run, ``export_final`` writes the newest of them (the last step's: the loop saves it) as a
``mot train`` checkpoint in the run folder, which ``mot eval``, ``mot generate`` and ``mot train``
read. It reads the checkpoint's files, not the model: one stored block of a tensor at a time,
written into the safetensors files as it is read, so no process gathers the model or the AdamW
state. It runs where the run folder is: rank 0 of a process group, or ``mot launch``'s driver.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from mot_core.devices.host import give_back_freed_memory
from mot_core.errors import MotError
from mot_core.plotting import run_loss_curves
from mot_core.training import checkpoint as ckpt
from mot_core.training import run_files
from mot_core.training import storage
from mot_core.training.runtime import CheckpointStore, Parallelism, rng_state, set_rng_state
from mot_core.training.trackers import read_records


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


class _FileSlice(io.RawIOBase):
    """``length`` bytes of an open file from ``offset`` on, as a file of their own (what
    ``torch.load`` reads a stored item from, straight into the tensor it allocates)."""

    def __init__(self, handle, offset: int, length: int):
        super().__init__()
        self.handle, self.offset, self.length, self.position = handle, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.length}[whence]
        self.position = min(max(0, base + offset), self.length)
        return self.position

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")[: self.length - self.position]
        self.handle.seek(self.offset + self.position)
        count = self.handle.readinto(view)
        self.position += count
        return count


class DistributedCheckpoint:
    """A torch distributed checkpoint folder read without a process group, one stored block
    (one worker's shard of one tensor) at a time, from the layout its ``.metadata`` records:
    every entry's dtype, shape, blocks and their byte ranges in the ``.distcp`` files."""

    def __init__(self, folder: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.folder = folder
        try:
            self.metadata = FileSystemReader(str(folder)).read_metadata()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as exc:
            raise MotError(f"cannot read the distributed checkpoint {folder}: {str(exc).splitlines()[0]}") from None
        # each flattened key's path in the nested state dict that was saved ({"model": .., "optim": ..})
        self.paths: dict[str, tuple] = dict(self.metadata.planner_data or {})
        if not self.paths:
            raise MotError(f"the distributed checkpoint {folder} records no state-dict paths (not written by mot)")

    def is_tensor(self, key: str) -> bool:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return isinstance(self.metadata.state_dict_metadata[key], TensorStorageMetadata)

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self.metadata.state_dict_metadata[key]
        return entry.properties.dtype, tuple(entry.size)

    def read_blocks(self, key: str, use: Callable[[torch.Tensor, tuple[int, ...]], None]) -> None:
        """Read the stored blocks of tensor ``key`` one at a time and hand each, with its offsets
        in the tensor, to ``use``. A block is freed, and a large one's memory given back to
        the OS, before the next is read."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        for chunk in self.metadata.state_dict_metadata[key].chunks:
            if 0 in chunk.sizes:
                continue
            block = self._load(MetadataIndex(key, chunk.offsets), weights_only=True)
            if not isinstance(block, torch.Tensor) or tuple(block.shape) != tuple(chunk.sizes):
                raise MotError(f"the distributed checkpoint {self.folder} is damaged: a block of {key} is not the "
                               f"{list(chunk.sizes)} its metadata records")
            use(block, tuple(chunk.offsets))
            large = block.nbytes >= 1 << 20
            del block
            if large:
                give_back_freed_memory()

    def value(self, key: str) -> Any:
        """A small entry whole: a step count, a param group's setting."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if not self.is_tensor(key):
            return self._load(MetadataIndex(key), weights_only=False)
        dtype, shape = self.spec(key)
        whole = torch.empty(shape, dtype=dtype)

        def put(block: torch.Tensor, offsets: tuple[int, ...]) -> None:
            whole[tuple(slice(o, o + n) for o, n in zip(offsets, block.shape))] = block

        self.read_blocks(key, put)
        return whole

    def _load(self, index, weights_only: bool) -> Any:
        info = self.metadata.storage_data[index]
        if getattr(info, "transform_descriptors", None):
            raise MotError(f"the distributed checkpoint {self.folder} stores {index.fqn} transformed "
                           f"({', '.join(info.transform_descriptors)}), which the export does not read")
        try:
            with open(self.folder / info.relative_path, "rb", buffering=0) as handle:
                return torch.load(_FileSlice(handle, info.offset, info.length), map_location="cpu",
                                  weights_only=weights_only)
        except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
            raise MotError(f"cannot read {index.fqn} from the distributed checkpoint {self.folder}: "
                           f"{str(exc).splitlines()[0]}") from None


def _put(root: dict, path: tuple, value: Any) -> None:
    """Set ``value`` at ``path`` in nested dicts and lists (an int is a list index), creating them."""
    node: Any = root
    for key, after in zip(path[:-1], path[1:]):
        fresh = [] if isinstance(after, int) else {}
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            node[key] = fresh if node[key] is None else node[key]
            node = node[key]
        else:
            node = node.setdefault(key, fresh)
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value


def export_final(folder: Path, run_dir: Path, keep: int) -> Path:
    """Write the sharded checkpoint in ``folder`` as a ``mot train`` checkpoint in ``run_dir``
    (``checkpoint.save_streamed_checkpoint``): the weights into ``model.safetensors`` and the
    AdamW moments into ``optimizer.safetensors``, one stored block at a time, so this process
    holds at most one tensor's block beyond what it held before; the step counts and param
    groups, the scheduler, the data position and rank 0's RNG into ``trainer.pt``. Needs no
    process group and no model. Returns the checkpoint's folder."""
    meta = json.loads((folder / "meta.json").read_text())
    checkpoint = DistributedCheckpoint(folder)
    weights: dict[str, str] = {}  # parameter -> key
    moments: dict[str, str] = {}  # "<parameter>.<moment>" -> key
    rest: dict = {}  # the optimizer state without its moments, nested as get_optimizer_state_dict's
    for key, path in checkpoint.paths.items():
        if path[0] == "model":
            if not checkpoint.is_tensor(key) or len(path) != 2:
                raise MotError(f"cannot export {key} of {folder}: the model state holds something else than a tensor")
            weights[path[1]] = key
        elif path[0] == "optim":
            if path[1] == "state" and len(path) == 4 and path[3] != "step" and checkpoint.is_tensor(key):
                moments[f"{path[2]}.{path[3]}"] = key
            else:
                _put(rest, path[1:], checkpoint.value(key))

    def source(keys: dict[str, str]) -> ckpt.StreamedTensors:
        def fill(writer: ckpt.StreamedSafetensors) -> None:
            for name in writer.names:
                checkpoint.read_blocks(keys[name], lambda block, offsets, name=name: writer.write(name, block, offsets))

        return ckpt.StreamedTensors({name: checkpoint.spec(key) for name, key in keys.items()}, fill)

    trainer = {**torch.load(folder / "trainer.pt", map_location="cpu", weights_only=False),
               "optimizer_by_name": rest, "rng": torch.load(folder / "rng_rank0.pt", weights_only=False)}
    saved = ckpt.save_streamed_checkpoint(run_dir, int(meta["step"]), source(weights), source(moments), trainer,
                                          (folder / "config.yaml").read_text(), meta["model_args"], keep)
    print(f"exported {saved} (a mot train checkpoint: mot eval / mot generate / mot train read it)")
    return saved


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
    """What both sharded stores share: reading a checkpoint, and the export at the end.
    ``carries_run_files``: rank 0 keeps the run's files (metrics, trackers) in a folder of its
    own node, so each checkpoint carries a copy (``run_files``)."""

    def __init__(self, run_dir: Path, carries_run_files: bool = False):
        self.run_dir = run_dir
        self.carries_run_files = carries_run_files

    @abc.abstractmethod
    def intact(self) -> list[tuple[int, str]]:
        """(step, where) of every intact checkpoint, oldest first."""

    @abc.abstractmethod
    def handle(self, where: str):
        """The checkpoint at ``where`` (from ``intact``), with ``as_directory``."""

    def saved_config(self, handle) -> str:
        with handle.as_directory() as folder:
            return (Path(folder) / "config.yaml").read_text()

    def load(self, handle, model, optimizer, args, parallel) -> tuple[dict, dict]:
        with handle.as_directory() as folder:
            loaded = load_sharded(Path(folder), model, optimizer, args, parallel.rank, Path(handle.path))
            if self.carries_run_files and parallel.is_main:  # the metrics so far, before the loop appends
                run_files.restore(Path(folder), self.run_dir)
            return loaded

    def export(self, keep: int) -> Path | None:
        """Export the newest intact checkpoint (``export_final``) unless the run folder holds a
        ``mot train`` checkpoint of its step already (a run resumed at its end trains no step);
        returns the export, or None."""
        found = self.intact()
        if not found or (ckpt.checkpoint_dir(self.run_dir, found[-1][0]) / "meta.json").is_file():
            return None
        with self.handle(found[-1][1]).as_directory() as folder:  # a download from an object store
            exported = export_final(Path(folder), self.run_dir, keep)
            if run_files.restore(Path(folder), self.run_dir):  # rank 0 trained on a node without this folder
                run_loss_curves(read_records(self.run_dir / "metrics.jsonl"), self.run_dir / "loss_curves.png",
                                self.run_dir.name)
                print(f"wrote the run's metrics and tracker files, carried in its checkpoints, into {self.run_dir}")
            return exported

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

    def intact(self) -> list[tuple[int, str]]:
        return storage.intact_checkpoints(str(self.run_dir), self.FOLDER)

    def handle(self, where: str) -> LocalFolder:
        return LocalFolder(where)

    def latest(self, report: Callable[[str], None] = print):
        found = self.intact()
        self.refuse_newer_local_checkpoints(found, "`mot train --process-group`")
        return LocalFolder(found[-1][1]) if found else None

    def finish(self, keep: int, parallel: Parallelism) -> None:
        """Rank 0 exports the last checkpoint (``save`` ended with a barrier: every worker's
        files of it are written); the other ranks have nothing left to do."""
        if parallel.is_main:
            self.export(keep)

    def save(self, step, model, optimizer, state, config_yaml, args, keep, record, parallel) -> str:
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
