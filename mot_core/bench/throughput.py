"""``mot bench throughput``: is a MoT step as fast as a dense step of the same active size?

Trains a few steps of (a) the dense model, (b) MoT with this framework's routing and (c) the
naive masked-loop MoT, on the same interleaved multi-modality batch, interleaving the three in
every repetition so machine noise hits them alike, and reports medians and ratios.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from mot_core.model.attention import AttentionLayout
from mot_core.bench.naive import NaiveMoTTransformer
from mot_core.devices.host import keep_freed_memory_in_heap
from mot_core.model.moe import MoEArgs
from mot_core.model.transformer import ModelArgs, MoTTransformer
from mot_core.model.routing import build_routing

VARIANTS = ("dense", "mot", "naive", "moe4x")
# Dense peak FLOP/s by device name fragment: (bf16 tensor cores, fp32 without tensor cores).
PEAK_FLOPS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12)}


@dataclass(frozen=True)
class BenchSpec:
    dim: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int | None = None
    seq_len: int = 1024
    batch: int = 2
    modalities: int = 3
    vocab_per_modality: int = 1024
    dtype: str = "fp32"  # fp32 | bf16 (autocast) | both (fp32 and bf16 side by side, interleaved)
    backend: str = "sdpa"
    compile: bool = False
    activation_checkpointing: bool = False
    steps: int = 3
    warmup: int = 1
    repeats: int = 10
    device: str = "auto"
    seed: int = 0
    memory: bool = True

    @property
    def dtypes(self) -> tuple[str, ...]:
        return ("fp32", "bf16") if self.dtype == "both" else (self.dtype,)

    def model_args(self, untied: bool, moe: MoEArgs | None = None) -> ModelArgs:
        """The dense (untied False) or MoT twin; with ``moe``, every FFN is that MoE."""
        return ModelArgs(
            vocab_size=self.vocab_per_modality * self.modalities, num_modalities=self.modalities,
            dim=self.dim, n_layers=self.layers, n_heads=self.heads, n_kv_heads=self.kv_heads,
            untie_ffn=untied, untie_attention=untied, untie_norm=untied, max_seq_len=self.seq_len,
            attention_backend=self.backend, activation_checkpointing=self.activation_checkpointing,
            ffn_kinds=(moe,) * self.modalities if moe is not None else (),
        )


def interleaved_batch(spec: BenchSpec, seed: int) -> dict[str, torch.Tensor]:
    """(B, S) tokens/modality/positions/targets: runs of 32-256 tokens of random modalities,
    each run's ids drawn from its modality's vocabulary range."""
    gen = torch.Generator().manual_seed(seed)
    modality = torch.empty(spec.batch, spec.seq_len, dtype=torch.long)
    for row in range(spec.batch):
        filled = 0
        while filled < spec.seq_len:
            length = int(torch.randint(32, 257, (1,), generator=gen))
            modality[row, filled : filled + length] = int(torch.randint(0, spec.modalities, (1,), generator=gen))
            filled += length
    local = torch.randint(0, spec.vocab_per_modality, modality.shape, generator=gen)
    tokens = local + modality * spec.vocab_per_modality
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    positions = torch.arange(spec.seq_len).expand(spec.batch, -1).contiguous()
    return {"tokens": tokens, "modality": modality, "positions": positions, "targets": targets}


class _Runner:
    """One variant: model, optimizer and a compiled-or-eager training step."""

    def __init__(self, variant: str, spec: BenchSpec, device: torch.device):
        torch.manual_seed(spec.seed)
        self.variant, self.spec, self.device = variant, spec, device
        # MoE-4x: the paper's baseline, dense attention and 4 expert-choice experts per FFN.
        moe = MoEArgs(experts=4, router="expert_choice", capacity_factor=1.0) if variant == "moe4x" else None
        args = spec.model_args(untied=variant in ("mot", "naive"), moe=moe)
        self.model = (NaiveMoTTransformer(args) if variant == "naive" else MoTTransformer(args)).to(device)
        self.forward = torch.compile(self.model) if spec.compile else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.dtype == "bf16")

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        tokens, modality = batch["tokens"], batch["modality"]
        with self.autocast:
            if self.variant == "naive":
                hidden = self.forward(tokens.to(self.device), batch["positions"].to(self.device), modality.to(self.device))
                targets = batch["targets"].reshape(-1).to(self.device)
                hidden = hidden.reshape(-1, hidden.shape[-1])
            else:
                # Built on the host, as the data pipeline does for every batch.
                plan = build_routing(modality, self.spec.modalities).to(self.device)
                layout = AttentionLayout.build(torch.zeros_like(tokens)).to(self.device)
                hidden = self.forward(tokens.to(self.device), batch["positions"].to(self.device),
                                      modality.to(self.device), plan, layout)
                targets = plan.sort(batch["targets"].reshape(-1).to(self.device))
            logits = F.linear(hidden, self.model.lm_head.weight)
            loss = F.cross_entropy(logits.float(), targets, ignore_index=-100)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the trainer's whole step: clipping and the optimizer, as a run pays for them
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda; asking for cuda without a CUDA device is a one-line MotError."""
    from mot_core.devices.device import resolve_device as resolve

    return resolve(name)


def flops_per_token(spec: BenchSpec) -> float:
    """Training FLOPs per token: 6 x matmul parameters a token uses (one tower of each
    component, i.e. the dense twin's; the embedding lookup is free, the output head is not)
    + causal attention (6 x layers x S x dim)."""
    dense = MoTTransformer(spec.model_args(untied=False))
    norm_gains = sum(p.numel() for name, p in dense.named_parameters() if "norm" in name)
    matmul_params = dense.parameter_counts()["active_per_token"] - dense.embed.weight.numel() - norm_gains
    return 6.0 * matmul_params + 6.0 * spec.layers * spec.seq_len * spec.dim


def measure_peak_memory(variant: str, spec: BenchSpec) -> int:
    """Peak bytes a training step of ``variant`` adds: the CUDA allocator's peak on a GPU; on a
    CPU the peak resident-set growth of a fresh process that runs it (so variants don't mix)."""
    device = resolve_device(spec.device)
    if device.type == "cuda":
        runner = _Runner(variant, spec, device)
        batch = interleaved_batch(spec, spec.seed)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        runner.step(batch)
        _sync(device)
        return torch.cuda.max_memory_allocated() - base
    probe = [sys.executable, "-m", "mot_core.bench.throughput", "--probe", variant, json.dumps(asdict(spec))]
    result = subprocess.run(probe, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def _probe(variant: str, spec_json: str) -> None:
    """Peak RSS growth over the post-import baseline: model, optimizer state, activations."""
    spec = BenchSpec(**json.loads(spec_json))
    batch = interleaved_batch(spec, spec.seed)
    # One throwaway step of a tiny model first: library start-up (thread pools, kernel
    # workspaces) is the same for every variant and must not count as the variant's memory.
    keep_freed_memory_in_heap()
    tiny = replace(spec, dim=32, layers=1, heads=2, kv_heads=None, seq_len=64, batch=1)
    _Runner(variant, tiny, torch.device("cpu")).step(interleaved_batch(tiny, 0))
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # reset the high-water mark (VmHWM)
        handle.write("5")
    runner = _Runner(variant, spec, torch.device("cpu"))
    for _ in range(2):
        runner.step(batch)
    print((_status_kib("VmHWM") - baseline) * 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_matmul_peak(device: torch.device, dtype: str, repeats: int = 5) -> float:
    """FLOP/s of one large matrix product in ``dtype`` on ``device`` (median of ``repeats``
    after warm-up): the roof a training step's matmuls can reach on this machine, so that an
    MFU can be given where no datasheet figure applies (a CPU: AMX, AVX-512 BF16 or neither).
    CPU: (2048 x 1024) @ (1024 x 4096); CUDA: 8192^3."""
    m, k, n = (8192, 8192, 8192) if device.type == "cuda" else (2048, 1024, 4096)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device, torch_dtype)
    b = torch.randn(k, n, generator=gen).to(device, torch_dtype)
    times = []
    for index in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if index >= 2:
            times.append(time.perf_counter() - start)
    return 2.0 * m * k * n / statistics.median(times)


def run_throughput(spec: BenchSpec, progress=print) -> dict:
    """Every variant in every dtype of ``spec.dtypes``, interleaved step by step. The report
    holds per dtype the variants' figures and ratios to dense, the measured matmul peak per
    dtype and, with both dtypes, bf16's speed-up over fp32 per variant."""
    device = resolve_device(spec.device)
    if device.type == "cpu":
        keep_freed_memory_in_heap()  # as the trainer does: no page-fault storm every step
    keys = [(v, d) for d in spec.dtypes for v in VARIANTS]
    runners = {(v, d): _Runner(v, replace(spec, dtype=d), device) for v, d in keys}
    batches = [interleaved_batch(spec, spec.seed + i) for i in range(spec.steps)]
    for runner in runners.values():  # warm-up: allocator, compile, first-touch
        for batch in batches[: max(1, spec.warmup)]:
            runner.step(batch)
    _sync(device)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    for repeat in range(spec.repeats):
        # Interleave single steps (and rotate who goes first) so drift on a noisy machine
        # lands on every variant alike.
        for index, batch in enumerate(batches):
            shift = (repeat * len(batches) + index) % len(keys)
            for key in keys[shift:] + keys[:shift]:
                start = time.perf_counter()
                runners[key].step(batch)
                _sync(device)
                times[key].append(time.perf_counter() - start)
        progress(f"repeat {repeat + 1}/{spec.repeats}: " + ", ".join(
            f"{v}{'' if len(spec.dtypes) == 1 else ' ' + d} {statistics.median(times[v, d]) * 1e3:.1f} ms" for v, d in keys))
    progress("measuring the matmul peak: " + ", ".join(spec.dtypes))
    matmul_peak = {d: measure_matmul_peak(device, d) for d in spec.dtypes}
    tokens = spec.batch * spec.seq_len
    dense_flops = flops_per_token(spec)  # builds the dense twin: once, not per variant and dtype
    by_dtype: dict[str, dict] = {}
    for dtype in spec.dtypes:
        datasheet = _datasheet_peak(device, dtype)
        results = {}
        for variant in VARIANTS:
            runner = runners[variant, dtype]
            step = statistics.median(times[variant, dtype])
            counts = runner.model.parameter_counts() if hasattr(runner.model, "parameter_counts") else _naive_counts(runner.model, spec)
            fpt = runner.model.flops_per_token(spec.seq_len) if variant == "moe4x" else dense_flops
            achieved = fpt * tokens / step
            results[variant] = {
                "step_time_s": step, "tokens_per_s": tokens / step, "params": counts["total"],
                "active_params_per_token": counts["active_per_token"], "flops_per_token": fpt,
                "achieved_flops": achieved,
                # MFU against the datasheet's dense peak where the device has one (a GPU), else
                # against the matmul peak measured here (a CPU's MFU).
                "mfu": achieved / (datasheet or matmul_peak[dtype]),
                "mfu_of_measured_matmul": achieved / matmul_peak[dtype],
                "peak_memory_bytes": measure_peak_memory(variant, replace(spec, dtype=dtype)) if spec.memory else None,
            }
        by_dtype[dtype] = {
            "results": results, "datasheet_peak_flops": datasheet, "matmul_peak_flops": matmul_peak[dtype],
            **{f"{v}_over_dense": results[v]["step_time_s"] / results["dense"]["step_time_s"] for v in VARIANTS[1:]},
        }
    report = {
        "spec": asdict(spec), "device": torch.cuda.get_device_name() if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(), "by_dtype": by_dtype,
    }
    if len(spec.dtypes) == 2:
        report["bf16_speedup"] = {v: by_dtype["fp32"]["results"][v]["step_time_s"] / by_dtype["bf16"]["results"][v]["step_time_s"]
                                  for v in VARIANTS}
    return report


def _naive_counts(model: torch.nn.Module, spec: BenchSpec) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    shared = model.embed.weight.numel() + model.lm_head.weight.numel()
    return {"total": total, "active_per_token": shared + (total - shared) // spec.modalities}


def _datasheet_peak(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for fragment, (bf16, fp32) in PEAK_FLOPS.items():
        if fragment in name:
            return bf16 if dtype == "bf16" else fp32
    return None


def _cpu_name() -> str:
    from mot_core.devices.device import native_bf16_cpu

    name = "cpu"
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    native = native_bf16_cpu(honour_override=False)
    return f"{name} ({'native bf16 matmul: ' + native if native else 'no native bf16 matmul'})"


def format_table(report: dict) -> str:
    spec = report["spec"]
    lines = []
    for dtype, run in report["by_dtype"].items():
        rows = [("variant", "params", "active/token", "GFLOP/token", "step ms", "tokens/s", "GFLOP/s", "MFU", "peak MiB")]
        for variant, r in run["results"].items():
            mem = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] is not None else "-"
            rows.append((variant, f"{r['params'] / 1e6:.2f}M", f"{r['active_params_per_token'] / 1e6:.2f}M",
                         f"{r['flops_per_token'] / 1e9:.3f}", f"{r['step_time_s'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}",
                         f"{r['achieved_flops'] / 1e9:,.1f}", f"{r['mfu'] * 100:.1f}%", mem))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines.append(f"-- {dtype} --")
        lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
        peak = (f"datasheet peak {run['datasheet_peak_flops'] / 1e12:,.0f} TFLOP/s (measured matmul "
                f"{run['matmul_peak_flops'] / 1e12:,.0f})" if run["datasheet_peak_flops"] else
                f"measured matmul peak {run['matmul_peak_flops'] / 1e9:,.0f} GFLOP/s")
        lines.append(f"MoT / dense step time: {run['mot_over_dense']:.3f}    naive / dense: {run['naive_over_dense']:.3f}    "
                     f"MoE-4x / dense: {run['moe4x_over_dense']:.3f}    MFU against the {peak}")
    if "bf16_speedup" in report:
        lines.append("bf16 speed-up over fp32 (step time): " +
                     ", ".join(f"{v} {x:.2f}x" for v, x in report["bf16_speedup"].items()))
    lines.append(
        f"device {report['device']} ({report['threads']} threads), {spec['modalities']} modalities interleaved, "
        f"batch {spec['batch']} x seq {spec['seq_len']}, {spec['backend']}, compile={spec['compile']}; "
        f"median over {spec['repeats']} repeats x {spec['steps']} batches, variants interleaved step by step"
    )
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--probe":
    _probe(sys.argv[2], sys.argv[3])
