"""``mot data prepare``, ``mot tokenizer fit``, ``mot generate`` and ``mot compare``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from mot_core import checkpoint as ckpt
from mot_core.bench.matching import ema
from mot_core.config import RunConfig, validate_config
from mot_core.errors import MotError
from mot_core.data import Vocabulary
from mot_core.experiment import Experiment, PreparedData, build_experiment, model_args, prepare_data, prepare_vocabulary
from mot_core.generation import SamplingParams
from mot_core.sampling import prompt_to_span, span_to_text
from mot_core.model import MoTTransformer
from mot_core.plotting import finish, panels
from mot_core.trainer import resolve_device


def data_prepare(config: RunConfig, progress: bool = True) -> dict:
    exp = build_experiment(config)
    return {name: source.prepare(progress=progress) for name, source in exp.sources.items()}


def tokenizer_fit(config: RunConfig, progress: bool = True, force: bool = False) -> dict:
    """Fit every modality tokenizer that needs a separate fitting step, on the run's data."""
    exp = build_experiment(config)
    train = [d for s in exp.sources.values() for d in s.documents("train")]
    val = [d for s in exp.sources.values() for d in s.documents("val")]
    reports = {}
    for name, modality in exp.modalities.items():
        report = modality.fit(train, val, progress=progress, force=force)
        if report:
            reports[name] = report
    if not reports:
        raise MotError("no modality in this config has a tokenizer to fit separately")
    return reports


def load_run(checkpoint: Path, with_data: bool = True) -> tuple[Experiment, Vocabulary, PreparedData | None, MoTTransformer, dict]:
    """Checkpoint folder (or run folder: its newest checkpoint) -> experiment, vocabulary,
    tokenized data (None unless ``with_data``), model, meta."""
    if not checkpoint.exists():
        raise MotError(f"checkpoint not found: {checkpoint}")
    if not (checkpoint / "meta.json").is_file():
        found = ckpt.list_checkpoints(checkpoint)
        if not found:
            raise MotError(f"{checkpoint} is neither a checkpoint nor a run folder with checkpoints")
        checkpoint = found[-1]
    meta = ckpt.read_meta(checkpoint)
    config = validate_config(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    exp = build_experiment(config)
    data = prepare_data(exp) if with_data else None
    vocab = data.vocab if data is not None else prepare_vocabulary(exp)
    args = model_args(config, vocab)
    ckpt.check_compatible(meta["model_args"], args, checkpoint)
    model = MoTTransformer(args).to(resolve_device(config.run.device))
    model.load_state_dict(ckpt.load_weights(checkpoint))
    return exp, vocab, data, model.eval(), meta


def generate_samples(checkpoint: Path, prompts: list[str], image_files: list[str], out: Path, samples: int,
                     params: SamplingParams, seed: int, text: str, image: str) -> dict:
    """``--prompt`` payloads of the ``text`` modality become ``image`` spans written to ``out``;
    ``--image`` files of the ``image`` modality are continued in ``text``."""
    exp, vocab, _, model, meta = load_run(checkpoint, with_data=False)
    for name in (text, image):
        if name not in vocab.modalities:
            raise MotError(f"this run has no modality '{name}'; it has: {', '.join(vocab.names)}")
    result: dict = {"step": meta["step"]}
    if prompts:
        captions = [p for p in prompts for _ in range(samples)]
        images = prompt_to_span(model, vocab, captions, text, image, params, seed=seed)
        result["grid"] = str(vocab.modalities[image].write_payloads(list(images), out, captions))
    if image_files:
        payloads = [vocab.modalities[image].read_payload(Path(f)) for f in image_files]
        result["captions"] = dict(zip(image_files, span_to_text(model, vocab, payloads, image, text, params, seed=seed)))
    return result


def compare_runs(runs: list[Path], plot: Path | None) -> str:
    """A table of each run's final validation metrics side by side, and their loss curves."""
    records = {}
    for run in runs:
        file = run / "metrics.jsonl"
        if not file.is_file():
            raise MotError(f"no metrics.jsonl in {run}")
        records[run.name] = [json.loads(line) for line in file.read_text().splitlines() if line]
    finals = {name: next((r for r in reversed(recs) if any(k.startswith("val/") for k in r)), {}) for name, recs in records.items()}
    keys = sorted({k for f in finals.values() for k in f if k.startswith("val/") and k.endswith("/loss")})
    width = max(len(k) for k in keys + ["metric"])
    names = list(records)
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{n:>22}" for n in names)]
    lines.append(f"{'step':<{width}}  " + "  ".join(f"{finals[n].get('step', float('nan')):>22}" for n in names))
    for key in keys:
        lines.append(f"{key:<{width}}  " + "  ".join(f"{finals[n].get(key, float('nan')):>22.4f}" for n in names))
    if plot is not None:
        _plot(records, plot)
        lines.append(f"plot: {plot}")
    return "\n".join(lines)


def _plot(records: dict[str, list[dict]], path: Path) -> None:
    modalities = sorted({k.split("/")[1] for recs in records.values() for r in recs for k in r if k.startswith("loss/")})
    fig, axes = panels(len(modalities), width=5.0, height=3.6)
    for ax, modality in zip(axes, modalities):
        for name, recs in records.items():
            steps = [r["step"] for r in recs if f"loss/{modality}" in r]
            values = np.array([r[f"loss/{modality}"] for r in recs if f"loss/{modality}" in r])
            line, = ax.plot(steps, ema(values, 0.9), label=f"{name} (train, EMA 0.9)", alpha=0.9)
            val = [(r["step"], r[f"val/{modality}/loss"]) for r in recs if f"val/{modality}/loss" in r]
            if val:
                ax.plot(*zip(*val), "o--", color=line.get_color(), label=f"{name} (val)")
        ax.set_title(f"{modality} loss")
    finish(fig, axes, path)
