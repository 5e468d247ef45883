"""Tokenized documents on disk or in an object store: Arrow IPC shards with an index.

Why Arrow IPC (the Feather v2 file format, through ``pyarrow``): a shard is a file of record
batches whose columns are list arrays, so a memory-mapped shard gives every document's ids as a
zero-copy numpy view (``offsets[i]:offsets[i+1]`` of one buffer), like Megatron's ``.bin`` +
``.idx`` pair, but in a self-describing format that any Arrow reader (pandas, Polars, DuckDB,
HF ``datasets``) opens, with continuous values and segment tables next to the ids; and
``pyarrow.fs`` reads the same files from S3 or GCS, the file systems the checkpoint storage
already uses. Each record batch holds ``BATCH_DOCUMENTS`` documents and the footer holds every
document's length, so a reader on an object store learns a shard's layout from its footer and
then fetches one batch per range read, never a whole shard (MosaicML streaming's shard index
does the same job). Parquet would compress better but must be decoded, not mapped; MosaicML MDS
shards would add a dependency and a row format of their own.

Layout of one source's split (``<data.dir>/<source>/<split>/``)::

    index.json                  written last: format, fingerprints, every shard's counts
    part-00000-00000.arrow      part 0, shard 0: columns ids, seg_modality, seg_length, values;
                                footer: every document's length
    part-00000.json             progress of part 0 (raw documents read, shards written, done)

One row per document (``EncodedDocument``). Shards are written to a temporary name and moved
into place; a part's progress file is rewritten after each shard, so an interrupted tokenize
continues after the last finished shard. ``open_split`` refuses shards that do not match:
another tokenizer or vocabulary, a source changed since, a truncated, missing or foreign
shard, each with one line naming the shard and the fix.

What is checked, and when (every failure is one ``MotError`` line naming the file and
``mot data tokenize CONFIG --force``):

- ``index.json`` and progress files, when read: JSON objects of the expected fields and types
  (``INDEX_SCHEMA``, ``PROGRESS_SCHEMA``), the index's totals those of its shards;
- each shard's size, when the split is opened (one listing), and its footer when the shard is
  first used: schema, record batches, document lengths, and the CRC-32 of its footer tables,
  which the index records (``footer_crc32``);
- each record batch, the first time this process reads it: the CRC-32 of its buffers (ids,
  segment tables, values and their offsets; ``CHECKSUMS_KEY`` in the footer, one per batch)
  and the bounds of its offsets. Only the batch being read is hashed (crc32 runs at several
  GB/s), so a range read stays one batch;
- each document, when it is expanded: ids within their segment's modality
  (``Vocabulary.check_encoded``), a segment table that adds up.

Shards written before batch checksums (no ``CHECKSUMS_KEY``, no ``footer_crc32`` in the index)
still read, unchecked except for their layout and the per-document checks.
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pydantic
from typing_extensions import NotRequired, TypedDict  # pydantic reads typing's TypedDict only from 3.12

from mot_core import filesystems
from mot_core.data.vocabulary import DamagedDocument, EncodedDocument, TokenDocument
from mot_core.errors import MotError

FORMAT = "mot-shards/1"
SCHEMA = pa.schema([
    ("ids", pa.list_(pa.int32())),
    ("seg_modality", pa.list_(pa.int16())),
    ("seg_length", pa.list_(pa.int32())),
    ("values", pa.large_list(pa.float32())),
])
INDEX = "index.json"
FIX = "run `mot data tokenize CONFIG --force` to write them again"  # what a damaged shard or index needs


def split_folder(root: str, source: str, split: str) -> str:
    return filesystems.join(root, source, split)  # parts go before a URI's query


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """A local folder or an object-store URI (``s3://``, ``gs://``, ``file://``) -> (file
    system, path in it), with the endpoint and credentials ``mot_core.filesystems`` finds."""
    return filesystems.resolve(path, "data.dir")


def _read_json(fs: pafs.FileSystem, path: str, named: str, fix: str) -> object | None:
    """The parsed file, or None if there is none. Index and progress files are written whole
    (a temporary name, then moved), so one that does not parse is damaged, never half-written:
    refused in one line naming it (``named``) and the fix."""
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as handle:
        data = handle.read()
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
        raise MotError(f"{named} is damaged (not JSON: {str(exc).splitlines()[0]}); {fix}") from None


NonNegative = Annotated[int, pydantic.Field(ge=0)]
# a name in the split's folder, never a path (no separator; not . or ..: one character at least is no dot)
FileName = Annotated[str, pydantic.Field(pattern=r"^[^/\\]*[^/\\.][^/\\]*$")]


class ShardRecord(TypedDict):
    """One shard as the progress files and the index list it."""

    file: FileName
    documents: NonNegative
    tokens: NonNegative
    bytes: NonNegative
    batch_documents: NotRequired[Annotated[int, pydantic.Field(ge=1)]]  # absent: one batch (the first layout)
    footer_crc32: NotRequired[Annotated[int, pydantic.Field(ge=0, lt=1 << 32)]]  # absent: written unchecked
    skipped: NotRequired[dict[str, NonNegative]]


class IndexFile(TypedDict):
    format: str
    source: str
    split: str
    vocabulary: str
    modalities: dict[str, str]
    modality_order: list[str]
    source_fingerprint: str
    parts: Annotated[int, pydantic.Field(ge=1)]
    documents: NonNegative
    tokens: NonNegative
    shards: list[ShardRecord]
    skipped: NotRequired[dict[str, NonNegative]]


class ProgressFile(TypedDict):
    vocabulary: str
    source: str
    documents_read: NonNegative
    shards: list[ShardRecord]
    done: bool
    skipped: NotRequired[dict[str, NonNegative]]


INDEX_SCHEMA = pydantic.TypeAdapter(IndexFile)
PROGRESS_SCHEMA = pydantic.TypeAdapter(ProgressFile)


def _validated(data: object, schema: pydantic.TypeAdapter, named: str, fix: str) -> dict:
    """``data`` (parsed JSON) if it fits ``schema``, else one line: the file, the first field
    that does not fit and why, and the fix."""
    if not isinstance(data, dict):
        raise MotError(f"{named} is damaged (a JSON {type(data).__name__}, not an object); {fix}")
    try:
        # strict: a count written as "3" or true is damage, not a number; keys of later versions are ignored
        schema.validate_python(data, strict=True)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "top level"
        if error["type"] == "string_pattern_mismatch":
            why = f"{error['input']!r} is not a file name in the split's folder"
        else:
            why = error["msg"].splitlines()[0]
        raise MotError(f"{named} is damaged ({where}: {why}); {fix}") from None
    return data


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
                 shard_tokens: int, fix: str = FIX):
        """``fix``: what an error about a damaged progress file tells the user to do."""
        uri = split_folder(root, source, split)
        self.fs, self.folder = filesystem(uri)
        self.fs.create_dir(self.folder, recursive=True)
        self.part, self.shard_tokens, self.fingerprints = part, shard_tokens, fingerprints
        name = f"part-{part:05d}.json"
        self.progress_path = f"{self.folder}/{name}"
        named = filesystems.join(uri, name)
        progress = _read_json(self.fs, self.progress_path, named, fix)
        if progress is not None:
            progress = _validated(progress, PROGRESS_SCHEMA, named, fix)
        if progress is not None and (progress.get("vocabulary") != fingerprints.vocabulary
                                     or progress.get("source") != fingerprints.source):
            progress = None  # written for other tokenizers or data: start the part again
        self.progress = progress or {"vocabulary": fingerprints.vocabulary, "source": fingerprints.source,
                                     "documents_read": 0, "shards": [], "done": False}
        self.pending: list[EncodedDocument] = []
        self.pending_read = 0
        self.pending_skipped: dict[str, int] = {}  # bad records left out since the last shard, by cause

    @property
    def done(self) -> bool:
        return bool(self.progress["done"])

    @property
    def documents_read(self) -> int:
        """Raw documents of the part already in finished shards (skipped when resuming)."""
        return int(self.progress["documents_read"])

    def add(self, docs: list[EncodedDocument], raw_read: int, skipped: dict[str, int] | None = None) -> None:
        """Documents encoded from the next ``raw_read`` raw documents of the part (some raw
        documents encode to nothing), and the bad records left out before them by cause
        (``skipped``); a shard is written once enough tokens are pending."""
        self.pending += docs
        self.pending_read += raw_read
        for cause, count in (skipped or {}).items():
            self.pending_skipped[cause] = self.pending_skipped.get(cause, 0) + count
        if sum(len(d) for d in self.pending) >= self.shard_tokens:
            self._flush()

    def finish(self, skipped: dict[str, int] | None = None) -> list[dict]:
        """Write what is pending; the part's last shard record holds every bad record the part
        left out, by cause (``skipped``: those after its last document)."""
        self.add([], 0, skipped)
        if self.pending or (not self.progress["shards"] and (self.pending_read or self.pending_skipped)):
            self._flush()
        self.progress["documents_read"] += self.pending_read
        self._take_skipped()
        self.pending_read = 0
        if self.progress["shards"] and self.progress.get("skipped"):
            self.progress["shards"][-1]["skipped"] = dict(sorted(self.progress["skipped"].items()))
        self.progress["done"] = True
        self._save_progress()
        return self.progress["shards"]

    def _flush(self) -> None:
        name = f"part-{self.part:05d}-{len(self.progress['shards']):05d}.arrow"
        data, footer_crc32 = build_shard(self.pending)
        _write_atomic(self.fs, f"{self.folder}/{name}", data)
        self.progress["shards"].append({
            "file": name, "documents": len(self.pending), "tokens": int(sum(len(d) for d in self.pending)),
            "bytes": len(data), "batch_documents": BATCH_DOCUMENTS, "footer_crc32": footer_crc32,
        })
        self.progress["documents_read"] += self.pending_read
        self._take_skipped()
        self.pending, self.pending_read = [], 0
        self._save_progress()

    def _take_skipped(self) -> None:
        """Counted with the documents read: a resume re-reads from the last shard on, and counts
        the bad records among those again."""
        totals = self.progress.setdefault("skipped", {})
        for cause, count in self.pending_skipped.items():
            totals[cause] = totals.get(cause, 0) + count
        self.pending_skipped = {}

    def _save_progress(self) -> None:
        _write_atomic(self.fs, self.progress_path, json.dumps(self.progress).encode("utf-8"))


def encode_shard(docs: list[EncodedDocument]) -> bytes:
    """Documents -> the bytes of one Arrow IPC file (``build_shard``)."""
    return build_shard(docs)[0]


def build_shard(docs: list[EncodedDocument]) -> tuple[bytes, int]:
    """Documents -> (the bytes of one Arrow IPC file, the CRC-32 of its footer tables, which
    the index records). The file holds record batches of ``BATCH_DOCUMENTS`` documents; its
    footer every document's token count (``LENGTHS_KEY``), so that a reader learns the shard's
    layout from its footer and reads one batch with one range read, and each batch's CRC-32
    (``CHECKSUMS_KEY``), which a reader checks the first time it reads the batch."""

    def column(arrays: list[np.ndarray], dtype, large: bool = False) -> pa.Array:
        lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64 if large else np.int32)
        flat = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
        kind = pa.LargeListArray if large else pa.ListArray
        return kind.from_arrays(pa.array(offsets), pa.array(flat))

    lengths = np.fromiter((d.ids.size for d in docs), dtype="<i4", count=len(docs)).tobytes()
    batches = []
    for first in range(0, max(len(docs), 1), BATCH_DOCUMENTS):
        part = docs[first:first + BATCH_DOCUMENTS]
        batches.append(pa.RecordBatch.from_arrays([
            column([d.ids for d in part], np.int32), column([d.seg_modality for d in part], np.int16),
            column([d.seg_length for d in part], np.int32),
            column([d.values for d in part], np.float32, large=True),
        ], schema=SCHEMA))
    # the footer is written first in the API: every batch's checksum is known before the file is
    checksums = np.array([batch_checksum(_columns(b)) for b in batches], dtype="<u4").tobytes()
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, SCHEMA, metadata={LENGTHS_KEY: lengths, CHECKSUMS_KEY: checksums}) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes(), footer_checksum(lengths, checksums)


Columns = list[tuple[np.ndarray, np.ndarray]]  # per column of SCHEMA: (offsets (rows + 1,), flat values)


def _columns(record: pa.RecordBatch) -> Columns:
    """(offsets, flat values) of each column of a record batch: zero-copy numpy views."""
    return [(record.column(c).offsets.to_numpy(), record.column(c).values.to_numpy()) for c in range(len(SCHEMA))]


def batch_checksum(columns: Columns) -> int:
    """CRC-32 of every buffer a reader uses of one record batch (each column's offsets and
    values, in order). crc32 (zlib, several GB/s, the GIL released) rather than a
    cryptographic hash: it guards against bit rot and bad copies, not against an adversary."""
    crc = 0
    for offsets, values in columns:
        crc = zlib.crc32(np.ascontiguousarray(offsets), crc)
        crc = zlib.crc32(np.ascontiguousarray(values), crc)
    return crc


def footer_checksum(lengths: bytes, checksums: bytes) -> int:
    """CRC-32 of a shard's footer tables (document lengths, batch checksums): the index
    records it, so a footer swapped or altered with its batches is refused as well."""
    return zlib.crc32(checksums, zlib.crc32(lengths))


def write_index(root: str, source: str, split: str, fingerprints: Fingerprints, parts: int,
                shards: list[dict], modality_names: list[str]) -> dict:
    fs, folder = filesystem(split_folder(root, source, split))
    index = {
        "format": FORMAT, "source": source, "split": split, "vocabulary": fingerprints.vocabulary,
        "modalities": fingerprints.modalities, "modality_order": modality_names, "source_fingerprint": fingerprints.source,
        "parts": parts, "documents": int(sum(s["documents"] for s in shards)),
        "tokens": int(sum(s["tokens"] for s in shards)), "shards": shards,
    }
    skipped: dict[str, int] = {}
    for shard in shards:
        for cause, count in shard.get("skipped", {}).items():
            skipped[cause] = skipped.get(cause, 0) + count
    if skipped:  # bad records left out (data.on_bad_record: skip), by cause
        index["skipped"] = dict(sorted(skipped.items()))
    _write_atomic(fs, f"{folder}/{INDEX}", json.dumps(index, indent=1).encode("utf-8"))
    return index


def read_index(root: str, source: str, split: str, fix: str = FIX) -> dict | None:
    """A split's ``index.json``, checked against ``INDEX_SCHEMA`` when it is an index of
    ``FORMAT`` shards (``check_index`` refuses one of another format); None if there is none.
    A damaged one is one line naming it and ``fix``."""
    uri = split_folder(root, source, split)
    fs, folder = filesystem(uri)
    named = filesystems.join(uri, INDEX)
    index = _read_json(fs, f"{folder}/{INDEX}", named, fix)
    if index is None:
        return None
    if isinstance(index, dict) and index.get("format") != FORMAT:
        return index  # another format: check_index names it, whatever its fields
    index = _validated(index, INDEX_SCHEMA, named, fix)
    for key in ("documents", "tokens"):
        listed = sum(int(shard[key]) for shard in index["shards"])
        if listed != index[key]:
            raise MotError(f"{named} is damaged (its shards hold {listed} {key} where it says {index[key]}); {fix}")
    return index


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


BATCH_DOCUMENTS = 64  # documents per record batch: the unit of a range read, and of the shuffle's chunks
LENGTHS_KEY = b"mot.lengths"  # footer metadata: every document's token count (int32, little-endian)
CHECKSUMS_KEY = b"mot.checksums"  # footer metadata: each record batch's batch_checksum (uint32, little-endian)


class ReadCounter:
    """Bytes and requests a store fetched from an object store (what a range read costs)."""

    def __init__(self):
        self.bytes = 0
        self.requests = 0


class _CountingFile:
    """A file-like view of a pyarrow input file that counts what is read through it: each
    ``read`` is one ranged GET on an object store."""

    def __init__(self, native, counter: ReadCounter):
        self.native, self.counter = native, counter
        self.closed = False

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.native.seek(offset, whence)

    def tell(self) -> int:
        return self.native.tell()

    def size(self) -> int:
        return self.native.size()

    def read(self, nbytes: int = -1) -> bytes:
        data = self.native.read(None if nbytes is None or nbytes < 0 else nbytes)
        self.counter.bytes += len(data)
        self.counter.requests += 1
        return data

    def close(self) -> None:
        self.closed = True
        self.native.close()


@dataclass
class _OpenShard:
    reader: ipc.RecordBatchFileReader
    lengths: np.ndarray  # (documents,) int64 tokens of each document
    batch_documents: int  # rows per record batch (the last one may hold fewer)
    checksums: np.ndarray | None = None  # (batches,) uint32 batch_checksum of each; None: written unchecked
    verified: np.ndarray | None = None  # (batches,) bool: checked by this process (a mapped file's batches)


class ShardedDocuments:
    """The documents of one split of one source, read from its shards (``DocumentStore``).

    Opening the store checks every shard's size against the index (one listing of the folder).
    A shard's footer (schema, record batches, every document's length) is read when the shard
    is first used, and checked against the index; up to ``EAGER_FOOTERS`` local shards are all
    checked at once (mapped, each costs about 80 us to open), so a damaged one stops the run
    before it trains, while a corpus of 10^5 shards, or one in an object store, starts at once. Documents are
    read one record batch (``BATCH_DOCUMENTS`` documents) at a time: zero-copy from a memory-mapped
    file, or with one range read from an object store, never a whole shard. Documents are
    expanded with the run's vocabulary.

    From an object store the epoch order shuffles batches, then the documents of each batch
    (``random_access`` is False): a full permutation would fetch a batch per document. Local
    shards keep a full permutation."""

    EAGER_FOOTERS = 1024

    def __init__(self, root: str, source: str, split: str, index: dict,
                 expand: Callable[[EncodedDocument], TokenDocument], fix: str = FIX,
                 cached_batches: int | None = None):
        """``index``: the split's index as ``read_index`` or ``write_index`` returns it;
        ``expand``: a document as stored -> as packed (``Vocabulary.expand``, which raises
        ``DamagedDocument`` for one no tokenizer of the vocabulary wrote); ``fix``: what an
        error about a damaged shard tells the user to do."""
        self.uri = split_folder(root, source, split)
        self.fs, self.folder = filesystem(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.index, self.expand, self.fix = index, expand, fix
        self.shards = index["shards"]
        self.block_sizes = [int(s["documents"]) for s in self.shards]
        batched_shards = all(s.get("batch_documents") for s in self.shards)
        # shards written before record batches (one batch each) are read whole: shuffle whole shards
        self.chunk_docs = BATCH_DOCUMENTS if self.local or batched_shards else None
        self.random_access = self.local
        self.first = np.concatenate([[0], np.cumsum(self.block_sizes)]).astype(np.int64)
        self.reads = ReadCounter()
        self.shard_bytes = int(sum(int(s["bytes"]) for s in self.shards))
        self._shards: OrderedDict[int, _OpenShard] = OrderedDict()
        self._batches: OrderedDict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = OrderedDict()
        # mapped batches cost address space, not memory: keep many; fetched ones: enough for every lane's chunk
        self._cached_batches = cached_batches or (1 << 16 if self.local else 256)
        self._cached_shards = 4096 if self.local else 256
        self._check_sizes()
        if self.local and len(self.shards) <= self.EAGER_FOOTERS:
            for number in range(len(self.shards)):
                self._shard(number)

    def _where(self, number: int) -> str:
        return f"{self.folder}/{self.shards[number]['file']}"

    def _named(self, number: int) -> str:
        """The shard as the config names it (a local path, or a URI with its scheme)."""
        return self._where(number) if self.local else filesystems.join(self.uri, self.shards[number]["file"])

    def _unreadable(self, number: int, exc: BaseException) -> MotError:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "does not exist" in detail or "No such file" in detail:
            detail = "it is gone: deleted or moved since the run started"
        elif not self.local and filesystems.failure_kind(exc) is not None:  # the store refused: credentials, network
            return filesystems.describe_error(exc, self._named(number), "data.dir")
        return MotError(f"shard {self._named(number)} cannot be read ({detail}); {self.fix}")

    def _check_sizes(self) -> None:
        if self.local:
            infos = self.fs.get_file_info([self._where(n) for n in range(len(self.shards))])
            sizes = {info.path.rsplit("/", 1)[-1]: info.size for info in infos if info.type == pafs.FileType.File}
        else:  # one listing (a request per 1,000 files), not a request per shard
            try:
                listing = self.fs.get_file_info(pafs.FileSelector(self.folder, allow_not_found=True))
            except OSError as exc:
                raise MotError(f"cannot list the shards in {self.uri}: {str(exc).splitlines()[0]}; {self.fix}") from None
            sizes = {info.base_name: info.size for info in listing if info.type == pafs.FileType.File}
            self.reads.requests += 1
        for number, shard in enumerate(self.shards):
            size = sizes.get(shard["file"])
            if size is None:
                raise MotError(f"shard {self._named(number)} is missing; {self.fix}")
            if size != shard["bytes"]:
                raise MotError(f"shard {self._named(number)} has {size} bytes where its index says {shard['bytes']} "
                               f"(truncated or replaced); {self.fix}")

    def _shard(self, number: int) -> _OpenShard:
        """A shard's footer, read and checked against the index once, and kept among many."""
        found = self._shards.get(number)
        if found is not None:
            self._shards.move_to_end(number)
            return found
        shard, where, named = self.shards[number], self._where(number), self._named(number)
        try:
            if self.local:
                source = pa.memory_map(where)
            else:
                source = _CountingFile(self.fs.open_input_file(where), self.reads)
            reader = ipc.open_file(source)
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._unreadable(number, exc) from None
        documents = int(shard["documents"])
        if reader.schema != SCHEMA:
            raise MotError(f"shard {named} does not hold the {FORMAT} schema (not a shard of this framework); "
                           f"{self.fix}")
        metadata = reader.metadata or {}
        if LENGTHS_KEY in metadata:
            if len(metadata[LENGTHS_KEY]) % 4:
                raise MotError(f"shard {named} has a damaged footer (its document lengths are cut); {self.fix}")
            lengths = np.frombuffer(metadata[LENGTHS_KEY], dtype="<i4").astype(np.int64)
            per_batch = BATCH_DOCUMENTS
        else:  # written before record batches: one batch, whose offsets give the lengths
            per_batch = max(documents, 1)
            lengths = None
        expected_batches = max(-(-documents // per_batch), 1)
        if reader.num_record_batches != expected_batches:
            raise MotError(f"shard {named} holds {reader.num_record_batches} record batches where its index's "
                           f"{documents} documents make {expected_batches}: the index does not match its shards; "
                           f"{self.fix}")
        checksums = self._footer_checksums(number, metadata, expected_batches)
        found = _OpenShard(reader, lengths if lengths is not None else np.zeros(0, np.int64), per_batch, checksums,
                           np.zeros(expected_batches, dtype=bool) if checksums is not None else None)
        self._shards[number] = found
        if lengths is None:
            found.lengths = np.diff(self._batch(number, 0)[0][0]).astype(np.int64)
        if found.lengths.size != documents or int(found.lengths.sum()) != int(shard["tokens"]):
            del self._shards[number]
            raise MotError(f"shard {named} holds {found.lengths.size} documents and {int(found.lengths.sum())} tokens "
                           f"where the index says {documents} and {shard['tokens']}: the index does not match its "
                           f"shards; {self.fix}")
        if len(self._shards) > self._cached_shards:
            self._shards.popitem(last=False)
        return found

    def _footer_checksums(self, number: int, metadata: dict, batches: int) -> np.ndarray | None:
        """(batches,) uint32 each record batch's checksum, from the footer, whose tables must
        match the CRC-32 the index records; None for a shard written before checksums (the
        index then records none either)."""
        named, recorded = self._named(number), self.shards[number].get("footer_crc32")
        if CHECKSUMS_KEY not in metadata:
            if recorded is not None:
                raise MotError(f"shard {named} has lost the checksums its index records (a damaged footer, or "
                               f"another file under its name); {self.fix}")
            return None  # written before checksums: read unchecked (documented)
        raw = metadata[CHECKSUMS_KEY]
        if len(raw) != 4 * batches:
            raise MotError(f"shard {named} has a damaged footer ({len(raw)} bytes of checksums for {batches} record "
                           f"batches); {self.fix}")
        if recorded is not None and footer_checksum(metadata.get(LENGTHS_KEY, b""), raw) != recorded:
            raise MotError(f"shard {named} has a footer that does not match its index's checksum (damaged, or "
                           f"another shard copied under its name); {self.fix}")
        return np.frombuffer(raw, dtype="<u4")

    def _batch(self, number: int, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(offsets, flat values) of each column of one record batch (zero-copy views of a
        mapped file, or the bytes of one range read), kept among a few. The first read of a
        batch by this process checks its checksum (only this batch's bytes are hashed) and
        its offsets; a batch fetched again from an object store is new bytes, checked again."""
        key = (number, batch)
        found = self._batches.get(key)
        if found is not None:
            self._batches.move_to_end(key)
            return found
        shard = self._shards.get(number) or self._shard(number)
        try:
            record = shard.reader.get_batch(batch)
            columns = _columns(record)  # zero-copy views: refused if a damaged header claims nulls
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._unreadable(number, exc) from None
        documents = int(self.shards[number]["documents"])
        rows = min(shard.batch_documents, documents - batch * shard.batch_documents) if documents else 0
        if shard.checksums is not None and not shard.verified[batch]:
            if batch_checksum(columns) != int(shard.checksums[batch]):
                raise MotError(f"shard {self._named(number)}: record batch {batch} does not match its checksum (its "
                               f"ids, segment tables or values changed since it was written: bit rot or a bad copy); "
                               f"{self.fix}")
            shard.verified[batch] = self.local  # a mapped file's bytes stay put; a fetched batch is fetched anew
        offsets = columns[0][0]
        expected = shard.lengths[batch * shard.batch_documents:batch * shard.batch_documents + rows]
        if record.num_rows != rows or (shard.lengths.size and not np.array_equal(np.diff(offsets), expected)):
            raise MotError(f"shard {self._named(number)}: record batch {batch} does not match the document lengths in "
                           f"the shard's footer (damaged); {self.fix}")
        problem = _offsets_problem(columns, rows)
        if problem:
            raise MotError(f"shard {self._named(number)}: record batch {batch} is damaged ({problem}); {self.fix}")
        self._batches[key] = columns
        if len(self._batches) > self._cached_batches:
            self._batches.popitem(last=False)
        return columns

    def __len__(self) -> int:
        return int(self.first[-1])

    def total_tokens(self) -> int:
        return int(self.index["tokens"])

    def lengths(self) -> np.ndarray:
        """(N,) every document's tokens, from the shards' footers (no document is read)."""
        out = [self._shard(n).lengths for n in range(len(self.shards))]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _locate(self, index: int) -> tuple[int, int, int]:
        """Document ``index`` of the split -> (shard, record batch, row in the batch)."""
        number = int(np.searchsorted(self.first, index, side="right") - 1)
        batch, row = divmod(index - int(self.first[number]), self._shard(number).batch_documents)
        return number, batch, row

    def encoded(self, index: int) -> EncodedDocument:
        """Document ``index`` as stored: zero-copy views of its record batch (checked)."""
        number, batch, row = self._locate(index)
        cells = [values[offsets[row]:offsets[row + 1]] for offsets, values in self._batch(number, batch)]
        return EncodedDocument(*cells)

    def __getitem__(self, index: int) -> TokenDocument:
        encoded = self.encoded(index)
        try:
            return self.expand(encoded)
        except DamagedDocument as exc:  # its ids or segments: name the shard, not just the document
            number, batch, row = self._locate(index)
            raise MotError(f"shard {self._named(number)}: document {row} of record batch {batch} is damaged ({exc}); "
                           f"{self.fix}") from None


def _offsets_problem(columns: Columns, rows: int) -> str | None:
    """What is wrong with a record batch's offsets, or None: each column's must rise from
    within its values to within them (slices past the end would silently shorten a document),
    and the segment columns must share theirs (one modality per segment length). A few
    comparisons over ``rows + 1`` offsets per column."""
    for (offsets, values), name in zip(columns, SCHEMA.names):
        if offsets.size != rows + 1:
            return f"column {name} has {offsets.size} offsets for {rows} documents"
        if offsets.size and (offsets[0] < 0 or offsets[-1] > values.size or (np.diff(offsets) < 0).any()):
            return f"column {name} has offsets outside its {values.size} values or falling"
    if not np.array_equal(columns[1][0], columns[2][0]):
        return "its segment modalities and lengths do not pair up"
    return None


def batched(items: Iterable, size: int) -> Iterable[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
