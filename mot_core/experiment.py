"""Build a run from a validated config: plugins' modalities, losses, data and the model args.

This is where registry lookups and plugin option validation happen, once, before training.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mot_core.config import RunConfig, dump_config, validate_section
from mot_core.data import TokenDocument, Vocabulary
from mot_core.errors import MotError
from mot_core.model import ModelArgs
from mot_core.plugin_api import DataSource, Evaluator, Loss, Modality, RawDocument
from registry import Registry, get_registry


@dataclass
class Experiment:
    config: RunConfig
    run_dir: Path
    modalities: dict[str, Modality]
    losses: dict[str, Loss]
    loss_weights: dict[str, float]
    evaluators: dict[str, list[type[Evaluator]]]
    sources: dict[str, DataSource]
    source_weights: dict[str, float]
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def resolved_yaml(self) -> str:
        return dump_config(self.config, self.plugin_options)


def build_experiment(config: RunConfig, registry: Registry | None = None) -> Experiment:
    registry = registry or get_registry()
    run_dir = Path(config.run.dir)
    modalities, losses, weights, evaluators, options = {}, {}, {}, {}, {}
    for name, entry in config.mixture.modalities.items():
        where = f"mixture.modalities.{name}"
        cls = registry.get("modalities", name, "mixture.modalities")
        opts = validate_section(cls.Options, entry.options, f"{where}.options")
        options[f"mixture.modalities.{name}.options"] = opts.model_dump(mode="json")
        modalities[name] = cls(opts, run_dir / "state" / name)
        loss_name = entry.loss or cls.default_loss
        loss_cls = registry.get("losses", loss_name, f"{where}.loss")
        loss_opts = validate_section(loss_cls.Options, entry.loss_options, f"{where}.loss_options")
        options[f"{where}.loss_options"] = loss_opts.model_dump(mode="json")
        losses[name] = loss_cls(loss_opts)
        weights[name] = entry.loss_weight
        names = entry.evaluators if entry.evaluators is not None else list(cls.default_evaluators)
        evaluators[name] = [registry.get("evaluators", e, f"{where}.evaluators") for e in names]
    sources, source_weights = {}, {}
    for name, entry in config.mixture.datasets.items():
        cls = registry.get("datasets", name, "mixture.datasets")
        opts = validate_section(cls.Options, entry.options, f"mixture.datasets.{name}.options")
        options[f"mixture.datasets.{name}.options"] = opts.model_dump(mode="json")
        source = cls(opts)
        missing = [m for m in source.modalities if m not in modalities]
        if missing:
            raise MotError(
                f"dataset '{name}' yields {', '.join(source.modalities)} but mixture.modalities lacks {', '.join(missing)}"
            )
        sources[name], source_weights[name] = source, entry.weight
    fed = {m for source in sources.values() for m in source.modalities}
    starved = [m for m in modalities if m not in fed]
    if starved:
        raise MotError(f"no dataset in mixture.datasets provides modality {', '.join(starved)}")
    return Experiment(config, run_dir, modalities, losses, weights, evaluators, sources, source_weights, options)


def apply_tower_defaults(raw: dict[str, Any], registry: Registry | None = None) -> dict[str, Any]:
    """Fill ``mixture.modalities.<name>.tower`` with plugin defaults under the user's keys."""
    registry = registry or get_registry()
    modalities = (raw.get("mixture") or {}).get("modalities") or {}
    if isinstance(modalities, dict):
        for name, entry in modalities.items():
            entry = entry if isinstance(entry, dict) else {}
            defaults = registry.tower_defaults(name)
            if defaults:
                entry["tower"] = {**defaults, **(entry.get("tower") or {})}
                modalities[name] = entry
    return raw


@dataclass
class PreparedData:
    vocab: Vocabulary
    train: dict[str, list[TokenDocument]]
    val: list[TokenDocument]
    raw_val: list[RawDocument]  # the held-out documents before tokenization (model-level metrics)


def prepare_vocabulary(exp: Experiment, raw_train: dict[str, list[RawDocument]] | None = None) -> Vocabulary:
    """Reload (or fit, on the training payloads) each modality's tokenizer.

    Training documents are read lazily: a run whose tokenizers are saved never loads them."""

    def payloads(name: str):
        docs_by_source = raw_train if raw_train is not None else {n: s.documents("train") for n, s in exp.sources.items()}
        for docs in docs_by_source.values():
            for doc in docs:
                yield from (seg.payload for seg in doc.segments if seg.modality == name)

    for name, modality in exp.modalities.items():
        modality.prepare(payloads(name))
    return Vocabulary(exp.modalities)


def prepare_data(exp: Experiment) -> PreparedData:
    """Load every source, fit (or reload) each modality's tokenizer on training data, tokenize."""
    raw_train: dict[str, list[RawDocument]] = {n: s.documents("train") for n, s in exp.sources.items()}
    raw_val: dict[str, list[RawDocument]] = {n: s.documents("val") for n, s in exp.sources.items()}
    vocab = prepare_vocabulary(exp, raw_train)
    train = {n: vocab.tokenize(docs, n) for n, docs in raw_train.items()}
    # Round-robin across sources so a limited validation budget still covers every source.
    val_by_source = [vocab.tokenize(docs, n) for n, docs in raw_val.items()]
    val = [doc for group in itertools.zip_longest(*val_by_source) for doc in group if doc is not None]
    for name, docs in train.items():
        if not docs:
            raise MotError(f"dataset '{name}' produced no tokens in its 'train' split")
    return PreparedData(vocab, train, val, [d for docs in raw_val.values() for d in docs])


def model_args(config: RunConfig, vocab: Vocabulary) -> ModelArgs:
    m = config.model
    if config.train.seq_len > m.max_seq_len:
        raise MotError(f"train.seq_len={config.train.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if m.dim % m.n_heads:
        raise MotError(f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}")
    if m.n_kv_heads and m.n_heads % m.n_kv_heads:
        raise MotError(f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads}")
    if (m.dim // m.n_heads) % 2:
        raise MotError(f"head dimension model.dim/model.n_heads={m.dim // m.n_heads} must be even for RoPE")
    modalities = config.mixture.modalities
    return ModelArgs(
        vocab_size=vocab.size,
        num_modalities=len(vocab.names),
        dim=m.dim,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads,
        ffn_hidden=m.ffn_hidden,
        untie_ffn=m.untie.ffn,
        untie_attention=m.untie.attention,
        untie_norm=m.untie.norm,
        qk_norm=tuple(modalities[name].tower.qk_norm for name in vocab.names),
        norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        max_seq_len=m.max_seq_len,
        attention_backend=m.attention_backend,
        init_std=m.init_std,
        tie_embeddings=m.tie_embeddings,
        activation_checkpointing=m.activation_checkpointing,
    )
