"""How much memory a device has free, to refuse work that cannot fit before allocating it
(a one-line estimate instead of an allocator traceback halfway through)."""

from __future__ import annotations

import torch


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: the CUDA allocator's free bytes, or the host's MemAvailable
    (Linux); None where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gigabytes(count: float) -> str:
    return f"{count / 1e9:,.1f} GB"
