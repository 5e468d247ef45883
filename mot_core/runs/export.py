"""``mot export RUN --format hf``: a trained run's tower as a Hugging Face Llama folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mot_core.errors import MotError
from mot_core.hf.llama import export_llama
from mot_core.runs.reopen import load_run


def export_run(run: str | Path, modality: str, out: Path) -> str:
    """``mot export RUN --format hf``: the tower of ``modality`` and its vocabulary rows, from
    the run's newest intact checkpoint (or the checkpoint named), as a Llama folder that
    ``transformers`` loads; the modality's tokenizer goes with it when it has an HF one."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MotError(f"--out {out} exists and is not an empty folder; give a new folder")
    exp, vocab, _, model, meta = load_run(run, with_data=False)
    if modality not in vocab.names:
        raise MotError(f"--modality {modality!r} is not a modality of the run (it has: {', '.join(vocab.names)})")
    owner = vocab.modalities[modality]
    if owner.input_dim is not None:
        raise MotError(f"modality '{modality}' has continuous inputs; only a discrete (token) modality exports as a "
                       "Llama")
    tokenizer = getattr(owner, "tokenizer", None)
    extra: dict[str, Any] = {}
    stop = getattr(owner, "stop_token", None)
    if stop is not None:
        extra["eos_token_id"] = int(stop)
    model = model.cpu()
    count = export_llama(model, model.args.tower_groups[vocab.index(modality)], vocab.offsets[modality],
                         owner.vocab_size, exp.config.model.max_seq_len, out, extra)
    written = "config.json, model.safetensors"
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        tokenizer.save(str(out / "tokenizer.json"))
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": exp.config.model.max_seq_len}
        if stop is not None:
            settings["eos_token"] = tokenizer.id_to_token(int(stop))
        (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
        written += ", tokenizer.json, tokenizer_config.json"
    return (f"exported the '{modality}' tower of step {meta['step']} ({count / 1e6:.2f}M parameters) to {out}: "
            f"{written}")
