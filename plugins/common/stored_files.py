"""The files a data source names, wherever they are: local paths, ``s3://`` and ``gs://`` URIs
(through the same ``pyarrow.fs`` file systems, endpoint and credentials as the shards:
``mot_core.plugin_api.storage_path``), with glob and brace patterns, read plain or compressed.

    paths: ["/data/laion/{00000..00099}.tar"]            brace ranges keep their zero padding
    paths: ["s3://bucket/fineweb/*.jsonl.zst"]           a glob in the last component of a URI
    paths: ["corpus/**/*.parquet"]                       any glob, locally
    paths: ["s3://bucket/LibriSpeech/**/*.trans.txt"]    any depth below a URI's folder

A pattern that matches nothing is a one-line error naming it; files are listed in order
(patterns as given, each pattern's matches sorted), with their sizes and modification times,
which make the source's fingerprint (no file is read for it).
"""

from __future__ import annotations

import abc
import fnmatch
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

from mot_core.errors import MotError
from mot_core.plugin_api import BadRecord, DataSource, NativeFile, NativeRead, RawDocument, Split, storage_path

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}


@dataclass(frozen=True)
class StoredFile:
    """One listed file: ``name`` is how messages show it (the path or URI as listed)."""

    name: str
    filesystem: Any  # pyarrow.fs.FileSystem
    path: str
    size: int
    mtime_ns: int

    @property
    def base_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def folder(self) -> str:
        """The folder the file is in, as listed (a URI's, or a local path's)."""
        return self.name.split("?", 1)[0].rsplit("/", 1)[0]

    def compression(self) -> str | None:
        """The codec its name ends with (``.gz``, ``.zst``, ``.bz2``), or None."""
        return next((codec for suffix, codec in COMPRESSIONS.items() if self.base_name.endswith(suffix)), None)

    def stem_suffix(self) -> str:
        """Its extension without a compression suffix: ``.jsonl`` for ``x.jsonl.zst``."""
        name = self.base_name
        for suffix in COMPRESSIONS:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        return os.path.splitext(name)[1].lower()

    def open_stream(self):
        """A sequential stream of its (decompressed) bytes."""
        # buffered: a tar is read 512 bytes at a time, a JSONL file a line at a time
        return self.filesystem.open_input_stream(self.path, compression=self.compression(), buffer_size=1 << 20)

    def open_random_access(self):
        """A seekable file (Parquet reads its footer, then the row groups it needs)."""
        return self.filesystem.open_input_file(self.path)


def expand_braces(pattern: str) -> list[str]:
    """``a{0..2}b`` -> a0b a1b a2b (zero padding kept: ``{00..02}``); ``{x,y}`` -> x y; nested
    and repeated braces expand left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def list_files(patterns: list[str], option: str) -> list[StoredFile]:
    """Every file the patterns name, in order; ``option`` names the setting in errors
    (``mixture.datasets.NAME.options.paths``)."""
    files: list[StoredFile] = []
    for pattern in patterns:
        found: list[StoredFile] = []
        for expanded in expand_braces(pattern):
            found += _list_one(expanded, option)
        if not found:
            raise MotError(f"{option}: no file found at '{pattern}'")
        files += found
    return files


def _list_one(pattern: str, option: str) -> list[StoredFile]:
    import pyarrow.fs as pafs

    is_uri = "://" in pattern
    if not is_uri:
        names = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        fs, _ = storage_path(".", option)
        infos = [(name, fs.get_file_info(os.path.abspath(name))) for name in names]
        return [StoredFile(name, fs, info.path, info.size or 0, info.mtime_ns or 0)
                for name, info in infos if info.type == pafs.FileType.File]
    base, _, query = pattern.partition("?")
    if "/**/" in base:
        return _list_tree(base, query, pattern, option)
    folder, _, last = base.rpartition("/")
    if glob.has_magic(folder):
        raise MotError(f"{option}: '{pattern}': in a URI only the last part of the path, or a /**/ (any depth), "
                       "may be a pattern")
    uri_of = (lambda name: f"{folder}/{name}" + (f"?{query}" if query else ""))  # noqa: E731
    fs, root = storage_path(uri_of(last) if not glob.has_magic(last) else uri_of(""), option)
    try:
        if not glob.has_magic(last):
            info = fs.get_file_info(root)
            return [StoredFile(pattern, fs, root, info.size or 0, info.mtime_ns or 0)] if info.type == pafs.FileType.File else []
        infos = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), allow_not_found=True))
    except OSError as exc:
        raise MotError(f"{option}: cannot list '{pattern}': {' '.join(str(exc).split())}") from None
    matched = sorted((i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.base_name, last)),
                     key=lambda i: i.base_name)
    return [StoredFile(uri_of(i.base_name), fs, i.path, i.size or 0, i.mtime_ns or 0) for i in matched]


def _list_tree(base: str, query: str, pattern: str, option: str) -> list[StoredFile]:
    """``s3://bucket/librispeech/**/*.trans.txt``: every file below the folder before ``/**/``
    whose path under it matches the rest (at any depth), by one recursive listing."""
    import pyarrow.fs as pafs

    top, _, rest = base.partition("/**/")
    if glob.has_magic(top):
        raise MotError(f"{option}: '{pattern}': no pattern may come before /**/ in a URI")
    fs, root = storage_path(top + (f"?{query}" if query else ""), option)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), recursive=True, allow_not_found=True))
    except OSError as exc:
        raise MotError(f"{option}: cannot list '{pattern}': {' '.join(str(exc).split())}") from None
    prefix = root.rstrip("/") + "/"
    found = []
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        relative = info.path[len(prefix):]
        if fnmatch.fnmatchcase(relative, rest) or fnmatch.fnmatchcase(relative, f"*/{rest}"):
            name = f"{top}/{relative}" + (f"?{query}" if query else "")
            found.append(StoredFile(name, fs, info.path, info.size or 0, info.mtime_ns or 0))
    return found


def fingerprint(files: list[StoredFile], options: dict) -> str:
    """The files' names, sizes and modification times, and the source's options (no file read)."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for file in files:
        digest.update(f"\0{file.name}\0{file.size}\0{file.mtime_ns}".encode())
    return digest.hexdigest()


def in_val_split(key: str, val_fraction: float) -> bool:
    """A record's split, from a stable hash of its key (its file's name and its row or member)."""
    import zlib

    return zlib.crc32(key.encode("utf-8")) % 10_000 < val_fraction * 10_000


class StoredFilesSource(DataSource):
    """A source over the files its ``paths`` option lists (local or in an object store), read in
    parts: each file whole, or the parts ``_file_parts`` splits it into (a Parquet file's row
    groups). Subclasses read one part (``_read``); listing, parts, ``documents`` and the
    fingerprint (the files' names, sizes and times, and the options) are shared."""

    def __init__(self, options):
        super().__init__(options)
        self._listed: list[StoredFile] | None = None
        self._parts: list[tuple[StoredFile, Any]] | None = None

    def _files(self) -> list[StoredFile]:
        if self._listed is None:
            self._listed = list_files(self.options.paths, f"dataset '{self.name}' paths")
        return self._listed

    def _file_parts(self, file: StoredFile) -> list[Any]:
        """The parts of one file (handed to ``_read``); by default the file whole."""
        return [None]

    def _all_parts(self) -> list[tuple[StoredFile, Any]]:
        if self._parts is None:
            self._parts = [(file, part) for file in self._files() for part in self._file_parts(file)]
        return self._parts

    def num_parts(self, split: Split) -> int:
        return len(self._all_parts())

    def read_part(self, split: Split, part: int) -> Iterator[RawDocument | BadRecord]:
        parts = self._all_parts()
        if not 0 <= part < len(parts):
            raise MotError(f"dataset '{self.name}' has {len(parts)} parts, asked for part {part}")
        return self._read(*parts[part], split)

    def documents(self, split: Split) -> Iterator[RawDocument | BadRecord]:
        for file, part in self._all_parts():
            yield from self._read(file, part, split)

    def fingerprint(self) -> str:
        try:
            files = self._files()
        except MotError:  # documents() says what is missing
            files = []
        return fingerprint(files, self.options.model_dump(mode="json"))

    # -- Ray Data's readers, on a cluster (``mot data tokenize --address``) ---------------------

    def _native_reader(self, file: StoredFile) -> tuple[str, dict] | None:
        """The ``ray.data`` reader of ``file`` and its options (``columns``: the only columns to
        read), or None: the source's own reader reads it (``_read``). Subclasses with a native
        reader override this and ``_read_rows``."""
        return None

    def _native_layout(self, file: StoredFile) -> tuple[tuple[int, ...] | None, str]:
        """(the rows of each of the file's parts, for a file read in several parts: a Parquet
        file's row groups, else None; what must match for files to be read together: their
        columns' types), as the source sees them without reading the rows."""
        return None, ""

    def native_reads(self, split: Split) -> list[NativeRead]:
        """One read per reader (and file system) over the files a native reader reads; both
        splits read the same files (a record's split is decided row by row)."""
        groups: list[tuple[str, dict, str, Any, list[NativeFile]]] = []
        files: list[list] = []  # [file, its number of parts], in part order (a file without parts has none to read)
        for file, _ in self._all_parts():
            if files and files[-1][0] is file:
                files[-1][1] += 1
            else:
                files.append([file, 1])
        first = 0
        for file, parts in files:
            chosen = self._native_reader(file) if "." in file.base_name else None  # Ray selects files by extension
            if chosen is not None:
                reader, options = chosen
                part_rows, layout = self._native_layout(file)
                entry = NativeFile(file.path, first, part_rows)
                group = next((g for g in groups if g[:2] == (reader, options) and g[2] == layout
                              and g[3].equals(file.filesystem)), None)
                if group is None:
                    groups.append((reader, options, layout, file.filesystem, [entry]))
                else:
                    group[4].append(entry)
            first += parts
        reads = []
        for reader, options, _, fs, files in groups:
            options = dict(options)
            columns = options.pop("columns", None)
            reads.append(NativeRead(reader, tuple(files), fs, options, tuple(columns) if columns else None))
        return reads

    def read_rows(self, split: Split, part: int, rows: Any) -> Iterator[RawDocument | BadRecord]:
        parts = self._all_parts()
        if not 0 <= part < len(parts):
            raise MotError(f"dataset '{self.name}' has {len(parts)} parts, asked for part {part}")
        return self._read_rows(*parts[part], rows, split)

    def _read_rows(self, file: StoredFile, part: Any, rows: Any, split: Split) -> Iterator[RawDocument | BadRecord]:
        """``_read`` of one part from the rows a native reader gave for it (a ``pyarrow.Table``,
        file order, with ``path`` and ``row`` columns)."""
        raise MotError(f"dataset '{self.name}' has no Ray Data reader for {file.name}")

    @abc.abstractmethod
    def _read(self, file: StoredFile, part: Any, split: Split) -> Iterator[RawDocument | BadRecord]:
        """The documents of one part of ``file`` in ``split``, a ``BadRecord`` in place of each
        record that cannot be read."""
