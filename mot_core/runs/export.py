"""``mot export RUN --format hf``: a trained run's tower as a Hugging Face Llama folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mot_core.errors import MotError
from mot_core.hf.llama import export_llama
from mot_core.hf.metadata import (TOKEN_IDS, added_bos, export_dtype, kept_config, write_generation_config,
                                  write_tokenizer)
from mot_core.runs.reopen import load_run


def export_run(run: str | Path, modality: str, out: Path, dtype: str | None = None) -> str:
    """``mot export RUN --format hf``: the tower of ``modality`` and its vocabulary rows, from
    the run's newest intact checkpoint (or the checkpoint named), as a Llama folder that
    ``transformers`` loads: config.json, model.safetensors and generation_config.json, and the
    modality's tokenizer when it has an HF one (tokenizer.json, tokenizer_config.json).

    The tower the run started from a Hugging Face folder (``model.init_from.modality``) keeps
    what that folder had, as the run copied it at its first start (``mot_core.hf.metadata``):
    config.json's token ids, max_position_embeddings, RoPE keys, architecture and dtype; its
    generation_config.json, tokenizer_config.json (special tokens, chat template),
    special_tokens_map.json and chat_template.jinja. Any other tower, or that one of a run whose
    first start predates the copy, gets the run's own metadata: eos_token_id the modality's stop
    token, bos_token_id the BOS its tokenizer's post-processor adds (else null), pad_token_id
    null, max_position_embeddings the run's model.max_seq_len, a generation_config.json of those
    ids, float32 weights.

    ``dtype``: float32, bfloat16 or float16 (default: the source's, else float32). Returns the
    line that says what was written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MotError(f"--out {out} exists and is not an empty folder; give a new folder")
    exp, vocab, _, model, meta = load_run(run, with_data=False)
    if modality not in vocab.names:
        raise MotError(f"--modality {modality!r} is not a modality of the run (it has: {', '.join(vocab.names)})")
    owner = vocab.modalities[modality]
    if owner.input_dim is not None:
        raise MotError(f"modality '{modality}' has continuous inputs; only a discrete (token) modality exports as a "
                       "Llama")
    init = exp.config.model.init_from
    source = kept_config(exp.run_dir) if init is not None and init.modality == modality else None
    source_dir = exp.run_dir if source is not None else None
    dtype = export_dtype(dtype, source)
    from tokenizers import Tokenizer

    tokenizer = getattr(owner, "tokenizer", None)
    tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else None
    stop = getattr(owner, "stop_token", None)
    stop = None if stop is None else int(stop)
    bos = None if tokenizer is None else added_bos(tokenizer)
    own: dict[str, Any] = {"bos_token_id": bos, "eos_token_id": stop, "pad_token_id": None}
    model = model.cpu()
    count = export_llama(model, model.args.tower_groups[vocab.index(modality)], vocab.offsets[modality],
                         owner.vocab_size, exp.config.model.max_seq_len, out, own, dtype=dtype, source=source)
    written = ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    written.append(write_generation_config(out, source_dir, {key: config.get(key) for key in TOKEN_IDS}))
    if tokenizer is not None:
        written += write_tokenizer(out, tokenizer, source_dir, exp.config.model.max_seq_len, bos, stop)
    kept = f"; with the metadata of {init.path}, as the run kept it" if source is not None else ""
    return (f"exported the '{modality}' tower of step {meta['step']} ({count / 1e6:.2f}M parameters, {dtype}) to "
            f"{out}: {', '.join(written)}{kept}")
