"""Steps before training that write to disk: ``mot data prepare`` and ``mot tokenizer fit``."""

from __future__ import annotations

from mot_core.config import RunConfig
from mot_core.errors import MotError
from mot_core.train.experiment import build_experiment
from mot_core.train.tokenize import sample_documents


def data_prepare(config: RunConfig, progress: bool = True) -> dict:
    exp = build_experiment(config)
    return {name: source.prepare(progress=progress) for name, source in exp.sources.items()}


def tokenizer_fit(config: RunConfig, progress: bool = True, force: bool = False) -> dict:
    """Fit every modality tokenizer that needs a separate fitting step, on a bounded sample
    of the run's data (``data.fit_sample_documents`` documents of each source and split)."""
    exp = build_experiment(config)
    limit = config.data.fit_sample_documents
    train = [d for n, s in exp.sources.items() for d in sample_documents(n, s, "train", limit)]
    val = [d for n, s in exp.sources.items() for d in sample_documents(n, s, "val", limit)]
    reports = {}
    for name, modality in exp.modalities.items():
        report = modality.fit(train, val, progress=progress, force=force)
        if report:
            reports[name] = report
    if not reports:
        raise MotError("no modality in this config has a tokenizer to fit separately")
    return reports
