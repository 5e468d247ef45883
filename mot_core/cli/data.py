"""``mot data prepare`` and ``mot tokenizer fit``: steps that write data or tokenizers to disk."""

from __future__ import annotations

import argparse
import json

from mot_core.cli.common import config_command, load_config


def cmd_data_prepare(ns: argparse.Namespace) -> int:
    from mot_core.train.preparation import data_prepare

    for name, report in data_prepare(load_config(ns.config, ns.overrides)).items():
        print(f"{name}: {json.dumps(report) if report else 'nothing to prepare'}")
    return 0


def cmd_tokenizer_fit(ns: argparse.Namespace) -> int:
    from mot_core.train.preparation import tokenizer_fit

    for name, report in tokenizer_fit(load_config(ns.config, ns.overrides), force=ns.force).items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
    return 0


def register(sub) -> None:
    config_command(sub, "data", "prepare", "render/convert the config's datasets on disk (idempotent)", cmd_data_prepare)
    p = config_command(sub, "tokenizer", "fit", "train the config's learned tokenizers (e.g. the VQ image tokenizer)",
                       cmd_tokenizer_fit)
    p.add_argument("--force", action="store_true", help="refit even if a matching tokenizer is saved")
