"""``mot bench export-memory``: host memory at the end of a sharded run of a model large for the
machine, when its last distributed checkpoint becomes a ``mot train`` checkpoint.

The export (``sharded_checkpoints.export_final``) reads the checkpoint's files one stored block
at a time and writes each into the safetensors files as it is read; before it, the workers
gathered the whole weights and AdamW state and rank 0 wrote them (``get_model_state_dict`` /
``get_optimizer_state_dict`` with ``full_state_dict``, then ``save_checkpoint``). This
benchmark runs, each in fresh processes so that their memory is their own:

1. ``write``: the model (dense towers, dim 1024, 28 layers: 363M parameters) after one AdamW
   update, saved as a worker saves it (``write_sharded``: torch distributed checkpoint of the
   weights and both moments; in one process, without a process group);
2. ``stream``: the export in a process that holds nothing else (``mot launch``'s driver);
3. ``hold``: two FSDP2 workers (gloo) that load the checkpoint, each holding its half of the
   weights and AdamW state, as at the end of a run: rank 0 runs the streamed export (as rank 0
   of ``mot train --process-group`` does), then both run the gather as it was, when the machine
   has the memory for it (``--no-gather`` skips it).

Each figure is a resident-set peak (``VmHWM``, reset before each export through
``/proc/self/clear_refs``) against the resident memory just before the export (after the
process's imports, with torch's thread pool started and the heap's free memory given back).
Everything is written under one temporary folder, removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mot_core.errors import MotError

RESULT = "export-memory result: "
WORKERS = 2


def _status(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise MotError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux 4.0+); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _measured(run) -> dict:
    """Run ``run()``; the resident memory before it (what the process holds live: the heap's
    free memory, left by what it did before, is given back first) and its peak."""
    import gc

    from mot_core.devices.host import give_back_freed_memory

    gc.collect()
    give_back_freed_memory()
    before = _status("VmRSS")
    reset = _reset_peak()
    started = time.perf_counter()
    run()
    return {"rss_before": before, "peak": _status("VmHWM"), "peak_reset": reset,
            "seconds": time.perf_counter() - started}


def _args(spec: dict):
    from mot_core.model.transformer import ModelArgs

    return ModelArgs(vocab_size=spec["vocab"], num_modalities=spec["modalities"], dim=spec["dim"],
                     n_layers=spec["layers"], n_heads=spec["heads"], max_seq_len=64)


def _optimizer(model):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def _phase_write(folder: Path, spec: dict) -> dict:
    import warnings

    import torch

    from mot_core.model.transformer import MoTTransformer
    from mot_core.training.runtime import SingleProcess
    from mot_core.training.sharded_checkpoints import write_sharded

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, as meant
    args = _args(spec)
    torch.manual_seed(0)
    model = MoTTransformer(args)
    optimizer = _optimizer(model)
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sizes = {name: t.numel() * t.element_size() for name, t in model.state_dict().items()}
    largest = max(sizes, key=sizes.get)
    checkpoint = folder / "checkpoint_0000001"
    checkpoint.mkdir()
    trainer = {"scheduler": {}, "data": {}, "skipped_updates": 0}
    write_sharded(checkpoint, 1, model, optimizer, trainer, json.dumps(spec) + "\n", args, SingleProcess(),
                  shared=False)
    return {"parameters": sum(p.numel() for p in model.parameters()), "weights_bytes": sum(sizes.values()),
            "largest_name": largest, "largest_bytes": sizes[largest],
            "checkpoint_bytes": sum(f.stat().st_size for f in checkpoint.iterdir())}


def _warm_up() -> None:
    """Start torch's thread pool (and its threads' heaps), as in any process that ran torch."""
    import torch

    all(bool(torch.isfinite(part).all()) for part in torch.randn(1 << 22).split(1 << 20))


def _phase_stream(folder: Path, spec: dict) -> dict:
    import torch.distributed.checkpoint  # noqa: F401  (imported before the measure: code, not data)

    from mot_core.training.sharded_checkpoints import export_final

    _warm_up()
    out = folder / "streamed"
    result = _measured(lambda: export_final(folder / "checkpoint_0000001", out, keep=1))
    shutil.rmtree(out)
    return result


def _phase_hold(folder: Path, spec: dict) -> dict:
    """One of ``WORKERS`` FSDP2 workers (``RANK``, ``MASTER_PORT`` from the environment)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    from mot_core.model.transformer import MoTTransformer
    from mot_core.training import checkpoint as ckpt
    from mot_core.training.parallelism import apply_fsdp2
    from mot_core.training.runtime import rng_state
    from mot_core.training.sharded_checkpoints import export_final, load_sharded

    checkpoint = folder / "checkpoint_0000001"
    args = _args(spec)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    try:
        model = MoTTransformer(args)
        apply_fsdp2(model, "cpu", None)
        optimizer = _optimizer(model)
        _, trainer = load_sharded(checkpoint, model, optimizer, args, rank, checkpoint)
        _warm_up()
        result: dict = {"rank": rank}
        if rank == 0:  # as rank 0 of a process group does at the end
            result["streamed"] = _measured(lambda: export_final(checkpoint, folder / "held_streamed", keep=1))
            shutil.rmtree(folder / "held_streamed")
        dist.barrier()
        if spec["gather"]:
            def gather() -> None:  # the export before: every worker gathers, rank 0 writes
                options = StateDictOptions(full_state_dict=True, cpu_offload=True)
                weights = get_model_state_dict(model, options=options)
                optim_state = get_optimizer_state_dict(model, optimizer, options=options)
                if rank == 0:
                    state = {**trainer, "optimizer_by_name": optim_state, "rng": rng_state()}
                    ckpt.save_checkpoint(folder / "held_gathered", 1, weights, state, "{}\n", args, 1)

            result["gathered"] = _measured(gather)
            if rank == 0:
                shutil.rmtree(folder / "held_gathered")
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()


PHASES = {"write": _phase_write, "stream": _phase_stream, "hold": _phase_hold}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_phase(name: str, folder: Path, spec: dict, processes: int = 1) -> list[dict]:
    """``name`` in ``processes`` fresh Python processes (ranks of a group when several); their
    result lines by rank, or a one-line error with the last lines of the first that failed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(processes)}
    command = [sys.executable, "-m", "mot_core.bench.export_memory", name, str(folder), json.dumps(spec)]
    running = [subprocess.Popen(command, env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for rank in range(processes)]
    outputs = [process.communicate()[0] for process in running]
    results = []
    for process, out in zip(running, outputs):
        found = [line[len(RESULT):] for line in out.splitlines() if line.startswith(RESULT)]
        if process.returncode != 0 or not found:
            tail = " | ".join(out.strip().splitlines()[-3:])
            killed = " (killed: out of memory?)" if process.returncode in (-9, 137) else ""
            raise MotError(f"the {name} step of the benchmark failed with exit code {process.returncode}{killed}: "
                           f"{tail}")
        results.append(json.loads(found[-1]))
    return results


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_export_memory_bench(dim: int, layers: int, heads: int, vocab: int, modalities: int, gather: bool,
                            progress=print) -> dict:
    if not Path("/proc/self/status").is_file():
        raise MotError("mot bench export-memory reads /proc/self/status (Linux)")
    spec = {"dim": dim, "layers": layers, "heads": heads, "vocab": vocab, "modalities": modalities, "gather": False}
    with tempfile.TemporaryDirectory(prefix="mot-bench-export-") as tmp:
        folder = Path(tmp)
        progress(f"writing a distributed checkpoint of the model and its AdamW state in {folder}")
        report = {**spec, "workers": WORKERS, **_run_phase("write", folder, spec)[0]}
        size = report["weights_bytes"]
        progress(f"{report['parameters'] / 1e6:.0f}M parameters; the streamed export, in a fresh process")
        report["stream"] = _run_phase("stream", folder, spec)[0]
        # both workers' halves of the weights and moments (3x the weights), rank 0's gathered
        # weights and moments (3x), with 2 GB to spare
        need = 6 * size + (2 << 30)
        if gather and _available() < need:
            report["gather_skipped"] = f"needs about {need / 2**30:.1f} GiB, {_available() / 2**30:.1f} GiB available"
            gather = False
        elif not gather:
            report["gather_skipped"] = "--no-gather"
        progress(f"{WORKERS} FSDP2 workers holding their shards: rank 0's streamed export"
                 + (", then the gathered one" if gather else ""))
        report["hold"] = _run_phase("hold", folder, {**spec, "gather": gather}, WORKERS)
    return report


def format_report(report: dict) -> str:
    mb = 2**20
    size, largest, workers = report["weights_bytes"], report["largest_bytes"], report["workers"]
    lines = [
        f"model: {report['parameters'] / 1e6:.0f}M parameters (dim {report['dim']}, {report['layers']} layers, "
        f"{report['modalities']} modalities), {size / mb:,.0f} MB of fp32 weights, {3 * size / mb:,.0f} MB with the "
        f"AdamW moments; the largest tensor: {report['largest_name']}, {largest / mb:,.1f} MB",
        "export | resident before MB | resident peak MB | increase MB | increase / largest tensor | s",
    ]
    rank0 = report["hold"][0]
    rows = [("streamed, in a fresh process (mot launch's driver)", report["stream"]),
            (f"streamed, by rank 0 of {workers} FSDP2 workers holding its shard (--process-group)", rank0["streamed"])]
    rows += [(f"gathered whole, as before: rank {r['rank']} of {workers} FSDP2 workers", r["gathered"])
             for r in report["hold"] if "gathered" in r]
    for name, row in rows:
        increase = row["peak"] - row["rss_before"]
        lines.append(f"{name} | {row['rss_before'] / mb:,.0f} | {row['peak'] / mb:,.0f} | {increase / mb:,.1f} | "
                     f"{increase / largest:.2f} | {row['seconds']:.1f}")
    if "gather_skipped" in report:
        lines.append(f"gathered whole, as before: not run ({report['gather_skipped']})")
    if not all(row["peak_reset"] for _, row in rows):
        lines.append("(this kernel did not let the peak be reset: a peak includes what the process did before)")
    return "\n".join(lines)


if __name__ == "__main__":
    phase, where, given = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    print(RESULT + json.dumps(PHASES[phase](where, given)), flush=True)
