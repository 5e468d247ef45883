"""``mot bench startup-memory``: host memory at start-up of a model large for the machine,
warm-started from a checkpoint, in one process (``mot train``) and in N FSDP2 workers
(``mot launch``), side by side in one run.

One process builds the whole model and copies the checkpoint into it; an FSDP2 worker builds
the engine's parameters on the meta device and allocates and fills only its own shards. Each
process prints, once its model is ready and before its first step, the memory it allocated
(RssAnon) and how much of it the model took; this benchmark runs both, reads those lines,
stops the runs there and prints the figures against the model's size. The data is the
embedded Wikipedia text (offline).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mot_core.errors import MotError

LINE = re.compile(r"start-up: host memory ([\d,]+) MB allocated(?: on worker (\d+))? \(([+-][\d,]+) MB for the model"
                  r".*resident peak ([\d,]+) MB")


def _config(out: Path, name: str, dim: int, layers: int, heads: int, workers: int) -> dict:
    return {
        "run": {"dir": str(out / name), "seed": 0, "device": "cpu"},
        "model": {"dim": dim, "n_layers": layers, "n_heads": heads, "max_seq_len": 64,
                  "warm_start": str(out / "dense")},
        "train": {"steps": 1, "batch_size": 2 * workers, "seq_len": 64, "warmup_steps": 0, "eval_every": 0,
                  "eval_batches": 1, "checkpoint_every": 0, "log_every": 1, "progress": False, "precision": "fp32",
                  "keep_checkpoints": 1},
        "launch": {"strategy": "fsdp2", "num_workers": workers, "max_failures": 0},
        "data": {"dir": str(out / "shards")},
        "mixture": {"modalities": {"text": {"options": {"vocab_size": 4096}}},
                    "datasets": {"wikipedia": {"options": {}}}},
    }


def _dense_checkpoint(config: dict, folder: Path) -> int:
    """Random weights of the config's model, saved where ``model.warm_start`` reads them.
    Returns the number of parameters."""
    import torch
    from safetensors.torch import save_file

    from mot_core.experiment.build import build_experiment, build_model, model_args
    from mot_core.experiment.resolve import resolve_config
    from mot_core.experiment.tokenize import prepare_vocabulary

    run = resolve_config(config)
    exp = build_experiment(run)
    vocab = prepare_vocabulary(exp)
    torch.manual_seed(0)
    model = build_model(model_args(run, vocab), vocab)
    count = sum(p.numel() for p in model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return count


def _run(command: list[str], cwd: Path, expected: int) -> tuple[list[tuple[int, float, float, float]], float]:
    """Run a ``mot`` command until its ``expected`` start-up lines are printed, then stop it (the
    benchmark measures start-up; its runs are its own and are deleted at the next start).
    Returns (worker, allocated MB, MB for the model, resident peak MB) per line, and the
    seconds to the last line."""
    import signal

    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    process = subprocess.Popen([sys.executable, "-m", "mot_core.cli", *command], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    found: dict[int, tuple[int, float, float, float]] = {}
    tail: list[str] = []
    try:
        for line in process.stdout:
            tail = (tail + [line.rstrip()])[-5:]
            match = LINE.search(line)
            if match:
                worker = int(match.group(2) or 0)
                numbers = [float(match.group(i).replace(",", "")) for i in (1, 3, 4)]
                found[worker] = (worker, *numbers)
                if len(found) == expected:
                    break
    finally:
        seconds = time.perf_counter() - started
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    if len(found) < expected:
        raise MotError(f"`mot {command[0]}` ended before printing its start-up memory:\n" + "\n".join(tail))
    return sorted(found.values()), seconds


def run_startup_bench(out: Path, dim: int, layers: int, heads: int, workers: int, progress=print) -> dict:
    import shutil

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("single", "launched", "dense"):  # the benchmark's own runs: each starts afresh
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("single", "launched"):
        config = _config(out, name, dim, layers, heads, workers)
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config))
    progress("writing a random dense checkpoint of the model (the warm start both runs read)")
    params = _dense_checkpoint(_config(out, "single", dim, layers, heads, workers), out / "dense")
    size_mb = params * 4 / 2**20
    progress(f"{params / 1e6:.0f}M parameters, {size_mb:,.0f} MB in fp32; `mot train` (one process)")
    single, single_s = _run(["train", str(out / "single.yaml")], out, 1)
    progress(f"`mot launch` ({workers} FSDP2 workers)")
    launched, launch_s = _run(["launch", str(out / "launched.yaml")], out, workers)
    return {
        "parameters": params, "model_mb": size_mb, "workers": workers,
        "single": {"allocated_mb": single[0][1], "model_mb": single[0][2], "peak_rss_mb": single[0][3],
                   "seconds": single_s},
        "launched": [{"worker": w, "allocated_mb": anon, "model_mb": model, "peak_rss_mb": peak}
                     for w, anon, model, peak in launched],
        "launch_seconds": launch_s,
    }


def format_report(report: dict) -> str:
    size = report["model_mb"]
    lines = [
        f"model: {report['parameters'] / 1e6:.0f}M parameters, {size:,.0f} MB of fp32 weights; warm-started from a "
        "checkpoint",
        "process | allocated at start-up MB | of it for the model MB | share of the model | resident peak MB",
    ]
    rows = [("mot train (1 process)", report["single"])]
    rows += [(f"mot launch worker {w['worker']} of {report['workers']} (FSDP2)", w) for w in report["launched"]]
    for name, row in rows:
        lines.append(f"{name} | {row['allocated_mb']:,.0f} | {row['model_mb']:,.0f} | {row['model_mb'] / size:.2f} | "
                     f"{row['peak_rss_mb']:,.0f}")
    return "\n".join(lines)
