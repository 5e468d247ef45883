"""Build a run from a validated config: plugins' modalities, losses, data and the model args.

This is where registry lookups and plugin option validation happen, once, before training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mot_core import filesystems
from mot_core.config import RunConfig, dump_config, validate_section
from mot_core.data import Batch, Vocabulary
from mot_core.data.packing import ExtrasSampler
from mot_core.errors import MotError, plugin_boundary
from mot_core.devices.meta import parameters_on_meta
from mot_core.model.moe import MoEArgs
from mot_core.model.rope import RopeScaling
from mot_core.model.transformer import ModalityModules, ModelArgs, MoTTransformer
from mot_core.plugin_api import DataSource, Evaluator, Loss, Modality, origin
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
    plugin_options: dict[str, Any] = field(default_factory=dict)
    # (modality, evaluator name) -> the evaluator's validated options
    evaluator_options: dict[tuple[str, str], Any] = field(default_factory=dict)

    def resolved_yaml(self) -> str:
        return dump_config(self.config, self.plugin_options)


def build_experiment(config: RunConfig, registry: Registry | None = None, run_dir: Path | None = None) -> Experiment:
    """``run_dir``: where this process keeps the run's files, when not ``run.dir`` (a launch
    worker on a node that does not see the driver's run folder)."""
    registry = registry or get_registry()
    run_dir = Path(run_dir or filesystems.local_folder(config.run.dir))
    modalities, losses, weights, evaluators, options = {}, {}, {}, {}, {}
    evaluator_options: dict[tuple[str, str], Any] = {}
    for name, entry in config.mixture.modalities.items():
        where = f"mixture.modalities.{name}"
        cls = registry.get("modalities", name, "mixture.modalities")
        opts = validate_section(cls.Options, entry.options, f"{where}.options")
        options[f"mixture.modalities.{name}.options"] = opts.model_dump(mode="json")
        with plugin_boundary(f"{origin(cls)}: modality '{name}', __init__"):
            modalities[name] = cls(opts, run_dir / "state" / name)
        loss_name = entry.loss or cls.default_loss
        loss_cls = registry.get("losses", loss_name, f"{where}.loss")
        loss_opts = validate_section(loss_cls.Options, entry.loss_options, f"{where}.loss_options")
        options[f"{where}.loss_options"] = loss_opts.model_dump(mode="json")
        with plugin_boundary(f"{origin(loss_cls)}: loss '{loss_name}' of modality '{name}', __init__"):
            losses[name] = loss_cls(loss_opts)
        losses[name].modality = modalities[name]
        weights[name] = entry.loss_weight
        options[f"{where}.loss"] = loss_name  # shown resolved by `mot config show`
        names = entry.evaluators if entry.evaluators is not None else list(cls.default_evaluators)
        options[f"{where}.evaluators"] = list(names)
        evaluators[name] = [registry.get("evaluators", e, f"{where}.evaluators") for e in names]
        unknown = [e for e in entry.evaluator_options if e not in names]
        if unknown:
            raise MotError(f"{where}.evaluator_options names '{unknown[0]}', which is not one of this modality's "
                           f"evaluators ({', '.join(names) or 'none'}); list it under {where}.evaluators")
        resolved = {}
        for ev_cls in evaluators[name]:
            ev_opts = validate_section(ev_cls.Options, entry.evaluator_options.get(ev_cls.name),
                                       f"{where}.evaluator_options.{ev_cls.name}")
            evaluator_options[(name, ev_cls.name)] = ev_opts
            resolved[ev_cls.name] = ev_opts.model_dump(mode="json")
        options[f"{where}.evaluator_options"] = resolved
    sources, source_weights = {}, {}
    for name, entry in config.mixture.datasets.items():
        cls = registry.get("datasets", name, "mixture.datasets")
        opts = validate_section(cls.Options, entry.options, f"mixture.datasets.{name}.options")
        options[f"mixture.datasets.{name}.options"] = opts.model_dump(mode="json")
        with plugin_boundary(f"{origin(cls)}: dataset '{name}', __init__"):
            source = cls(opts)
        missing = [m for m in source.modalities if m not in modalities]
        if missing:
            raise MotError(
                f"dataset '{name}' yields {', '.join(source.modalities)} but mixture.modalities lacks {', '.join(missing)}"
            )
        source._mot_on_bad_record = config.data.on_bad_record  # read by experiment.tokenize.iter_documents
        sources[name], source_weights[name] = source, entry.weight
    # Modalities sharing a tower sit next to each other, so each tower is one contiguous block
    # of the modality-sorted stream (groups in order of first appearance).
    leaders = list(dict.fromkeys(config.mixture.modalities[n].tower.group or n for n in modalities))
    modalities = {n: modalities[n] for leader in leaders for n in modalities
                  if (config.mixture.modalities[n].tower.group or n) == leader}
    fed = {m for source in sources.values() for m in source.modalities}
    starved = [m for m in modalities if m not in fed]
    if starved:
        raise MotError(f"no dataset in mixture.datasets provides modality {', '.join(starved)}")
    return Experiment(config, run_dir, modalities, losses, weights, evaluators, sources, source_weights, options,
                      evaluator_options)


def check_model_shape(config: RunConfig) -> None:
    """One line for a model shape the transformer cannot take (before any tokenizer is fitted)."""
    m = config.model
    if config.train.seq_len > m.max_seq_len:
        raise MotError(f"train.seq_len={config.train.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if m.dim % m.n_heads:
        raise MotError(f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}")
    if m.n_kv_heads and m.n_heads % m.n_kv_heads:
        raise MotError(f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads}")
    if (m.dim // m.n_heads) % 2:
        raise MotError(f"head dimension model.dim/model.n_heads={m.dim // m.n_heads} must be even for RoPE")


def model_args(config: RunConfig, vocab: Vocabulary) -> ModelArgs:
    check_model_shape(config)
    m = config.model
    modalities = config.mixture.modalities
    leaders = list(dict.fromkeys(modalities[name].tower.group or name for name in vocab.names))
    groups = tuple(leaders.index(modalities[name].tower.group or name) for name in vocab.names)
    kinds = tuple(_moe_args(modalities[name].tower.ffn or m.ffn) for name in vocab.names)
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
        norm_placement=m.norm_placement,
        activation_checkpointing=m.activation_checkpointing,
        groups=groups if groups != tuple(range(len(groups))) else (),
        ffn_kinds=kinds if any(kinds) else (),
        rope_scaling=None if m.rope_scaling is None else RopeScaling(
            kind=m.rope_scaling.type, factor=m.rope_scaling.factor, low_freq_factor=m.rope_scaling.low_freq_factor,
            high_freq_factor=m.rope_scaling.high_freq_factor,
            original_max_position=m.rope_scaling.original_max_position_embeddings),
        frozen_groups=tuple(sorted({groups[i] for i, name in enumerate(vocab.names)
                                    if not modalities[name].tower.trainable})),
        frozen_rows=tuple((vocab.offsets[name], vocab.offsets[name] + vocab.modalities[name].vocab_size)
                          for name in vocab.names if not modalities[name].tower.vocab_rows_trainable),
    )


def _moe_args(ffn) -> MoEArgs | None:
    if ffn.type != "moe":
        return None
    return MoEArgs(
        experts=ffn.experts, router=ffn.router, top_k=ffn.top_k, capacity_factor=ffn.capacity_factor,
        balance=ffn.balance, aux_loss_weight=ffn.aux_loss_weight, z_loss_weight=ffn.z_loss_weight,
        bias_rate=ffn.bias_rate, inference_router=ffn.inference_router, inference_top_k=ffn.inference_top_k,
    )


def build_model(args: ModelArgs, vocab: Vocabulary, empty_core: bool = False) -> MoTTransformer:
    """The MoT model with every modality's own modules (input adapter, output head) built
    from its validated options. A modality with continuous inputs must build an adapter.

    ``empty_core``: the engine's parameters (embedding, towers, head) on the meta device, for
    a sharded start that allocates each worker's shards only (``parallel.materialize``);
    plugin modules are built for real, with their own initialisation."""
    owned = {}
    for index, name in enumerate(vocab.names):
        modality = vocab.modalities[name]
        where = f"{origin(modality)}: modality '{name}'"
        built = {}
        for what in ("build_adapter", "build_head"):
            with plugin_boundary(f"{where}, {what}"):
                module = getattr(modality, what)(args.dim)
            if module is not None and not isinstance(module, torch.nn.Module):
                raise MotError(f"{where}: {what}() returned {type(module).__name__}, expected a torch.nn.Module or None")
            built[what] = module
        adapter, head = built["build_adapter"], built["build_head"]
        if modality.input_dim is not None and adapter is None:
            raise MotError(f"{where} declares input_dim={modality.input_dim} but build_adapter() returned None")
        if adapter is not None or head is not None:
            owned[name] = ModalityModules(index, adapter, head, owner=origin(modality))
    if empty_core:
        with parameters_on_meta():
            return MoTTransformer(args, owned)
    return MoTTransformer(args, owned)


def extras_sampler(exp: Experiment, vocab: Vocabulary) -> ExtrasSampler | None:
    """The function that fills ``Batch.extras`` from each loss's ``sample_extras`` when a batch
    is built, or None when no loss of the run draws extras."""
    drawing = {name: loss for name, loss in exp.losses.items() if type(loss).sample_extras is not Loss.sample_extras}
    if not drawing:
        return None

    def sample(batch: Batch, generator: torch.Generator) -> None:
        for name, (_, _, piece) in batch.modality_slices(vocab).items():
            if name not in drawing:
                continue
            extras = drawing[name].sample_extras(piece, generator)
            where = f"loss '{drawing[name].name}' of modality '{name}': sample_extras()"
            if not isinstance(extras, dict):
                raise MotError(f"{where} returned {type(extras).__name__}, expected a dict of tensors")
            for key, value in extras.items():
                if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != len(piece):
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise MotError(f"{where}['{key}'] is {shape}, expected a tensor of {len(piece)} rows (one per position)")
            batch.extras[piece.index] = extras

    return sample
