"""``mot export``: a run's tower as a Hugging Face Llama checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export(ns: argparse.Namespace) -> int:
    from mot_core.runs.export import export_run

    print(export_run(ns.run, ns.modality, Path(ns.out)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="write a run's tower (and its vocabulary rows) as a Hugging Face Llama folder")
    p.add_argument("run", help="a run folder (its newest intact checkpoint) or a checkpoint folder")
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: config.json + model.safetensors (+ tokenizer)")
    p.add_argument("--modality", default="text", help="the modality whose tower is written (default: text)")
    p.add_argument("--out", required=True, help="a new or empty folder")
    p.set_defaults(func=cmd_export)
