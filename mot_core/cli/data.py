"""``mot data prepare`` and ``mot tokenizer fit``: steps that write data or tokenizers to disk."""

from __future__ import annotations

import argparse
import json

from mot_core.cli.common import config_command, load_config
from mot_core.errors import MotError


def cmd_data_prepare(ns: argparse.Namespace) -> int:
    from mot_core.experiment.preparation import data_prepare

    for name, report in data_prepare(load_config(ns.config, ns.overrides)).items():
        print(f"{name}: {json.dumps(report) if report else 'nothing to prepare'}")
    return 0


def cmd_tokenizer_fit(ns: argparse.Namespace) -> int:
    from mot_core.experiment.preparation import tokenizer_fit
    from mot_core.training.run_mirror import run_files_synced

    config = load_config(ns.config, ns.overrides)
    with run_files_synced(config.run.dir):
        reports = tokenizer_fit(config, force=ns.force)
    if not reports:
        print(f"nothing to fit: no modality of {ns.config} has a separate tokenizer fit "
              "(text BPE and other small tokenizers are fitted by `mot train` itself)")
    for name, report in reports.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
    return 0


def cmd_data_tokenize(ns: argparse.Namespace) -> int:
    from mot_core import filesystems
    from mot_core.experiment.build import build_experiment
    from mot_core.experiment.tokenize import data_root, describe_skipped, prepare_vocabulary, tokenize_locally

    from mot_core.training.run_mirror import run_files_synced

    if ns.reader is not None and not ns.address:
        raise MotError("--reader chooses the readers of a Ray Data job (--address); without it the sources' own "
                       "readers read every part here")
    config = load_config(ns.config, ns.overrides)
    with run_files_synced(config.run.dir):
        exp = build_experiment(config)
        _refuse_what_cannot_resume(exp)
        filesystems.check_reachable(data_root(exp), "data.dir")  # before tokenizers are fitted into run.dir
        if ns.address:
            from mot_core.distributed.tokenize import tokenize_on_ray

            report = tokenize_on_ray(config, ns.address, force=ns.force, reader=ns.reader or "ray")
        else:
            vocab = prepare_vocabulary(exp)
            try:
                report = tokenize_locally(exp, vocab, force=ns.force)
            except OSError as exc:
                raise filesystems.write_failure(exc, data_root(exp), "data.dir", "writing the shards") from None
    if not report:
        print(f"every source is already tokenized in {data_root(exp)} (--force writes them again)")
        return 0
    for name, counts in report.items():
        print(f"{name}: {counts['documents']:,} documents, {counts['tokens']:,} tokens, {counts['shards']} shards"
              f"{describe_skipped(counts)}")
    print(f"shards in {data_root(exp)}")
    return 0


def _refuse_what_cannot_resume(exp) -> None:
    """Shards for a config whose run folder holds checkpoints made with other data settings
    (``paths``, ``val_fraction``, ...) would only be refused by the run's resume: the same one
    line now, before any shard is rewritten (``--force`` included)."""
    from mot_core import filesystems
    from mot_core.training import checkpoint as ckpt
    from mot_core.training.resume import resume_changes

    if filesystems.is_uri(exp.config.run.dir) or not exp.run_dir.is_dir():
        return  # a run in an object store is checked by its own start, which pulls it
    latest = ckpt.latest_intact(exp.run_dir, report=lambda line: None)
    if latest is not None and (latest / "config.yaml").is_file() and exp.config.run.resume != "never":
        resume_changes((latest / "config.yaml").read_text(), exp.resolved_yaml(), str(latest))


def register(sub) -> None:
    config_command(sub, "data", "prepare", "render/convert the config's datasets on disk (idempotent)", cmd_data_prepare)
    p = config_command(sub, "data", "tokenize", "encode every source once into shards that training streams "
                       "(missing parts only; fits tokenizers first)", cmd_data_tokenize)
    p.add_argument("--force", action="store_true", help="delete the config's shards and write them again")
    p.add_argument("--address", default=None,
                   help="run it as a Ray Data job on the Ray cluster at this address (local: a Ray instance here)")
    p.add_argument("--reader", choices=("ray", "source"), default=None,
                   help="with --address: ray (default) reads Parquet, WebDataset tars and JSON lines with Ray Data's "
                   "own readers, other files with the sources' readers; source: the sources' readers for every "
                   "part (they name or skip a record Ray Data's readers cannot read)")
    p = config_command(sub, "tokenizer", "fit", "train the config's learned tokenizers (e.g. the VQ image tokenizer)",
                       cmd_tokenizer_fit)
    p.add_argument("--force", action="store_true", help="refit even if a matching tokenizer is saved")
