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

__all__ = ["autocast_for", "choose_cpu_precision", "describe_precision", "keep_freed_memory_in_heap", "native_bf16_cpu",
           "resolve_device", "seed_everything", "uses_bf16"]

# CPU features that multiply bf16 in hardware. Without them oneDNN still runs bf16 matmuls, by
# converting to fp32 (as slow as fp32 or slower, and less exact), so ``auto`` keeps fp32 there.
# With them the products are faster, but whether a whole step is depends on the CPU and the
# model (``mot_core.devices.calibration``): ``auto`` measures it.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")

# ``auto`` on this process's CPU, once a run has measured its step (``choose_cpu_precision``).
_CPU_CHOICE: dict[str, object] = {}
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


def choose_cpu_precision(args, batch: int, seq: int) -> None:
    """``auto`` on a CPU with native bf16 matmuls: time this run's training step in fp32 and
    bf16 (or read the time cached for this machine and shape) and keep the faster for the
    process. Nothing is measured under ``MOT_CPU_BF16`` or without native bf16."""
    flag = cpu_bf16_flag()
    if os.environ.get(BF16_OVERRIDE, "").strip() or flag is None:
        return
    from mot_core.devices.calibration import calibrate

    _CPU_CHOICE["calibration"] = calibrate(args, batch, seq, flag)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """``train.precision``: bf16 and fp32 are taken as written; ``auto`` is bf16 autocast on
    CUDA, and on a CPU what this run's measured step favours (``choose_cpu_precision``; fp32
    where nothing was measured: no native bf16, evaluation, a distributed run), or what
    ``MOT_CPU_BF16`` says."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    if os.environ.get(BF16_OVERRIDE, "").strip():
        return forced_cpu_bf16()
    calibration = _CPU_CHOICE.get("calibration")
    return bool(calibration is not None and calibration.bf16)


def describe_precision(device: torch.device, precision: str) -> str:
    """One phrase for the run's banner, saying why ``auto`` chose what it chose."""
    dtype = "bf16 autocast" if uses_bf16(device, precision) else "fp32"
    if precision != "auto":
        return dtype
    if device.type == "cpu":
        forced = os.environ.get(BF16_OVERRIDE, "").strip()
        if forced:
            forced_cpu_bf16()  # a bad value is one line
            return f"{dtype} (precision auto: {BF16_OVERRIDE}={forced})"
        native = cpu_bf16_flag()
        if native is None:
            return f"{dtype} (precision auto: CPU has no native bf16 matmul)"
        calibration = _CPU_CHOICE.get("calibration")
        if calibration is None:
            return f"{dtype} (precision auto: nothing measured in this process; CPU has {native})"
        return f"{dtype} (precision auto, CPU has {native}: {calibration.describe()})"
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
