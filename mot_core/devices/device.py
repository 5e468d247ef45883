"""Device, precision and seeding for a single-process run."""

from __future__ import annotations

import contextlib
import functools
import os
import random

import numpy as np
import torch

from mot_core.errors import MotError
from mot_core.devices.host import keep_freed_memory_in_heap

__all__ = ["autocast_for", "describe_precision", "keep_freed_memory_in_heap", "native_bf16_cpu", "resolve_device",
           "seed_everything", "uses_bf16"]

# CPU features that multiply bf16 in hardware. Without them oneDNN still runs bf16 matmuls, by
# converting to fp32 (as slow as fp32 or slower, and less exact). With them the matmuls are
# faster, but a whole training step on a CPU was measured slower in bf16 autocast (casts, the
# optimizer and the element-wise work stay fp32-bound: docs/results.md, precision), so ``auto``
# is fp32 on every CPU; ``train.precision: bf16`` asks for bf16 where a measurement favours it.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
BF16_OVERRIDE = "MOT_CPU_BF16"


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise MotError("device cuda was asked for (run.device or --device) but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def native_bf16_cpu(honour_override: bool = True) -> str | None:
    """The CPU flag that gives native bf16 matrix products (``amx_bf16`` before
    ``avx512_bf16``), or None. ``MOT_CPU_BF16=1`` / ``0`` overrides the detection: 1 makes
    ``auto`` bf16 autocast on this CPU (the bf16 CPU path, exercised on any machine), 0 keeps
    it fp32 (the test suite pins it)."""
    forced = os.environ.get(BF16_OVERRIDE, "").strip()
    if honour_override and forced:
        if forced not in ("0", "1"):
            raise MotError(f"{BF16_OVERRIDE}={forced!r}: use 1 (bf16 where train.precision is auto) or 0 (fp32)")
        return f"{BF16_OVERRIDE}=1" if forced == "1" else None
    return cpu_bf16_flag()


@functools.lru_cache(maxsize=4)
def cpu_bf16_flag(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first of ``NATIVE_BF16_FLAGS`` among the CPU's flags (read from ``cpuinfo``), or None."""
    try:
        with open(cpuinfo) as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:  # not Linux: no detection, fp32
        return None
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def forced_cpu_bf16() -> bool:
    """``MOT_CPU_BF16=1``: ``auto`` is bf16 autocast on a CPU (a bad value is one line)."""
    forced = os.environ.get(BF16_OVERRIDE, "").strip()
    if forced and forced not in ("0", "1"):
        raise MotError(f"{BF16_OVERRIDE}={forced!r}: use 1 (bf16 where train.precision is auto) or 0 (fp32)")
    return forced == "1"


def uses_bf16(device: torch.device, precision: str) -> bool:
    """``train.precision``: bf16 and fp32 are taken as written; ``auto`` is bf16 autocast on
    CUDA, fp32 on a CPU (unless ``MOT_CPU_BF16=1``): whole training steps were measured slower
    in bf16 on CPUs with native bf16 matmuls too (see ``NATIVE_BF16_FLAGS``)."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and forced_cpu_bf16())


def describe_precision(device: torch.device, precision: str) -> str:
    """One phrase for the run's banner, saying why ``auto`` chose what it chose."""
    dtype = "bf16 autocast" if uses_bf16(device, precision) else "fp32"
    if precision != "auto":
        return dtype
    if device.type == "cpu":
        if forced_cpu_bf16():
            return f"{dtype} (precision auto: {BF16_OVERRIDE}=1)"
        native = cpu_bf16_flag()
        if native is None:
            return f"{dtype} (precision auto: CPU has no native bf16 matmul)"
        return (f"{dtype} (precision auto: fp32 on every CPU; whole bf16 training steps were measured slower on CPUs "
                f"with {native} too: `mot bench throughput --dtype both` measures this one, train.precision=bf16 asks "
                "for bf16)")
    return f"{dtype} (precision auto)"


def autocast_for(device: torch.device, precision: str):
    if uses_bf16(device, precision):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_deterministic_cpu() -> None:
    """Deterministic kernels, and freed activation memory kept in the heap: a CPU run then
    computes the same figures on every start and does not pay page faults every step."""
    torch.use_deterministic_algorithms(True)
    keep_freed_memory_in_heap()
