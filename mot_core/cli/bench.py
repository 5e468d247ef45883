"""``mot bench``: throughput, step-match, data, startup-memory, export-memory and roundtrip."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mot_core.cli.common import positive_int, unit_fraction
from mot_core.errors import MotError


def cmd_bench_throughput(ns: argparse.Namespace) -> int:
    from mot_core.bench.throughput import BenchSpec, format_table, resolve_device, run_throughput

    if ns.dim % ns.heads or (ns.dim // ns.heads) % 2:
        raise MotError(f"--dim {ns.dim} must split into --heads {ns.heads} heads of an even size")
    if ns.kv_heads and ns.heads % ns.kv_heads:
        raise MotError(f"--heads {ns.heads} must be a multiple of --kv-heads {ns.kv_heads}")
    if ns.modalities > ns.seq_len:
        raise MotError(f"--modalities {ns.modalities} cannot all fit in --seq-len {ns.seq_len}")
    spec = BenchSpec(
        dim=ns.dim, layers=ns.layers, heads=ns.heads, kv_heads=ns.kv_heads, seq_len=ns.seq_len, batch=ns.batch,
        modalities=ns.modalities, dtype=ns.dtype, backend=ns.backend, compile=ns.compile,
        activation_checkpointing=ns.checkpointing, steps=ns.steps, repeats=ns.repeats, device=ns.device,
        memory=not ns.no_memory,
    )
    if spec.backend == "flex" and resolve_device(spec.device).type == "cpu":
        raise MotError("flex attention has no backward pass on CPU; benchmark training with --backend sdpa")
    report = run_throughput(spec, progress=(lambda msg: print(msg, file=sys.stderr)) if not ns.json else (lambda msg: None))
    if ns.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    return 0


def cmd_bench_step_match(ns: argparse.Namespace) -> int:
    from mot_core.bench.step_match import format_report, run_step_match
    from mot_core.config import load_raw_config

    raw = load_raw_config(ns.config, ns.overrides)  # each twin is resolved from it (run_step_match)
    variants = ("dense", "mot", "moe4x") if ns.moe4x else ("dense", "mot")
    report = run_step_match(raw, Path(ns.out), ns.steps, ns.smoothing, variants)
    print(json.dumps(report) if ns.json else format_report(report))
    return 0


def cmd_bench_data(ns: argparse.Namespace) -> int:
    from mot_core.bench.data import epoch_boundary_steps, format_epoch_boundary, format_report, parse_size, run_data_bench

    if ns.epoch_boundary:
        report = epoch_boundary_steps(documents=ns.documents)
        print(json.dumps(report) if ns.json else format_epoch_boundary(report))
        return 0
    if ns.shards:
        import tempfile

        from mot_core.bench.data import format_many_shards, many_shards_start

        root = ns.remote or tempfile.mkdtemp(prefix="mot-many-shards-", dir=ns.out if Path(ns.out).is_dir() else None)
        report = many_shards_start(ns.shards, root.rstrip("/") + ("/many-shards" if ns.remote else ""))
        print(json.dumps(report) if ns.json else format_many_shards(report))
        if not ns.remote:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        return 0
    if ns.ray and not ns.images:
        raise MotError("--ray times the image layouts' tokenize as Ray Data jobs: give --images N")
    if ns.images:
        from mot_core.bench.image_formats import format_image_report, run_image_bench

        report = run_image_bench(ns.images, Path(ns.out), ns.steps, ray=ns.ray,
                                 progress=(lambda msg: print(msg, file=sys.stderr)) if not ns.json else (lambda msg: None))
        print(json.dumps(report) if ns.json else format_image_report(report))
        return 0
    if ns.remote:
        from mot_core.bench.data import format_remote_report, run_remote_bench

        size = parse_size(ns.sizes.split(",")[0])
        report = run_remote_bench(size, ns.remote, Path(ns.out), ns.workers,
                                  progress=(lambda msg: print(msg, file=sys.stderr)) if not ns.json else (lambda msg: None))
        print(json.dumps(report) if ns.json else format_remote_report(report))
        return 0
    sizes = [parse_size(s) for s in ns.sizes.split(",") if s.strip()]
    if not sizes:
        raise MotError("--sizes names no corpus size (e.g. --sizes 5MB,50MB)")
    report = run_data_bench(sizes, Path(ns.out), ns.steps,
                            progress=(lambda msg: print(msg, file=sys.stderr)) if not ns.json else (lambda msg: None))
    print(json.dumps(report) if ns.json else format_report(report))
    return 0


def cmd_bench_startup(ns: argparse.Namespace) -> int:
    from mot_core.bench.startup import format_report, run_startup_bench

    if ns.dim % ns.heads:
        raise MotError(f"--dim {ns.dim} is not divisible by --heads {ns.heads}")
    report = run_startup_bench(Path(ns.out), ns.dim, ns.layers, ns.heads, ns.workers,
                               progress=(lambda msg: print(msg, file=sys.stderr)) if not ns.json else (lambda msg: None))
    print(json.dumps(report) if ns.json else format_report(report))
    return 0


def cmd_bench_export_memory(ns: argparse.Namespace) -> int:
    from mot_core.bench.export_memory import format_report, run_export_memory_bench

    if ns.dim % ns.heads or (ns.dim // ns.heads) % 2:
        raise MotError(f"--dim {ns.dim} must split into --heads {ns.heads} heads of an even size")
    report = run_export_memory_bench(ns.dim, ns.layers, ns.heads, ns.vocab, ns.modalities, not ns.no_gather,
                                     progress=(lambda msg: print(msg, file=sys.stderr)) if not ns.json else (lambda msg: None))
    print(json.dumps(report) if ns.json else format_report(report))
    return 0


def cmd_bench_roundtrip(ns: argparse.Namespace) -> int:
    from mot_core.bench.hf_roundtrip import format_table, roundtrip

    if ns.image is not None and not Path(ns.image).is_file():
        raise MotError(f"--image {ns.image} is not a file")
    rows = [roundtrip(run, ns.prompt, Path(ns.image) if ns.image else None, ns.max_tokens) for run in ns.runs]
    for row in rows:
        row.pop("generated", None)
    print(json.dumps(rows) if ns.json else format_table(rows))
    return 0 if all(all(r["generations"].values()) and r["processor_matches"] for r in rows) else 1


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("throughput", help="dense vs MoT vs naive MoT step time, side by side")
    p.add_argument("--dim", type=positive_int, default=256)
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--kv-heads", type=positive_int, default=None)
    p.add_argument("--seq-len", type=positive_int, default=1024)
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--modalities", type=positive_int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="fp32",
                   help="bf16: autocast; both: fp32 and bf16 side by side in one interleaved run")
    p.add_argument("--backend", choices=["sdpa", "flex", "xformers"], default="sdpa")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every variant (MoT recompiles for each new routing layout: not a speed-up yet)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--steps", type=positive_int, default=3, help="steps per variant per repeat")
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line")
    p.set_defaults(func=cmd_bench_throughput)
    p = bsub.add_parser("step-match", help="train dense and MoT twins; steps MoT needs to reach dense's final loss")
    p.add_argument("config", nargs="?", default="examples/configs/chameleon_mot.yaml",
                   help="base config; only the towers and run.dir differ between the twins")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=positive_int, default=1500, help="training budget of each twin (~10 min each on 2 CPU cores)")
    p.add_argument("--out", default="runs/step_match")
    p.add_argument("--smoothing", type=unit_fraction, default=0.95, help="EMA factor for training curves")
    p.add_argument("--moe4x", action="store_true",
                   help="also train the paper's MoE-4x baseline (4 expert-choice experts, dense attention)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_step_match)
    p = bsub.add_parser("data", help="tokenize corpora of growing size into shards, then train from them: "
                        "throughput, time to the first step, peak memory")
    p.add_argument("--sizes", default="5MB,50MB,500MB,2GB", help="corpus sizes, comma-separated (KB, MB, GB)")
    p.add_argument("--out", default="runs/bench_data", help="corpora, shards and runs (corpora are reused)")
    p.add_argument("--steps", type=positive_int, default=3, help="training steps of each run")
    p.add_argument("--epoch-boundary", action="store_true",
                   help="instead: the data side of 100 steps while 16 lanes cross an epoch boundary, the packer as it "
                        "is against one that keeps a single epoch order (as before)")
    p.add_argument("--documents", type=positive_int, default=1 << 24, help="documents of the source (--epoch-boundary)")
    p.add_argument("--remote", metavar="URI",
                   help="instead: the first --sizes corpus's shards copied to this object-store URI (s3://bucket/prefix): "
                        "first step from there against from disk, and what each `mot launch` worker fetches before "
                        "step 1")
    p.add_argument("--workers", type=positive_int, default=2, help="launch workers (--remote)")
    p.add_argument("--images", type=positive_int, metavar="N",
                   help="instead: N captioned images as a folder, WebDataset tars and Parquet, each tokenized (images "
                        "per second against Pillow's decode rate), then train peak memory from N/4 and N images")
    p.add_argument("--ray", action="store_true",
                   help="with --images: also tokenize the WebDataset and Parquet layouts as Ray Data jobs on a local "
                        "Ray instance, read by Ray Data's readers and by the sources' own (whole command, seconds)")
    p.add_argument("--shards", type=positive_int, metavar="N",
                   help="instead: start-up against the shard count: N small shards written (to a temporary folder, "
                        "or under --remote), then the time to open them and build the first step's batch")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_data)
    p = bsub.add_parser("startup-memory", help="peak host memory at start-up of a large warm-started model: "
                        "one process against FSDP2 workers that build on the meta device")
    p.add_argument("--dim", type=positive_int, default=1024)
    p.add_argument("--layers", type=positive_int, default=28, help="28 x dim 1024: 363M parameters")
    p.add_argument("--heads", type=positive_int, default=16)
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--out", default="runs/bench_startup")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_startup)
    p = bsub.add_parser("export-memory", help="peak host memory of the end of a sharded run: its last distributed "
                        "checkpoint exported a block at a time, against gathering it whole")
    p.add_argument("--dim", type=positive_int, default=1024)
    p.add_argument("--layers", type=positive_int, default=28, help="28 x dim 1024: 363M parameters")
    p.add_argument("--heads", type=positive_int, default=16)
    p.add_argument("--vocab", type=positive_int, default=4096, help="vocabulary size (all modalities)")
    p.add_argument("--modalities", type=positive_int, default=1, help="towers of every component (1: dense)")
    p.add_argument("--no-gather", action="store_true", help="skip the gathered export (it needs ~7x the weights)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_export_memory)
    p = bsub.add_parser("roundtrip", help="export runs as whole Hugging Face models, load each with transformers in a "
                        "process without mot, and compare logits, greedy generations and the processor's ids")
    p.add_argument("runs", nargs="+", help="run folders (their newest intact checkpoint) or checkpoint folders")
    p.add_argument("--prompt", default="a", help="the text prompt of the generations (default: a)")
    p.add_argument("--image", default=None, help="an image file: its span is the prompt of a caption, and the "
                   "processor must encode it to the run's ids")
    p.add_argument("--max-tokens", type=positive_int, default=12, help="text tokens generated per case")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_roundtrip)
