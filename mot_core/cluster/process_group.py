"""``mot train --process-group fsdp2|ddp``: the training loop of ``mot launch``'s workers, DDP
or FSDP2 with the same runtime (``worker.RayRuntime``), in a ``torch.distributed`` process
group that is not Ray's: the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), or a group of one process when started alone (one GPU:
FSDP2 over NCCL with world size 1, as the GPU check runs it).

Checkpoints: ``<run.dir>/distributed_checkpoints/checkpoint_<step>`` in the layout of
``mot launch``'s (sharded weights and AdamW moments, re-shardable to any process count); a
restart resumes from the newest intact one. At the end, rank 0 exports the final weights as a
``mot train`` checkpoint in ``<run.dir>/checkpoints`` (``mot eval`` / ``mot generate`` read it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from mot_core.cluster import storage
from mot_core.cluster.worker import RayRuntime
from mot_core.config import RunConfig
from mot_core.errors import MotError
from mot_core.launch.device import resolve_device
from mot_core.train import checkpoint as ckpt
from mot_core.train.experiment import build_experiment
from mot_core.train.pretrained import resolve_init_from
from mot_core.train.tokenize import open_data, prepare_vocabulary
from mot_core.train.trainer import run_loop

CHECKPOINTS = "distributed_checkpoints"


class _Folder:
    """A local checkpoint folder with the two members of ``ray.train.Checkpoint`` that
    ``RayRuntime.load`` and ``saved_config`` use."""

    def __init__(self, path: str):
        self.path = path

    def __str__(self) -> str:
        return self.path

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class ProcessGroupRuntime(RayRuntime):
    """``RayRuntime`` with checkpoints in a local (or shared) folder instead of Ray's storage."""

    def latest(self):
        found = storage.intact_checkpoints(str(self.run_dir), CHECKPOINTS)
        return _Folder(found[-1][1]) if found else None

    def save(self, step, model, optimizer, state, config_yaml, args, keep, record) -> str:
        root = self.run_dir / CHECKPOINTS
        final = root / f"checkpoint_{step:07d}"
        staging = root / f".checkpoint_{step:07d}.partial"
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        self.write_checkpoint(staging, step, model, optimizer, state, config_yaml, args, shared=True)
        dist.barrier()
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            for _, old in storage.intact_checkpoints(str(self.run_dir), CHECKPOINTS)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return str(final)

    def report(self, record: dict) -> None:
        pass


def train_in_process_group(config: RunConfig, strategy: str) -> None:
    """Join (or, alone, create) the process group and run the training loop in it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(config.run.device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise MotError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    config = resolve_init_from(config)
    config = config.model_copy(update={"launch": config.launch.model_copy(update={"strategy": strategy})})
    if config.train.batch_size % world:
        raise MotError(f"train.batch_size={config.train.batch_size} is not divisible by {world} processes")
    exp = build_experiment(config)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None)
    lock = ckpt.RunLock(exp.run_dir) if rank == 0 else None
    try:
        if rank == 0:  # tokenizers fitted and sources tokenized once, before the others read them
            open_data(exp, prepare_vocabulary(exp))
        dist.barrier()
        run_dir = exp.run_dir.resolve()  # storage paths are URIs: a relative run.dir is not one
        runtime = ProcessGroupRuntime(device, rank, world, config.launch, config.train.precision,
                                      str(run_dir), CHECKPOINTS, run_dir)
        run_loop(config, exp, runtime)
        runtime.export(config.train.keep_checkpoints)
    finally:
        dist.destroy_process_group()
        if lock is not None:
            lock.release()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
