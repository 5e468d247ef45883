"""Tokenized documents on disk or in an object store: Arrow IPC shards with an index.

Why Arrow IPC (the Feather v2 file format, through ``pyarrow``): a shard is one record batch
whose columns are list arrays, so a memory-mapped shard gives every document's ids as a
zero-copy numpy view (``offsets[i]:offsets[i+1]`` of one buffer), like Megatron's ``.bin`` +
``.idx`` pair, but in a self-describing, checksummed-by-schema format that any Arrow reader
(pandas, Polars, DuckDB, HF ``datasets``) opens, with continuous values and segment tables
next to the ids; and ``pyarrow.fs`` reads the same files from S3 or GCS, the file systems the
checkpoint storage already uses. Parquet would compress better but must be decoded, not
mapped; MosaicML MDS shards would add a dependency and a row format of their own.

Layout of one source's split (``<data.dir>/<source>/<split>/``)::

    index.json                  written last: format, fingerprints, every shard's counts
    part-00000-00000.arrow      part 0, shard 0: columns ids, seg_modality, seg_length, values
    part-00000.json             progress of part 0 (raw documents read, shards written, done)

One row per document (``EncodedDocument``). Shards are written to a temporary name and moved
into place; a part's progress file is rewritten after each shard, so an interrupted tokenize
continues after the last finished shard. ``open_split`` refuses shards that do not match:
another tokenizer or vocabulary, a source changed since, a truncated, missing or foreign
shard, each with one line naming the shard and the fix.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from mot_core.data.vocabulary import EncodedDocument, TokenDocument
from mot_core.errors import MotError

FORMAT = "mot-shards/1"
SCHEMA = pa.schema([
    ("ids", pa.list_(pa.int32())),
    ("seg_modality", pa.list_(pa.int16())),
    ("seg_length", pa.list_(pa.int32())),
    ("values", pa.large_list(pa.float32())),
])
INDEX = "index.json"


def split_folder(root: str, source: str, split: str) -> str:
    return f"{root.rstrip('/')}/{source}/{split}"


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """A local folder or an object-store URI (``s3://``, ``gs://``, ``file://``) -> (file
    system, path in it)."""
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise MotError(f"data.dir {path}: {str(exc).splitlines()[0]}") from None
    import os

    return pafs.LocalFileSystem(), os.path.abspath(path)


def _read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as handle:
        try:
            return json.loads(handle.read().decode("utf-8"))
        except ValueError:
            return None


def _write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as handle:
        handle.write(data)
    fs.move(tmp, path)


@dataclass(frozen=True)
class Fingerprints:
    """What shards must match: the vocabulary (each modality's tokenizer state, names and
    id ranges) and the source as it is now."""

    vocabulary: str
    modalities: dict[str, str]
    source: str


class ShardWriter:
    """Writes the shards of one part of a split; resumable from its progress file."""

    def __init__(self, root: str, source: str, split: str, part: int, fingerprints: Fingerprints,
                 shard_tokens: int):
        self.fs, self.folder = filesystem(split_folder(root, source, split))
        self.fs.create_dir(self.folder, recursive=True)
        self.part, self.shard_tokens, self.fingerprints = part, shard_tokens, fingerprints
        self.progress_path = f"{self.folder}/part-{part:05d}.json"
        progress = _read_json(self.fs, self.progress_path)
        if progress is not None and (progress.get("vocabulary") != fingerprints.vocabulary
                                     or progress.get("source") != fingerprints.source):
            progress = None  # written for other tokenizers or data: start the part again
        self.progress = progress or {"vocabulary": fingerprints.vocabulary, "source": fingerprints.source,
                                     "documents_read": 0, "shards": [], "done": False}
        self.pending: list[EncodedDocument] = []
        self.pending_read = 0

    @property
    def done(self) -> bool:
        return bool(self.progress["done"])

    @property
    def documents_read(self) -> int:
        """Raw documents of the part already in finished shards (skipped when resuming)."""
        return int(self.progress["documents_read"])

    def add(self, docs: list[EncodedDocument], raw_read: int) -> None:
        """Documents encoded from the next ``raw_read`` raw documents of the part (some raw
        documents encode to nothing); a shard is written once enough tokens are pending."""
        self.pending += docs
        self.pending_read += raw_read
        if sum(len(d) for d in self.pending) >= self.shard_tokens:
            self._flush()

    def finish(self) -> list[dict]:
        if self.pending or (not self.progress["shards"] and self.pending_read):
            self._flush()
        self.progress["documents_read"] += self.pending_read
        self.pending_read = 0
        self.progress["done"] = True
        self._save_progress()
        return self.progress["shards"]

    def _flush(self) -> None:
        name = f"part-{self.part:05d}-{len(self.progress['shards']):05d}.arrow"
        data = encode_shard(self.pending)
        _write_atomic(self.fs, f"{self.folder}/{name}", data)
        self.progress["shards"].append({
            "file": name, "documents": len(self.pending), "tokens": int(sum(len(d) for d in self.pending)),
            "bytes": len(data),
        })
        self.progress["documents_read"] += self.pending_read
        self.pending, self.pending_read = [], 0
        self._save_progress()

    def _save_progress(self) -> None:
        _write_atomic(self.fs, self.progress_path, json.dumps(self.progress).encode("utf-8"))


def encode_shard(docs: list[EncodedDocument]) -> bytes:
    """Documents -> the bytes of one Arrow IPC file (one record batch)."""

    def column(arrays: list[np.ndarray], dtype, large: bool = False) -> pa.Array:
        lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64 if large else np.int32)
        flat = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
        kind = pa.LargeListArray if large else pa.ListArray
        return kind.from_arrays(pa.array(offsets), pa.array(flat))

    batch = pa.RecordBatch.from_arrays([
        column([d.ids for d in docs], np.int32), column([d.seg_modality for d in docs], np.int16),
        column([d.seg_length for d in docs], np.int32), column([d.values for d in docs], np.float32, large=True),
    ], schema=SCHEMA)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, SCHEMA) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def write_index(root: str, source: str, split: str, fingerprints: Fingerprints, parts: int,
                shards: list[dict], modality_names: list[str]) -> dict:
    fs, folder = filesystem(split_folder(root, source, split))
    index = {
        "format": FORMAT, "source": source, "split": split, "vocabulary": fingerprints.vocabulary,
        "modalities": fingerprints.modalities, "modality_order": modality_names, "source_fingerprint": fingerprints.source,
        "parts": parts, "documents": int(sum(s["documents"] for s in shards)),
        "tokens": int(sum(s["tokens"] for s in shards)), "shards": shards,
    }
    _write_atomic(fs, f"{folder}/{INDEX}", json.dumps(index, indent=1).encode("utf-8"))
    return index


def read_index(root: str, source: str, split: str) -> dict | None:
    fs, folder = filesystem(split_folder(root, source, split))
    return _read_json(fs, f"{folder}/{INDEX}")


def check_index(index: dict, where: str, fingerprints: Fingerprints, retokenize: str) -> None:
    """One line naming what does not match, and the fix (``retokenize``)."""
    if index.get("format") != FORMAT:
        raise MotError(f"{where}/{INDEX} is not an index of {FORMAT} shards (format {index.get('format')!r}); "
                       f"{retokenize}")
    if index.get("vocabulary") != fingerprints.vocabulary:
        saved = index.get("modalities") or {}
        changed = [m for m, fp in fingerprints.modalities.items() if saved.get(m) != fp]
        what = (f"another tokenizer of modality '{changed[0]}'" if changed
                else "another vocabulary (other modalities or id ranges)")
        raise MotError(f"the shards in {where} were written by {what}; they would give wrong ids. {retokenize}")
    if index.get("source_fingerprint") != fingerprints.source:
        raise MotError(f"dataset '{index.get('source')}' has changed since it was tokenized into {where} "
                       f"(files added, removed or modified, or other options); {retokenize}")


class ShardedDocuments:
    """The documents of one split of one source, read from its shards (``DocumentStore``).

    Every shard is checked when the store opens (size, schema, rows and tokens against the
    index); documents are then read one at a time from memory-mapped files (or, from an
    object store, a shard at a time), and expanded with the run's vocabulary."""

    def __init__(self, root: str, source: str, split: str, index: dict,
                 expand: Callable[[EncodedDocument], TokenDocument], fix: str = "run `mot data tokenize CONFIG --force`",
                 cached_shards: int | None = None):
        """``fix``: what an error about a damaged shard tells the user to do."""
        self.fs, self.folder = filesystem(split_folder(root, source, split))
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.index, self.expand, self.fix = index, expand, fix
        self.shards = index["shards"]
        self.block_sizes = [int(s["documents"]) for s in self.shards]
        # mapped shards are read anywhere at no cost: shuffle in chunks across all of them; a
        # shard fetched from an object store is read whole, so its documents are read together
        self.chunk_docs = 64 if self.local else None
        self.first = np.concatenate([[0], np.cumsum(self.block_sizes)]).astype(np.int64)
        self._open: OrderedDict[int, list[tuple[np.ndarray, np.ndarray]]] = OrderedDict()
        # mapped shards cost address space, not memory: keep them all; fetched ones: a few
        self._cached = cached_shards or (1 << 16 if self.local else 4)
        self._check_files()

    def _check_files(self) -> None:
        infos = self.fs.get_file_info([f"{self.folder}/{s['file']}" for s in self.shards])
        for shard, info in zip(self.shards, infos):
            where = f"{self.folder}/{shard['file']}"
            if info.type != pafs.FileType.File:
                raise MotError(f"shard {where} is missing; {self.fix}")
            if info.size != shard["bytes"]:
                raise MotError(f"shard {where} has {info.size} bytes where its index says {shard['bytes']} (truncated "
                               f"or replaced); {self.fix}")
        for number in range(len(self.shards)):
            self._shard(number)

    def _shard(self, number: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(offsets, flat values) of each column of a shard (zero-copy views of the mapped
        file), opened once and kept among a few."""
        found = self._open.get(number)
        if found is not None:
            self._open.move_to_end(number)
            return found
        shard = self.shards[number]
        where = f"{self.folder}/{shard['file']}"
        try:
            source = pa.memory_map(where) if self.local else self.fs.open_input_file(where)
            reader = ipc.open_file(source)
            if reader.schema != SCHEMA or reader.num_record_batches != 1:
                raise MotError(f"shard {where} does not hold one batch of the {FORMAT} schema (not a shard of this "
                               f"framework); {self.fix}")
            batch = reader.get_batch(0)
        except (pa.ArrowInvalid, OSError) as exc:
            raise MotError(f"shard {where} cannot be read ({str(exc).splitlines()[0]}); {self.fix}") from None
        columns = [(batch.column(c).offsets.to_numpy(), batch.column(c).values.to_numpy()) for c in range(4)]
        offsets = columns[0][0]
        if batch.num_rows != shard["documents"] or int(offsets[-1] - offsets[0]) != shard["tokens"]:
            raise MotError(f"shard {where} holds {batch.num_rows} documents and {int(offsets[-1] - offsets[0])} tokens "
                           f"where the index says {shard['documents']} and {shard['tokens']}: the index does not "
                           f"match its shards; {self.fix}")
        found = columns
        self._open[number] = found
        if len(self._open) > self._cached:
            self._open.popitem(last=False)
        return found

    def __len__(self) -> int:
        return int(self.first[-1])

    def total_tokens(self) -> int:
        return int(self.index["tokens"])

    def lengths(self) -> np.ndarray:
        out = [np.diff(self._shard(n)[0][0]).astype(np.int64) for n in range(len(self.shards))]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def encoded(self, index: int) -> EncodedDocument:
        number = int(np.searchsorted(self.first, index, side="right") - 1)
        row = index - int(self.first[number])
        cells = [values[offsets[row]:offsets[row + 1]] for offsets, values in self._shard(number)]
        return EncodedDocument(*cells)

    def __getitem__(self, index: int) -> TokenDocument:
        return self.expand(self.encoded(index))


def batched(items: Iterable, size: int) -> Iterable[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
