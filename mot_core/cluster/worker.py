"""One Ray Train worker: the ``mot train`` loop (``trainer.run_loop``) with a data-parallel
runtime.

Checkpoint layout (one folder per checkpoint in Ray's storage, filled by every worker):
    .metadata, __<rank>_0.distcp   torch distributed checkpoint of {"model", "optim"}: sharded
                                    weights and AdamW moments, re-shardable to any worker count
    trainer.pt                      scheduler and data-stream position of every worker's lanes (rank 0)
    rng_rank<r>.pt                  each worker's RNG states
    files_rank<r>.json              each worker's files and sizes: a checkpoint is intact when
                                    every worker's listed files are there, whole
    meta.json, config.yaml          step, model args, worker count (rank 0)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mot_core.cluster import storage
from mot_core.config import validate_config
from mot_core.errors import MotError
from mot_core.launch import parallel
from mot_core.launch.device import uses_bf16
from mot_core.train import checkpoint as ckpt
from mot_core.train.experiment import build_experiment
from mot_core.train.runtime import Runtime, rng_state, set_rng_state
from mot_core.train.trainer import run_loop


def train_worker(loop_config: dict) -> None:
    """``train_loop_per_worker`` of the TorchTrainer. ``loop_config``: ``config`` (the validated
    run config as a dict), ``storage_path`` and ``name`` (where the run's checkpoints are)."""
    import ray.train
    import ray.train.torch

    # Relative paths in plugin options (data folders, tokenizer folders) mean what they meant
    # where `mot launch` was started: the same folder on every node of a shared file system.
    if not os.path.isdir(loop_config["cwd"]):
        raise MotError(f"the folder `mot launch` was started from, {loop_config['cwd']}, does not exist on this "
                       "worker's node; give absolute paths on a file system every node mounts")
    os.chdir(loop_config["cwd"])
    config = validate_config(loop_config["config"])
    context = ray.train.get_context()
    use_gpu = config.launch.gpus_per_worker > 0
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    exp = build_experiment(config)
    runtime = RayRuntime(device, context.get_world_rank(), context.get_world_size(), config.launch,
                         config.train.precision, loop_config["storage_path"], loop_config["name"], exp.run_dir)
    run_loop(config, exp, runtime)
    runtime.export(config.train.keep_checkpoints)


class RayRuntime(Runtime):
    """A worker of a data-parallel group: DDP or FSDP2, its rows of every global batch, sums
    over workers, and checkpoints reported to Ray Train."""

    def __init__(self, device: torch.device, rank: int, world: int, launch, precision: str,
                 storage_path: str, name: str, run_dir: Path):
        super().__init__(device)
        self.rank, self.world = rank, world
        self.strategy = launch.strategy
        self.reshard_after_forward = launch.reshard_after_forward
        self.bf16 = uses_bf16(device, precision)
        self.storage_path, self.name = storage_path, name
        self.run_dir = run_dir
        self.model: torch.nn.Module | None = None
        self.last: dict[str, Any] = {}
        self.shards_at_build = self.strategy == "fsdp2"

    def describe(self) -> str:
        backend = dist.get_backend() if dist.is_initialized() else "none"
        dtype = "bf16" if self.bf16 else "fp32"
        return f"{self.world} workers, {self.strategy}, {backend}, {dtype}, device: {self.device.type}"

    def wrap(self, model):
        self.model = model
        if self.strategy == "ddp":
            return parallel.apply_ddp(model)
        return parallel.apply_fsdp2(model, self.device.type, torch.bfloat16 if self.bf16 else None,
                                    self.reshard_after_forward)

    missing_data = "error"  # the driver tokenized everything before the workers started

    def lanes(self, batch_size: int) -> range:
        per = batch_size // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    def gather_stream_state(self, state: dict) -> dict:
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, state)
        return {**state, "lanes": {lane: s for part in gathered for lane, s in part["lanes"].items()}}

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def clip_grad_norm(self, parameters, max_norm: float) -> float:
        return parallel.clip_grad_norm(parameters, max_norm)

    # --- checkpoints -------------------------------------------------------------------
    def latest(self):
        """The newest intact checkpoint in storage. Not ``ray.train.get_checkpoint()``: Ray
        registers a reported checkpoint when its controller next polls the workers, so a worker
        killed in between leaves a complete checkpoint that Ray would not hand back."""
        import ray.train

        found = storage.intact_checkpoints(self.storage_path, self.name)
        return ray.train.Checkpoint(found[-1][1]) if found else None

    def saved_config(self, handle) -> str:
        with handle.as_directory() as folder:
            return (Path(folder) / "config.yaml").read_text()

    def load(self, handle, model, optimizer, args) -> tuple[dict, dict]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        with handle.as_directory() as folder:
            folder = Path(folder)
            meta = json.loads((folder / "meta.json").read_text())
            ckpt.check_compatible(meta["model_args"], args, Path(handle.path))
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=str(folder))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            trainer = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=False)
            own = folder / f"rng_rank{self.rank}.pt"
            # a relaunch on more workers than wrote the checkpoint: new workers take rank 0's
            set_rng_state(torch.load(own if own.is_file() else folder / "rng_rank0.pt", weights_only=False))
        return meta, trainer

    def save(self, step, model, optimizer, state, config_yaml, args, keep, record) -> str:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="mot-ckpt-") as folder:
            self.write_checkpoint(Path(folder), step, model, optimizer, state, config_yaml, args)
            ray.train.report(_metrics(record), checkpoint=ray.train.Checkpoint.from_directory(folder))
        return f"checkpoint of step {step} (reported to Ray Train)"

    def write_checkpoint(self, path: Path, step, model, optimizer, state, config_yaml, args,
                         shared: bool = False) -> None:
        """This worker's part of a checkpoint in ``path`` (a collective: every worker calls it).
        ``shared``: every worker writes into the same folder (not a folder of its own that Ray
        uploads), so the listings wait until all the files are written."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.last = {"step": step, "state": state, "config_yaml": config_yaml, "args": args, "optimizer": optimizer}
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
        torch.save(rng_state(), path / f"rng_rank{self.rank}.pt")
        if self.is_main:
            torch.save(state, path / "trainer.pt")
            (path / "config.yaml").write_text(config_yaml)
            meta = {"step": step, "model_args": _as_json(args), "workers": self.world, "strategy": self.strategy}
            (path / "meta.json").write_text(json.dumps(meta, indent=2))
        if shared:
            dist.barrier()
        # written last, after the other files: the checkpoint is intact once every worker's
        # listing is there and matches
        listing = {p.name: p.stat().st_size for p in path.iterdir() if not p.name.startswith("files_rank")}
        (path / f"files_rank{self.rank}.json").write_text(json.dumps(listing))

    def report(self, record: dict) -> None:
        import ray.train

        ray.train.report(_metrics(record))

    def export(self, keep: int) -> None:
        """Gather the final weights and optimizer state (a collective: every worker calls it)
        and write them on rank 0 as a ``mot train`` checkpoint in run.dir, which ``mot eval``,
        ``mot generate`` and ``mot train`` (to continue on one process) read."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        )

        if not self.last:
            return
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=options)
        optim_state = get_optimizer_state_dict(self.model, self.last["optimizer"], options=options)
        if self.is_main:
            trainer = {**self.last["state"], "optimizer_by_name": optim_state, "rng": rng_state()}
            saved = ckpt.save_checkpoint(self.run_dir, self.last["step"], weights, trainer, self.last["config_yaml"],
                                         self.last["args"], keep)
            print(f"exported {saved} (a mot train checkpoint: mot eval / mot generate / mot train read it)")


def _as_json(args: Any) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(args)))


def _metrics(record: dict) -> dict:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
