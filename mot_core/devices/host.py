"""Host-side (CPU) runtime settings."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.lru_cache(maxsize=1)
def keep_freed_memory_in_heap(limit_bytes: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations below ``limit_bytes`` from the heap and not to trim it.

    Training allocates and frees the same activation buffers every step. By default glibc maps
    large blocks fresh from the OS and unmaps them on free, so every step pays page faults
    again on first touch (measured here: ~40% fewer minor faults and faster steps without
    that). jemalloc/tcmalloc do the same for CPU training; this needs no extra library.
    Returns False where glibc is not the allocator (nothing changes then)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, limit_bytes))


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name is not None else None
    except (OSError, AttributeError):
        return None


def give_back_freed_memory() -> None:
    """Return the heap's free memory to the OS now (glibc's ``malloc_trim``; nothing elsewhere).

    glibc keeps freed blocks below its mmap threshold in the heap, a threshold that grows with
    the blocks freed (and that ``keep_freed_memory_in_heap`` raises to 1 GB): a process that
    reads large blocks one after the other (a checkpoint's tensors) would otherwise keep
    the free space of earlier ones resident, and stack the next on top of it when it does not fit."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def host_memory_mb() -> dict[str, float]:
    """This process's memory in MB, from /proc/self/status: ``rss`` (resident), ``peak``
    (VmHWM, the resident peak, file-backed pages such as memory-mapped checkpoints included)
    and ``anon`` (RssAnon: what the process itself allocated). Empty where /proc is not there."""
    keys = {"VmRSS:": "rss", "VmHWM:": "peak", "RssAnon:": "anon"}
    values: dict[str, float] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                parts = line.split()
                if parts and parts[0] in keys:
                    values[keys[parts[0]]] = int(parts[1]) / 1024
    except OSError:
        return {}
    return values


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or "cpu" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "cpu")
    except OSError:
        return "cpu"
