"""The ``mot`` command line. Input errors print one line and exit 2; never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mot_core.errors import MotError


def _load(config_path: str, overrides: list[str]):
    from mot_core.config import load_raw_config, validate_config
    from mot_core.experiment import apply_tower_defaults

    return validate_config(apply_tower_defaults(load_raw_config(config_path, overrides)))


def cmd_train(ns: argparse.Namespace) -> int:
    from mot_core.trainer import train

    config = _load(ns.config, ns.overrides)
    train(config)
    print(f"done: metrics in {Path(config.run.dir) / 'metrics.jsonl'}")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from mot_core.evaluation_cli import evaluate_checkpoint

    metrics = evaluate_checkpoint(Path(ns.checkpoint), ns.batches, ns.samples)
    if ns.json:
        print(json.dumps(metrics))
    else:
        width = max(map(len, metrics), default=0)
        for key, value in metrics.items():
            print(f"{key:<{width}}  {value:.4f}")
    return 0


def cmd_plugins(ns: argparse.Namespace) -> int:
    from registry import get_registry
    from registry.manager import SINGULAR

    registry = get_registry()
    print("plugins (entry-point group mot.plugins):")
    for info in registry.plugins:
        print(f"  {info.name:<16} {info.module:<28} from {info.distribution}")
    print("contributions:")
    for kind, name, info in registry.contributions():
        print(f"  {SINGULAR[kind]:<10} {name:<16} by {info.name}")
    return 0


def cmd_config_show(ns: argparse.Namespace) -> int:
    from mot_core.experiment import build_experiment

    config = _load(ns.config, ns.overrides)
    print(build_experiment(config).resolved_yaml(), end="")
    return 0


def cmd_data_prepare(ns: argparse.Namespace) -> int:
    from mot_core.tools_cli import data_prepare

    for name, report in data_prepare(_load(ns.config, ns.overrides)).items():
        print(f"{name}: {json.dumps(report) if report else 'nothing to prepare'}")
    return 0


def cmd_tokenizer_fit(ns: argparse.Namespace) -> int:
    from mot_core.tools_cli import tokenizer_fit

    for name, report in tokenizer_fit(_load(ns.config, ns.overrides), force=ns.force).items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from mot_core.generation import SamplingParams
    from mot_core.tools_cli import generate_samples

    if not ns.prompt and not ns.image:
        raise MotError("give at least one --prompt TEXT (caption -> image) or --image FILE (image -> caption)")
    params = SamplingParams(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, cfg_scale=ns.cfg)
    result = generate_samples(Path(ns.checkpoint), ns.prompt, ns.image, Path(ns.out), ns.samples, params,
                              ns.seed, ns.text_modality, ns.image_modality)
    if "grid" in result:
        print(f"images for {len(ns.prompt)} prompt(s) x {ns.samples}: {result['grid']}")
    for file, caption in result.get("captions", {}).items():
        print(f"{file}: {caption}")
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from mot_core.tools_cli import compare_runs

    print(compare_runs([Path(r) for r in ns.runs], Path(ns.plot) if ns.plot else None))
    return 0


def cmd_bench_throughput(ns: argparse.Namespace) -> int:
    from mot_core.bench.throughput import BenchSpec, format_table, resolve_device, run_throughput

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
    from mot_core.experiment import apply_tower_defaults

    raw = apply_tower_defaults(load_raw_config(ns.config, ns.overrides))
    report = run_step_match(raw, Path(ns.out), ns.steps, ns.smoothing)
    print(json.dumps(report) if ns.json else format_report(report))
    return 0


def _config_command(sub, group: str, name: str, help_text: str, func) -> argparse.ArgumentParser:
    """``mot GROUP NAME CONFIG [key=value ...]``."""
    group_parser = sub.add_parser(group, help=f"{group} tools")
    p = group_parser.add_subparsers(dest=f"{group}_command", required=True).add_parser(name, help=help_text)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mot", description="Mixture-of-Transformers training framework")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) a run declared in a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. model.dim=256 train.steps=100")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a checkpoint on its run's held-out data")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's)")
    p.add_argument("--samples", type=int, default=0, help="samples for generation-based metrics (e.g. FID)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("plugins", help="list registered plugins and what they contribute")
    p.set_defaults(func=cmd_plugins)
    _config_command(sub, "config", "show", "print the resolved, validated config", cmd_config_show)
    _config_command(sub, "data", "prepare", "render/convert the config's datasets on disk (idempotent)", cmd_data_prepare)
    p = _config_command(sub, "tokenizer", "fit", "train the config's learned tokenizers (e.g. the VQ image tokenizer)",
                        cmd_tokenizer_fit)
    p.add_argument("--force", action="store_true", help="refit even if a matching tokenizer is saved")
    p = sub.add_parser("generate", help="caption -> image grid (PNG) and image -> caption from a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--prompt", action="append", default=[], help="a caption to draw (repeatable)")
    p.add_argument("--image", action="append", default=[], help="an image file to caption (repeatable)")
    p.add_argument("--samples", type=int, default=4, help="images per prompt")
    p.add_argument("--out", default="samples.png", help="PNG grid of generated images")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-modality", default="text")
    p.add_argument("--image-modality", default="image")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("compare", help="final validation losses of runs side by side, and their loss curves")
    p.add_argument("runs", nargs="+")
    p.add_argument("--plot", default=None, help="write the loss curves to this PNG")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("throughput", help="dense vs MoT vs naive MoT step time, side by side")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--modalities", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--backend", choices=["sdpa", "flex", "xformers"], default="sdpa")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every variant (MoT recompiles for each new routing layout: not a speed-up yet)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--steps", type=int, default=3, help="steps per variant per repeat")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line")
    p.set_defaults(func=cmd_bench_throughput)
    p = bsub.add_parser("step-match", help="train dense and MoT twins; steps MoT needs to reach dense's final loss")
    p.add_argument("config", nargs="?", default="examples/configs/chameleon_mot.yaml",
                   help="base config; only model.untie and run.dir differ between the twins")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=1500, help="training budget of each twin (~10 min each on 2 CPU cores)")
    p.add_argument("--out", default="runs/step_match")
    p.add_argument("--smoothing", type=float, default=0.95, help="EMA factor for training curves")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_step_match)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except MotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
