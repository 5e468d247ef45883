"""``train.precision: auto`` on a CPU, chosen by measurement.

Whether bf16 autocast pays on a CPU depends on the CPU and on the model: native bf16 matmuls
(AMX, AVX-512 BF16) speed up the products, while the casts, the optimizer and the element-wise
work stay fp32-bound, and for a small model they dominate. So a run with ``auto`` on a CPU with
native bf16 times its own training step, in fp32 and in bf16 autocast: a throwaway model of the
run's shape, a batch of the run's size, AdamW and gradient clipping, one warm-up step then five
of each, interleaved, the fastest of each compared (other work on the machine only ever adds
time: the minimum is its least disturbed estimate). bf16 is chosen only when at least 5% faster.

The result is cached per machine and shape (``~/.cache/mot/precision.json``, or
``$MOT_CACHE_DIR``): the CPU, its thread count, torch's version, the model's shape, batch and
sequence length. Every later start on that machine reads the same choice, so a run resumes in
the precision it started with. The banner prints both timings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SPEED_UP_NEEDED = 1.05  # bf16 must be at least this much faster to be chosen
STEPS = 5


@dataclass(frozen=True)
class Calibration:
    """fp32 and bf16 whole-step times (ms) of the run's shape on this machine, and the choice."""

    fp32_ms: float
    bf16_ms: float
    cached: bool = False

    @property
    def bf16(self) -> bool:
        return self.fp32_ms >= SPEED_UP_NEEDED * self.bf16_ms

    def describe(self) -> str:
        where = "cached for this machine and shape" if self.cached else "measured now"
        return (f"a whole training step {self.bf16_ms:.0f} ms in bf16, {self.fp32_ms:.0f} ms in fp32, {where}; "
                f"bf16 is chosen when {SPEED_UP_NEEDED:.2f}x faster")


def cache_file() -> Path:
    root = os.environ.get("MOT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mot")
    return Path(root) / "precision.json"


def machine_key(args, batch: int, seq: int, flag: str) -> str:
    """What the timing depends on: the CPU, threads, torch, the model's shape, batch and seq."""
    from mot_core.devices.host import cpu_name

    described = {"cpu": cpu_name(), "flag": flag, "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "args": dataclasses.asdict(args), "batch": batch, "seq": seq}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _read_cache(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):  # a cache: missing or damaged only costs a measurement
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(file: Path, key: str, result: Calibration) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(file)
        data[key] = {"fp32_ms": result.fp32_ms, "bf16_ms": result.bf16_ms}
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, file)
    except OSError:  # a read-only home: the next start measures again
        pass


def calibrate(args, batch: int, seq: int, flag: str) -> Calibration:
    """The cached calibration of this shape on this machine, or a new one (then cached)."""
    file, key = cache_file(), machine_key(args, batch, seq, flag)
    entry = _read_cache(file).get(key)
    if isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) for k in ("fp32_ms", "bf16_ms")):
        return Calibration(float(entry["fp32_ms"]), float(entry["bf16_ms"]), cached=True)
    fp32_ms, bf16_ms = time_whole_steps(args, batch, seq)
    result = Calibration(fp32_ms, bf16_ms)
    _write_cache(file, key, result)
    return result


def time_whole_steps(args, batch: int, seq: int) -> tuple[float, float]:
    """The fastest ms of a whole training step (forward, loss, backward, clip, AdamW) of a fresh
    model of ``args`` on a (batch, seq) batch whose tokens are shared out over the modalities,
    in fp32 and in bf16 autocast, interleaved. The global RNG is left as it was."""
    from mot_core.model.attention import AttentionLayout
    from mot_core.model.routing import build_routing
    from mot_core.model.transformer import MoTTransformer

    state = torch.random.get_rng_state()
    try:
        generator = torch.Generator().manual_seed(0)
        model = MoTTransformer(args)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=generator)
        share = -(-seq // args.num_modalities)
        modality = (torch.arange(seq) // share).clamp(max=args.num_modalities - 1).expand(batch, -1).contiguous()
        plan = build_routing(modality, args.num_modalities)
        layout = AttentionLayout.build(torch.zeros_like(tokens))
        positions = torch.arange(seq).expand(batch, -1)
        targets = plan.sort(torch.randint(0, args.vocab_size, (batch * seq,), generator=generator))

        def step(bf16: bool) -> float:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                hidden = model(tokens, positions, modality, plan, layout)
                loss = F.cross_entropy(F.linear(hidden, model.head_weight).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            return 1000 * (time.perf_counter() - start)

        step(False), step(True)  # warm-up: kernels chosen, memory taken
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(STEPS):
            for bf16 in (False, True):
                times[bf16].append(step(bf16))
        return min(times[False]), min(times[True])
    finally:
        torch.random.set_rng_state(state)
