"""Device, precision and seeding for a single-process run."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from mot_core.errors import MotError
from mot_core.launch.host import keep_freed_memory_in_heap

__all__ = ["autocast_for", "keep_freed_memory_in_heap", "resolve_device", "seed_everything"]


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise MotError("device cuda was asked for (run.device or --device) but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def autocast_for(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
