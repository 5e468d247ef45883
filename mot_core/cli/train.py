"""``mot train``, ``mot eval`` and ``mot config show``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from mot_core import filesystems
from mot_core.cli.common import config_command, group_command, load_config, non_negative_int, positive_int
from mot_core.errors import MotError


def cmd_train(ns: argparse.Namespace) -> int:
    if ns.process_group:
        from mot_core.distributed.process_group import train_in_process_group

        config = train_in_process_group(ns.config, ns.overrides, ns.process_group)
        if os.environ.get("RANK", "0") != "0":
            return 0
    else:
        from mot_core.runs.start import train_locally

        config = load_config(ns.config, ns.overrides)
        train_locally(config)
    print(f"done: metrics in {filesystems.join(config.run.dir, 'metrics.jsonl')}")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from mot_core.runs.reopen import evaluate_checkpoint

    if ns.full and ns.batches:
        raise MotError("--full scores every held-out position; leave out --batches")
    report = (lambda line: print(line, file=sys.stderr)) if ns.json else print
    metrics = evaluate_checkpoint(ns.checkpoint, ns.batches, ns.samples, full=ns.full, report=report,
                                  sampling=ns.sampling)
    if ns.json:
        print(json.dumps(metrics))
    else:
        width = max(map(len, metrics), default=0)
        for key, value in metrics.items():
            print(f"{key:<{width}}  {value:.4f}")
    bad = [key for key, value in metrics.items() if not math.isfinite(value)]
    if bad:
        raise MotError(f"non-finite metrics: {', '.join(bad)} (the checkpoint's weights or the data are broken)")
    return 0


def cmd_config_show(ns: argparse.Namespace) -> int:
    from mot_core.experiment.build import build_experiment

    print(build_experiment(load_config(ns.config, ns.overrides)).resolved_yaml(), end="")
    return 0


def cmd_config_keys(ns: argparse.Namespace) -> int:
    from mot_core.config import config_keys, config_keys_markdown

    if ns.markdown:
        print(config_keys_markdown(), end="")
        return 0
    for key, kind, default, description in config_keys():
        print(f"{key} ({kind}, default {default}){': ' + description if description else ''}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) a run declared in a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. model.dim=256 train.steps=100")
    p.add_argument("--process-group", choices=["fsdp2", "ddp"], default=None,
                   help="train with mot launch's FSDP2/DDP runtime in a torch.distributed process group "
                        "without Ray: torchrun's (torchrun --nproc-per-node N -m mot_core.cli train ...), "
                        "or one process")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a checkpoint on its run's held-out data")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--batches", type=positive_int, default=None, help="validation batches (default: the run's)")
    p.add_argument("--samples", type=non_negative_int, default=0, help="samples for generation-based metrics (e.g. FID)")
    p.add_argument("--full", action="store_true", help="score every held-out position of every source")
    p.add_argument("--sampling", choices=["mixed", "per_source"], default=None,
                   help="how validation rows are drawn (default: the run's train.eval_sampling)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)
    config_command(sub, "config", "show", "print the resolved, validated config", cmd_config_show)
    p = group_command(sub, "config", "keys", "every key of the run config: its type, default and meaning",
                      cmd_config_keys)
    p.add_argument("--markdown", action="store_true", help="as the Markdown table of docs/configuration.md")
