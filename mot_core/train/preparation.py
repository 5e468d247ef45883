"""Steps before training that write to disk: ``mot data prepare`` and ``mot tokenizer fit``."""

from __future__ import annotations

from mot_core.config import RunConfig
from mot_core.errors import MotError
from mot_core.train.experiment import build_experiment, source_documents


def data_prepare(config: RunConfig, progress: bool = True) -> dict:
    exp = build_experiment(config)
    return {name: source.prepare(progress=progress) for name, source in exp.sources.items()}


def tokenizer_fit(config: RunConfig, progress: bool = True, force: bool = False) -> dict:
    """Fit every modality tokenizer that needs a separate fitting step, on the run's data."""
    exp = build_experiment(config)
    train = [d for n, s in exp.sources.items() for d in source_documents(n, s, "train")]
    val = [d for n, s in exp.sources.items() for d in source_documents(n, s, "val")]
    reports = {}
    for name, modality in exp.modalities.items():
        report = modality.fit(train, val, progress=progress, force=force)
        if report:
            reports[name] = report
    if not reports:
        raise MotError("no modality in this config has a tokenizer to fit separately")
    return reports
