"""Which data a shared tokenizer was fitted on, so that it is used only for that data.

A modality whose ``fit`` writes a tokenizer to a folder shared between runs (``tokenizer_dir``:
a VQ-GAN, a VAE, speech units) names that folder with ``Modality.tokenizer_folder()``. When
``mot tokenizer fit`` fits (or refits) it, the engine writes ``fitted_on.json`` there: the
data sources' plugin names and a digest of a fixed probe of the modality's training payloads
(the first ``PROBE_DOCUMENTS`` training documents of the sources yielding it, spread over each
source's parts; each payload's ``Modality.payload_content`` hashed by content, the hashes
sorted). Neither the order of the sources, the mixture weights, other modalities' options (caption
dropout), nor file names and times on another machine change it; another first stretch of a
source's parts does (other images, another image size, a changed split).

- ``mot tokenizer fit`` refuses, in one line, to keep or overwrite a tokenizer fitted on other
  data unless given ``--force``: another config (one's own photos) should name a folder of its own.
- A run that reads training data (``mot train``, ``mot data tokenize``, ``mot launch``) refuses a
  tokenizer whose record names other data than the run's, in one line, before tokenizing.

A folder without a record (a tokenizer fitted before records were kept, or copied in by hand)
is used as it is, with a note saying so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mot_core.errors import MotError, plugin_boundary
from mot_core.plugin_api import Modality, origin

RECORD_FILE = "fitted_on.json"
PROBE_DOCUMENTS = 256


def payload_digest(payload: Any) -> bytes:
    """A content hash of one payload: tensors and arrays by dtype, shape and bytes; text;
    PIL images by mode, size and pixels; dataclasses, mappings and sequences field by field;
    anything else by its pickle."""
    h = hashlib.sha256()
    _feed(h, payload)
    return h.digest()


def _feed(h, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = (value.float() if value.dtype == torch.bfloat16 else value).contiguous().numpy()
    if isinstance(value, np.ndarray):
        h.update(f"nd{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, str):
        h.update(b"s" + value.encode("utf-8"))
    elif isinstance(value, (bytes, bytearray)):
        h.update(b"b" + bytes(value))
    elif isinstance(value, Path):  # a file payload: by its bytes, wherever it lies
        try:
            h.update(b"f" + value.read_bytes())
        except OSError as exc:
            raise MotError(f"cannot read payload file {value}: {exc.strerror or exc}") from None
    elif value is None or isinstance(value, (bool, int, float)):
        h.update(f"v{type(value).__name__}{value!r}".encode())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(type(value).__name__.encode())
        for f in dataclasses.fields(value):
            h.update(f.name.encode())
            _feed(h, getattr(value, f.name))
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"l{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        h.update(f"img{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    else:
        try:
            h.update(pickle.dumps(value, protocol=4))
        except Exception as exc:
            raise MotError(f"cannot fingerprint a payload of type {type(value).__name__} ({exc})") from None


def describe_training_data(exp, name: str, sample_documents) -> dict:
    """``{"sources": [plugin names], "payloads": N, "digest": hex}`` of modality ``name``'s
    training data in this run's mixture: the probe described in the module docstring.
    ``sample_documents(source_name, source, split, limit)``: how the engine samples a source
    (``mot_core.experiment.tokenize.sample_documents``)."""
    modality = exp.modalities[name]
    digests, sources = [], set()
    for source_name, source in exp.sources.items():
        if name not in source.modalities:
            continue
        sources.add(type(source).name)
        for doc in sample_documents(source_name, source, "train", PROBE_DOCUMENTS):
            for segment in doc.segments:
                if segment.modality == name:
                    with plugin_boundary(f"{origin(modality)}: modality '{name}', payload_content"):
                        content = modality.payload_content(segment.payload)
                    try:
                        digests.append(payload_digest(content))
                    except MotError as exc:
                        raise MotError(f"{origin(modality)}: modality '{name}': {exc} (a payload of dataset "
                                       f"'{source_name}'; override payload_content to give what the tokenizer reads)") from None
    total = hashlib.sha256()
    for digest in sorted(digests):
        total.update(digest)
    return {"sources": sorted(sources), "payloads": len(digests), "digest": total.hexdigest()}


def shared_folder(modality: Modality, name: str) -> Path | None:
    with plugin_boundary(f"{origin(modality)}: modality '{name}', tokenizer_folder"):
        folder = modality.tokenizer_folder()
    return None if folder is None else Path(folder)


def read_record(folder: Path) -> dict | None:
    file = folder / RECORD_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise MotError(f"{file} is unreadable ({exc}); delete it and run `mot tokenizer fit --force`") from None
    if not isinstance(record, dict) or not isinstance(record.get("digest"), str):
        raise MotError(f"{file} is not a record of fitted data; delete it and run `mot tokenizer fit --force`")
    return record


def write_record(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(folder / RECORD_FILE)


def summary(record: dict) -> str:
    return f"{record.get('payloads', '?')} probed payloads of {', '.join(record.get('sources', [])) or 'no source'}, " \
           f"digest {record['digest'][:12]}"


def other_data_message(name: str, folder: Path, saved: dict, current: dict) -> str:
    return (f"modality '{name}': the tokenizer in {folder} was fitted on other data ({summary(saved)}) than this "
            f"config reads ({summary(current)}); give mixture.modalities.{name}.options.tokenizer_dir a folder of "
            "its own and run `mot tokenizer fit` (or `mot tokenizer fit --force` to refit this one)")


def check_tokenizers_fit_this_data(exp, sample_documents, report=print) -> None:
    """Before a run reads training data: every shared tokenizer with a record was fitted on
    this run's data (one-line MotError otherwise)."""
    for name, modality in exp.modalities.items():
        folder = shared_folder(modality, name)
        if folder is None:
            continue
        saved = read_record(folder)
        if saved is None:
            if (folder.exists()):
                report(f"note: the tokenizer in {folder} has no record of the data it was fitted on ({RECORD_FILE}); "
                       "it is used as it is (`mot tokenizer fit --force` refits it and records it)")
            continue
        current = describe_training_data(exp, name, sample_documents)
        if current["digest"] != saved["digest"]:
            raise MotError(other_data_message(name, folder, saved, current))
