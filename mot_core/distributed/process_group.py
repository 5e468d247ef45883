"""``mot train --process-group fsdp2|ddp``: the training loop of ``mot launch``'s workers, DDP
or FSDP2, in a ``torch.distributed`` process group that is not Ray's: the environment
``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), or a group of one
process when started alone (one GPU: FSDP2 over NCCL with world size 1, as the GPU check runs it).

Checkpoints: ``<run.dir>/distributed_checkpoints/checkpoint_<step>`` in the layout of
``mot launch``'s (sharded weights and AdamW moments, re-shardable to any process count); a
restart resumes from the newest intact one. At the end, rank 0 exports the final weights as a
``mot train`` checkpoint in ``<run.dir>/checkpoints`` (``mot eval`` / ``mot generate`` read it).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from mot_core import filesystems
from mot_core.config import RunConfig
from mot_core.devices.device import resolve_device, uses_bf16
from mot_core.errors import MotError
from mot_core.experiment.resolve import Source, resolve_config
from mot_core.runs.start import start_run
from mot_core.training.parallelism import DataParallel
from mot_core.training.runtime import PREPARE, WAIT_FOR_RANK_0, Runtime
from mot_core.training.sharded_checkpoints import ShardedFolderCheckpoints


def folder_store(config: RunConfig) -> ShardedFolderCheckpoints:
    if filesystems.is_uri(config.run.dir) and not config.run.dir.lower().startswith("file://"):
        raise MotError(f"run.dir {config.run.dir} is on an object store, which `mot train --process-group` does not "
                       "write to (its ranks save into one shared folder); use `mot launch` (launch.storage_path and "
                       "run.dir may be s3:// URIs there) or a shared folder")
    # storage paths are URIs: a relative run.dir is not one
    return ShardedFolderCheckpoints(Path(config.run.dir).resolve())


def train_in_process_group(source: Source, overrides, strategy: str) -> RunConfig:
    """Join (or, alone, create) the process group and run the training loop in it; returns the
    config that ran."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    config = resolve_config(source, overrides, saved=lambda c: folder_store(c).resumed_config())
    config = config.model_copy(update={"launch": config.launch.model_copy(update={"strategy": strategy})})
    device = resolve_device(config.run.device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise MotError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if config.train.batch_size % world:
        raise MotError(f"train.batch_size={config.train.batch_size} is not divisible by {world} processes")
    if world == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None)
    try:
        parallel = DataParallel(rank, world, strategy, device, uses_bf16(device, config.train.precision),
                                config.launch.reshard_after_forward)
        start_run(config, Runtime(device, folder_store(config), parallel, data=PREPARE if rank == 0 else WAIT_FOR_RANK_0))
    finally:
        dist.destroy_process_group()
    return config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
