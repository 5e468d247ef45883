"""``mot export RUN --format hf`` without ``--modality``: the whole MoT model as a Hugging Face
folder that ``transformers`` loads with ``trust_remote_code=True``, without this package.

The folder holds ``config.json`` (``model_type: mot`` and an ``auto_map``), the model's code
(``configuration_mot.py``, ``modeling_mot.py``, ``processing_mot.py``, copied from
``mot_core.hf.remote``), safetensors shards and their index, ``generation_config.json``, each
modality's codec in a folder of its own (``Modality.export_hf``), ``processor_config.json``
and a model card. Everything is checked before the first file is written: a model with a part
the export cannot carry (a continuous modality's adapter, a modality without a codec, a
non-causal inference router) is refused in one line, never written partially.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mot_core.errors import MotError
from mot_core.model.frozen import assembled
from mot_core.model.towers import default_ffn_hidden
from mot_core.model.transformer import whole_tensors
from mot_core.plugin_api import HFCodec, Modality, origin
from mot_core.runs.reopen import load_run

REMOTE = Path(__file__).resolve().parent.parent / "hf" / "remote"
CODE_FILES = ("configuration_mot.py", "modeling_mot.py", "processing_mot.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SHARD_SIZE = "5GB"


def export_whole_model(run: str | Path, out: Path, dtype: str | None = None) -> str:
    """Write the run's newest intact checkpoint (or the checkpoint named) as a whole MoT model
    into ``out`` (new or empty); returns the line that says what was written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MotError(f"--out {out} exists and is not an empty folder; give a new folder")
    exp, vocab, _, model, meta = load_run(run, with_data=False)
    model = model.cpu().eval()
    check_exportable(vocab, model)
    config = model_config(model, vocab)
    config["torch_dtype"] = dtype or "float32"
    target = DTYPES[config["torch_dtype"]]
    out.mkdir(parents=True, exist_ok=True)
    try:
        codecs = _write_codecs(vocab, out)
        _write_root_tokenizer(vocab, out, config["max_position_embeddings"])
        sizes = _write_weights(model, out, target)
        for name in CODE_FILES:
            shutil.copyfile(REMOTE / name, out / name)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        (out / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2))
        (out / "processor_config.json").write_text(json.dumps({
            "processor_class": "MoTProcessor", "auto_map": {"AutoProcessor": "processing_mot.MoTProcessor"},
            "text_modality": _text_modality(vocab), "modalities": codecs}, indent=2))
        (out / "README.md").write_text(model_card(exp, vocab, model, config, meta, run))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never a partial export
        raise
    total = sum(sizes.values())
    return (f"exported the whole model of step {meta['step']} ({model.parameter_counts()['total'] / 1e6:.2f}M "
            f"parameters, {len(vocab.names)} modalities: {', '.join(vocab.names)}) to {out}: {len(sizes)} "
            f"safetensors file(s), {total / 1e6:.1f} MB; load it with AutoModelForCausalLM.from_pretrained(folder, "
            "trust_remote_code=True)")


def check_exportable(vocab, model) -> None:
    """One line for the first part of the model the export cannot carry."""
    continuous = [n for n in vocab.names if vocab.modalities[n].input_dim is not None]
    if continuous:
        name = continuous[0]
        raise MotError(f"modality '{name}' ({origin(vocab.modalities[name])}) has continuous values: its input "
                       "adapter, output head and sampler are not exported, so the whole model cannot be; export "
                       "a token modality's tower with --modality (e.g. --modality text)")
    for name in vocab.names:
        if type(vocab.modalities[name]).export_hf is Modality.export_hf:
            raise MotError(f"modality '{name}' ({origin(vocab.modalities[name])}) has no Hugging Face codec "
                           "(Modality.export_hf): its ids could not be encoded or decoded without this package; "
                           "add export_hf to the plugin, or export one tower with --modality")
    for kind in model.args.ffn_tower_kinds():
        if kind is not None and kind.inference_router != "top_k":
            raise MotError("an FFN tower routes expert-choice at inference (ffn.inference_router=expert_choice): it "
                           "is not causal, so generate() could not reproduce it; evaluate with inference_router=top_k "
                           "to export")


def model_config(model, vocab) -> dict[str, Any]:
    """``config.json`` of the exported model (``MoTConfig``)."""
    args = model.args
    host = vocab.marker_host
    modalities = [{"name": n, "start": vocab.offsets[n], "size": vocab.modalities[n].vocab_size, "host": host[n]}
                  for n in vocab.names]
    kinds = []
    for kind in args.ffn_tower_kinds():
        if kind is None:
            kinds.append(None)
            continue
        k = kind.top_k if kind.router == "top_k" else kind.inference_top_k
        kinds.append({"experts": kind.experts, "top_k": k, "balance": kind.balance})
    scaling = None
    if args.rope_scaling is not None:
        s = args.rope_scaling
        scaling = {"kind": s.kind, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor, "original_max_position": s.original_max_position}
    grammars = []
    for name in vocab.names:
        grammar = vocab.modalities[name].span_grammar()
        if grammar is not None:
            off = vocab.offsets[name]
            grammars.append({"modality": name, "begin": off + grammar.begin, "end": off + grammar.end,
                             "body_lo": off + grammar.body_lo, "body_hi": off + grammar.body_hi,
                             "length": grammar.length})
    config = {
        "architectures": ["MoTForCausalLM"], "model_type": "mot",
        "auto_map": {"AutoConfig": "configuration_mot.MoTConfig",
                     "AutoModelForCausalLM": "modeling_mot.MoTForCausalLM"},
        "vocab_size": vocab.size, "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "intermediate_size": args.ffn_hidden or default_ffn_hidden(args.dim), "rms_norm_eps": args.norm_eps,
        "rope_base": args.rope_theta, "rope_frequency_scaling": scaling, "max_position_embeddings": args.max_seq_len,
        "norm_placement": args.norm_placement, "modalities": modalities, "tower_groups": list(args.tower_groups),
        "attention_towers": args.towers(args.untie_attention), "ffn_towers": args.towers(args.untie_ffn),
        "norm_towers": args.towers(args.untie_norm), "qk_norm": list(args.qk_norm or [False] * args.num_modalities),
        "ffn_kinds": kinds, "span_grammars": grammars, "tie_word_embeddings": args.tie_embeddings,
        "torch_dtype": "float32",
    }
    text = _text_modality(vocab)
    if text is not None and vocab.modalities[text].stop_token is not None:
        stop = vocab.offsets[text] + int(vocab.modalities[text].stop_token)
        config.update(eos_token_id=stop, pad_token_id=stop)
    return config


def generation_config(config: dict) -> dict[str, Any]:
    """Greedy by default, ending at the text stop id; the span rules live in ``generate``."""
    out: dict[str, Any] = {"_from_model_config": False}
    for key in ("eos_token_id", "pad_token_id"):
        if key in config:
            out[key] = config[key]
    return out


def _text_modality(vocab) -> str | None:
    """The modality a bare string prompt belongs to: 'text' if present, else the first
    modality with a stop token."""
    if "text" in vocab.names:
        return "text"
    return next((n for n in vocab.names if vocab.modalities[n].stop_token is not None), None)


def _write_codecs(vocab, out: Path) -> list[dict[str, Any]]:
    """Each modality's codec into ``out/<name>/``, with its code; the processor's entries."""
    entries = []
    for name in vocab.names:
        modality = vocab.modalities[name]
        folder = out / name
        codec = modality.export_hf(folder)
        if not isinstance(codec, HFCodec):
            raise MotError(f"{origin(modality)}: modality '{name}', export_hf returned {type(codec).__name__}, "
                           "expected an HFCodec")
        for file in codec.code:
            shutil.copyfile(file, folder / Path(file).name)
        entry: dict[str, Any] = {"name": name, "start": vocab.offsets[name], "size": modality.vocab_size,
                                 "codec": {"folder": name, "class": codec.class_name, "settings": codec.settings}}
        if modality.stop_token is not None:
            entry["stop"] = int(modality.stop_token)
        grammar = modality.span_grammar()
        if grammar is not None:
            entry.update(begin=grammar.begin, end=grammar.end, length=grammar.length)
        entries.append(entry)
    return entries


def _write_root_tokenizer(vocab, out: Path, max_length: int) -> None:
    """When the text modality's ids start at 0 (its tokenizer's ids are the model's), its
    tokenizer also goes to the folder's root, so that ``AutoTokenizer`` and text-only tools
    (evaluation harnesses) read the folder as a causal language model's."""
    from tokenizers import Tokenizer

    text = _text_modality(vocab)
    modality = vocab.modalities[text] if text is not None else None
    tokenizer = getattr(modality, "tokenizer", None)
    if modality is None or vocab.offsets[text] != 0 or not isinstance(tokenizer, Tokenizer):
        return
    tokenizer.save(str(out / "tokenizer.json"))
    settings: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length}
    if modality.stop_token is not None:
        stop = tokenizer.id_to_token(int(modality.stop_token))
        settings.update(eos_token=stop, pad_token=stop)
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


def exported_tensors(model) -> dict[str, torch.Tensor]:
    """The exported model's state dict: the trainer's names under ``model.`` (the head as
    ``lm_head.weight``), frozen and trainable rows put back together."""
    return {key if key.startswith("lm_head.") else f"model.{key}": assembled(module, attr).detach()
            for key, (module, attr, _) in whole_tensors(model).items()}


def _write_weights(model, out: Path, dtype: torch.dtype) -> dict[str, int]:
    """Safetensors shards (and their index when there are several); file -> bytes."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in exported_tensors(model).items()}
    plan = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD_SIZE)
    sizes = {}
    for file, names in plan.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out / file), metadata={"format": "pt"})
        (out / file).chmod(0o644)  # safetensors writes 0600: the folder is meant to be shared
        sizes[file] = (out / file).stat().st_size
    if plan.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": plan.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sizes


def model_card(exp, vocab, model, config: dict, meta: dict, run) -> str:
    """README.md: what the model is, its modalities and towers, its validation metrics, how to
    load it, and the run's config."""
    args = model.args
    counts = model.parameter_counts()
    rows = "\n".join(f"| {m['name']} | {m['start']:,}-{m['start'] + m['size'] - 1:,} | "
                     f"{args.tower_groups[i]} | {_ffn_kind(config, args.tower_groups[i])} |"
                     for i, m in enumerate(config["modalities"]))
    metrics = _validation_metrics(exp.run_dir / "metrics.jsonl")
    metric_rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()) or "| (none logged) | |"
    towers = (f"attention: {config['attention_towers']}, FFN: {config['ffn_towers']}, norms: {config['norm_towers']} "
              "tower(s)")
    return f"""---
library_name: transformers
tags: [mixture-of-transformers, mot, multimodal, custom_code]
---

# {Path(str(exp.run_dir)).name}: a Mixture-of-Transformers model

A sparse multi-modal transformer (Mixture-of-Transformers, arXiv 2411.04996): every non-embedding
weight (attention projections, FFN, norms) is chosen per token by its modality's tower, and one
global causal self-attention runs over the whole interleaved sequence. Trained {meta['step']:,} steps
with the `mot` framework; this folder loads without it.

- parameters: {counts['total'] / 1e6:.2f}M in all, {counts['active_per_token'] / 1e6:.2f}M active per token
- {args.n_layers} layers, hidden size {args.dim}, {args.n_heads} heads ({config['num_key_value_heads']} key/value),
  norm placement `{args.norm_placement}`, {config['max_position_embeddings']:,} positions
- towers: {towers}

| modality | global ids | tower group | FFN |
|---|---|---|---|
{rows}

Validation at the last evaluation of the run:

| metric | value |
|---|---|
{metric_rows}

## Use

```python
from transformers import AutoModelForCausalLM, AutoProcessor

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("path/to/this/folder", trust_remote_code=True)
inputs = processor("The")                                   # a text prompt
ids = model.generate(**inputs, max_new_tokens=32, do_sample=False, allowed_modalities=["text"])
print(processor.decode(ids[0, inputs["input_ids"].shape[1]:]))
```

A token's modality (and so its tower) is read from its id's range. Spans of a modality with a
fixed layout (an image: begin marker, codes, end marker) are generated whole by `generate()`
(`constrain_spans=False` turns that off). Each modality's codec is in the folder named after it.

## Training config

```yaml
{exp.resolved_yaml().rstrip()}
```
"""


def _ffn_kind(config: dict, group: int) -> str:
    kinds = config["ffn_kinds"]
    kind = kinds[group if config["ffn_towers"] > 1 else 0]
    return "SwiGLU" if kind is None else f"MoE, {kind['experts']} experts, top-{kind['top_k']}"


def _validation_metrics(path: Path) -> dict[str, float]:
    """The newest value of each ``val/...`` metric in ``metrics.jsonl``."""
    from mot_core.training.trackers import read_records

    latest: dict[str, float] = {}
    for record in read_records(path):
        for key, value in record.items():
            if key.startswith("val/") and isinstance(value, (int, float)) and not isinstance(value, bool):
                latest[key] = float(value)
    return dict(sorted(latest.items()))
