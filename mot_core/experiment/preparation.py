"""Steps before training that write to disk: ``mot data prepare`` and ``mot tokenizer fit``."""

from __future__ import annotations

from mot_core.config import RunConfig
from mot_core.errors import MotError
from mot_core.plugin_api import Modality
from mot_core.experiment.provenance import describe_training_data, other_data_message, read_record, shared_folder, write_record
from mot_core.experiment.build import build_experiment
from mot_core.experiment.tokenize import num_parts, sample_documents


def data_prepare(config: RunConfig, progress: bool = True) -> dict:
    exp = build_experiment(config)
    return {name: source.prepare(progress=progress) for name, source in exp.sources.items()}


def tokenizer_fit(config: RunConfig, progress: bool = True, force: bool = False, report=print) -> dict:
    """Fit every modality tokenizer that needs a separate fitting step, on a bounded sample
    of the run's data (``data.fit_sample_documents`` documents of each source and split).

    A tokenizer in a shared folder (``Modality.tokenizer_folder``) records the data it was
    fitted on (``experiment/provenance.py``); one fitted on other data is neither kept nor
    overwritten without ``force``. Returns each fitted (or kept) modality's report; empty when
    no modality of the config has a separate fitting step (text BPE fits inside ``mot train``)."""
    exp = build_experiment(config)
    fitting = {name: modality for name, modality in exp.modalities.items() if type(modality).fit is not Modality.fit}
    if not fitting:
        return {}
    samples = _FitSample(exp, config.data.fit_sample_documents)
    train, val = samples.documents("train"), samples.documents("val")
    wanted = {}
    for name, modality in fitting.items():
        folder = shared_folder(modality, name)
        current = describe_training_data(exp, name, samples.sample) if folder is not None else None
        saved = read_record(folder) if folder is not None else None
        if saved is not None and saved["digest"] != current["digest"] and not force:
            raise MotError(other_data_message(name, folder, saved, current))
        wanted[name] = (modality, folder, current, saved)
    reports = {}
    for name, (modality, folder, current, saved) in wanted.items():
        result = modality.fit(train, val, progress=progress, force=force)
        fitted = bool(result) and "kept" not in result
        if folder is not None and (fitted or saved is not None):
            write_record(folder, current)  # fitted now, or kept and already recorded for this data (or --force)
        elif folder is not None:
            report(f"note: the tokenizer kept in {folder} has no record of the data it was fitted on; "
                   "`mot tokenizer fit --force` refits it and records it")
        if result:
            reports[name] = result
    return reports


class _FitSample:
    """The fit sample of every source and split, read once: the provenance probe (the first
    documents of a one-part source) is served from it instead of being read again."""

    def __init__(self, exp, limit: int):
        self.exp, self.limit = exp, limit
        self.read: dict[tuple[str, str], list] = {}

    def documents(self, split: str) -> list:
        return [d for name, source in self.exp.sources.items() for d in self._read(name, source, split)]

    def _read(self, name: str, source, split: str) -> list:
        if (name, split) not in self.read:
            self.read[(name, split)] = list(sample_documents(name, source, split, self.limit))
        return self.read[(name, split)]

    def sample(self, name: str, source, split: str, limit: int):
        """``sample_documents``, from the documents already read where they are its prefix."""
        if limit <= self.limit and num_parts(name, source, split) == 1:
            return iter(self._read(name, source, split)[:limit])
        return sample_documents(name, source, split, limit)
