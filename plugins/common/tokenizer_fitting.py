"""Shared by the image tokenizers (VQGAN, VAE): writing a whole folder so that readers only ever
see a complete one, and the learning-rate schedule of their fits."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Callable


def write_folder_atomically(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(staging)`` on a fresh sibling folder, then rename it to ``out_dir`` (moving
    an existing ``out_dir`` aside first: ``os.replace`` cannot overwrite a non-empty folder).
    An interrupted write leaves the previous folder, or none, never a half-written one."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        write(staging)
        if out_dir.exists():
            retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, retired)
            os.replace(staging, out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def warmup_cosine_lr(step: int, steps: int, peak: float, max_warmup: int) -> float:
    """Learning rate of a tokenizer fit at ``step``: a short linear warm-up (at most
    ``max_warmup`` steps, a twentieth of the run), then cosine decay to 10% of the peak."""
    warmup = max(1, min(max_warmup, steps // 20))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))
