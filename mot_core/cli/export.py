"""``mot export``: a run as a Hugging Face folder: the whole MoT model, or one modality's
tower as a Llama."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export(ns: argparse.Namespace) -> int:
    if ns.modality is None:
        from mot_core.runs.export_whole import export_whole_model

        print(export_whole_model(ns.run, Path(ns.out), ns.dtype))
        return 0
    from mot_core.runs.export import export_run

    print(export_run(ns.run, ns.modality, Path(ns.out), dtype=ns.dtype))
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="write a run as a Hugging Face folder: the whole MoT model, or one "
                                      "modality's tower as a Llama (--modality)")
    p.add_argument("run", help="a run folder (its newest intact checkpoint) or a checkpoint folder")
    p.add_argument("--format", choices=["hf"], default="hf",
                   help="hf: config.json, safetensors, the model's code, tokenizers (transformers loads it)")
    p.add_argument("--modality", default=None,
                   help="export only this modality's tower and vocabulary rows as a LlamaForCausalLM (default: the "
                        "whole model, every modality, loaded with trust_remote_code=True)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights' dtype (default: the whole model in float32; a tower in its source checkpoint's "
                        "dtype, float32 for a run from scratch)")
    p.add_argument("--out", required=True, help="a new or empty folder")
    p.set_defaults(func=cmd_export)
