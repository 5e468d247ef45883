"""The small files of the Hugging Face folder a run started from (``model.init_from``), kept
with the run, and the metadata ``mot export`` writes beside a tower's weights.

At its first start a run copies the files of ``KEPT`` that the checkpoint folder has into
``<run.dir>/state/pretrained/`` (a few kilobytes): when the run is exported the pretrained
folder may be gone, moved or changed, and the copy goes wherever the run folder goes (an object
store's mirror copies ``state/``). A resume never reads the pretrained folder again, so the copy
is the one of the run's first start.

An export of the tower the checkpoint filled writes them back: config.json's metadata (token
ids, max_position_embeddings, the RoPE keys, the dtype; see ``export_llama``), and the
generation and tokenizer files as they were. A tower with no source (a run from scratch,
another modality, a run whose first start predates the copy) gets the run's own: the stop token
as EOS, the BOS its tokenizer's post-processor adds, no padding token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mot_core.errors import MotError
from mot_core.hf.llama import DTYPES, json_object

KEPT = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
        "chat_template.jinja")
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
FOLDER = "pretrained"  # under <run.dir>/state, beside the modalities' own state folders
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def kept_folder(run_dir: Path) -> Path:
    """Where a run keeps its ``init_from`` folder's files."""
    return run_dir / "state" / FOLDER


def keep_source_files(source: Path, run_dir: Path) -> list[str]:
    """Copy the files of ``KEPT`` that ``source`` has into the run's kept folder, replacing what
    an earlier first start kept (one refused after its tokenizers were saved may have named
    another checkpoint). Returns the names copied."""
    folder = kept_folder(run_dir)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    names = [name for name in KEPT if (source / name).is_file()]
    for name in names:
        shutil.copyfile(source / name, folder / name)
    return names


def kept_config(run_dir: Path) -> dict[str, Any] | None:
    """The config.json the run kept of its ``init_from`` folder; None when it kept none (its
    first start predates the copy)."""
    file = kept_folder(run_dir) / "config.json"
    if not file.is_file():
        return None
    return json_object(file, "; it is the run's copy of its init_from config.json")


def export_dtype(requested: str | None, source: dict[str, Any] | None) -> str:
    """The dtype an export writes: ``requested``, else the source's (config.json's ``dtype``, or
    transformers 4's ``torch_dtype``), else float32 (as trained, and what a config.json naming
    none loads as)."""
    if requested is not None:
        if requested not in DTYPES:
            raise MotError(f"--dtype {requested!r} is not one of {', '.join(DTYPES)}")
        return requested
    named = None if source is None else source.get("dtype", source.get("torch_dtype"))
    if named is None:
        return "float32"
    if named not in DTYPES:
        raise MotError(f"the checkpoint the run started from has dtype {named!r}, which an export does not write; "
                       f"give --dtype ({', '.join(DTYPES)})")
    return named


def added_bos(tokenizer) -> int | None:
    """The id a ``tokenizers.Tokenizer``'s post-processor puts before a text (a BOS), or None."""
    probe, plain = tokenizer.encode("a").ids, tokenizer.encode("a", add_special_tokens=False).ids
    if len(probe) > len(plain) and probe[1:len(plain) + 1] == plain:
        return probe[0]
    return None


def write_tokenizer(out: Path, tokenizer, run_dir: Path | None, max_len: int, bos: int | None,
                    eos: int | None) -> list[str]:
    """Write ``tokenizer`` (a ``tokenizers.Tokenizer``) as tokenizer.json with the tokenizer
    files the run in ``run_dir`` kept (None: no source). A tokenizer_config.json the source
    lacked is the run's: its ``bos`` (the BOS its post-processor adds) and ``eos`` (its stop
    token) named. Returns the names written."""
    tokenizer.save(str(out / "tokenizer.json"))
    kept = [name for name in TOKENIZER_FILES if run_dir is not None and (kept_folder(run_dir) / name).is_file()]
    for name in kept:
        shutil.copyfile(kept_folder(run_dir) / name, out / name)
    if "tokenizer_config.json" not in kept:
        settings: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
        for key, token in (("bos_token", bos), ("eos_token", eos)):
            if token is not None:
                settings[key] = tokenizer.id_to_token(token)
        (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return ["tokenizer.json", *sorted({*kept, "tokenizer_config.json"})]


def write_generation_config(out: Path, run_dir: Path | None, ids: dict[str, Any]) -> str:
    """The run's kept generation_config.json (``run_dir`` None: no source), else one of the
    token ``ids`` (config.json's). Returns the name written."""
    name = "generation_config.json"
    kept = None if run_dir is None else kept_folder(run_dir) / name
    if kept is not None and kept.is_file():
        shutil.copyfile(kept, out / name)
    else:
        (out / name).write_text(json.dumps({key: ids.get(key) for key in TOKEN_IDS}, indent=2))
    return name
