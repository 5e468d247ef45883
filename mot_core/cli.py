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

    metrics = evaluate_checkpoint(Path(ns.checkpoint), ns.batches)
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
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("plugins", help="list registered plugins and what they contribute")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("config", help="config tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    p = csub.add_parser("show", help="print the resolved, validated config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config_show)
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
