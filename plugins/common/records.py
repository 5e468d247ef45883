"""Records of data files as they ship, for the built-in sources: JSON lines (plain or
compressed) and Parquet row groups, each record with its key (``line N``, ``row N``) and what
cannot be read as a ``BadRecord`` naming it."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Iterator

from mot_core.errors import MotError
from mot_core.plugin_api import BadRecord
from plugins.common.messages import one_line
from plugins.common.stored_files import StoredFile


def iter_jsonl(file: StoredFile, field: str | None) -> Iterator[tuple[str, object]]:
    """("line N", the field's value, or with ``field`` None the whole object) of each line; a
    line that is not a JSON object, or lacks the field, as ("line N", BadRecord); a file cut
    short (or a compressed stream that is) ends with ("", BadRecord)."""
    try:
        with file.open_stream() as stream:
            yield from iter_jsonl_blocks(iter(lambda: stream.read(1 << 20), b""), file, field)
    except OSError as exc:
        yield "", BadRecord(file.name, "truncated file", one_line(exc))


def iter_jsonl_blocks(blocks: Iterable[bytes], file: StoredFile, field: str | None) -> Iterator[tuple[str, object]]:
    """``iter_jsonl`` over the file's (decompressed) bytes in blocks: what Ray Data's
    ``read_binary_files`` gives on a cluster is one block, the file whole. Lines are split at
    ``\\n`` only (a JSON string may hold U+2028), and numbered from 1, blank ones included."""
    number, pending = 0, b""
    for block in blocks:
        pending += block
        lines = pending.split(b"\n")
        pending = lines.pop()
        for line in lines:
            number += 1
            yield from _jsonl_line(file, number, line, field)
    if pending.strip():
        yield from _jsonl_line(file, number + 1, pending, field)


def _jsonl_line(file: StoredFile, number: int, line: bytes, field: str):
    if not line.strip():
        return
    key = f"line {number}"
    try:
        record = json.loads(line)
    except ValueError as exc:
        yield key, BadRecord(f"{file.name}: {key}", "unreadable record", one_line(exc))
        return
    if not isinstance(record, dict):
        yield key, BadRecord(f"{file.name}: {key}", "unreadable record", f"a JSON {type(record).__name__}, not an object")
        return
    if field is None:
        yield key, record
        return
    if record.get(field) is None:
        yield key, BadRecord(f"{file.name}: {key}", "missing text", f"no '{field}' field")
        return
    yield key, record[field]


TABLE_KINDS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}


def table_kind(file: StoredFile) -> str | None:
    """"parquet" or "arrow" (an Arrow IPC file or stream: Feather v2, ``datasets``' own files)
    by the file's extension, else None."""
    return TABLE_KINDS.get(file.stem_suffix())


def table_parts(file: StoredFile, source: str) -> int:
    """The parts of a table file: a Parquet file's row groups (its footer alone is read), an
    Arrow IPC file's record batches; an Arrow stream is read whole, one part."""
    import pyarrow as pa

    if table_kind(file) != "arrow":
        return len(parquet_footer(file, source)[1])
    try:
        with file.open_random_access() as handle:
            try:
                return pa.ipc.open_file(handle).num_record_batches
            except pa.ArrowInvalid:  # a stream (datasets' save_to_disk writes those): one part
                return 1
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise MotError(f"dataset '{source}': {file.name} is not a readable arrow file ({one_line(exc)})") from None


_FOOTERS: dict[tuple[str, int, int], tuple] = {}  # (name, size, mtime) -> footer: its parts, then a Ray Data read's


def parquet_footer(file: StoredFile, source: str) -> tuple[Any, tuple[int, ...]]:
    """(the Arrow schema, the rows of each row group) of a Parquet file, from its footer alone,
    read once per process while the file is unchanged (listing its parts, then planning a Ray
    Data read, both need it: one request each to an object store)."""
    import pyarrow.parquet as pq

    key = (file.name, file.size, file.mtime_ns)
    if key not in _FOOTERS:
        try:
            with file.open_random_access() as handle:
                parquet = pq.ParquetFile(handle)
                meta = parquet.metadata
                footer = parquet.schema_arrow, tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise MotError(f"dataset '{source}': {file.name} is not a readable Parquet file ({one_line(exc)})") from None
        if len(_FOOTERS) >= 4096:
            _FOOTERS.clear()
        _FOOTERS[key] = footer
    return _FOOTERS[key]


def check_columns(file: StoredFile, names: list[str], columns: list[str], source: str) -> None:
    """A column the config names but the file lacks: one line naming the columns it has."""
    missing = [c for c in columns if c not in names]
    if missing:
        raise MotError(f"dataset '{source}': {file.name} has no column '{missing[0]}' (it has: {', '.join(names)}); "
                       "set the column options")


def read_table_part(file: StoredFile, part: int, columns: list[str], source: str):
    """(the name of each row's place, {column: pyarrow array}) of one part (a row group, a
    record batch), or a BadRecord for a part that cannot be read. A column the file lacks is a
    one-line error naming the columns it has."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with file.open_random_access() as handle:
            if table_kind(file) == "arrow":
                try:
                    reader = pa.ipc.open_file(handle)
                    table, names = pa.Table.from_batches([reader.get_batch(part)]), reader.schema.names
                    key = (lambda offset: f"batch {part} row {offset}") if reader.num_record_batches > 1 else \
                        (lambda offset: f"row {offset}")
                except pa.ArrowInvalid:
                    handle.seek(0)
                    table = pa.ipc.open_stream(handle).read_all()
                    names, key = table.schema.names, (lambda offset: f"row {offset}")
            else:
                parquet = pq.ParquetFile(handle)
                names = parquet.schema_arrow.names
                first = sum(parquet.metadata.row_group(g).num_rows for g in range(part))
                table = parquet.read_row_group(part, columns=[c for c in columns if c in names])
                key = lambda offset: f"row {first + offset}"  # noqa: E731
    except (OSError, ValueError) as exc:
        return BadRecord(f"{file.name}: part {part}", "unreadable row group", one_line(exc))
    check_columns(file, names, columns, source)
    return key, {c: table.column(c) for c in columns}


def iter_table_column(file: StoredFile, part: int, column: str, source: str) -> Iterator[tuple[str, object]]:
    """("row N", value) of one text column of one part; a column of another type than text is
    one BadRecord for the part (keyed "" : reported once)."""
    read = read_table_part(file, part, [column], source)
    if isinstance(read, BadRecord):
        yield "", read
        return
    key, columns = read
    yield from text_column_values(file, part, columns[column], key, column)


def text_column_values(file: StoredFile, part: int, values: Any, key: Callable[[int], str],
                       column: str) -> Iterator[tuple[str, object]]:
    """("row N", value) of a part's text column (a pyarrow array), ``key(offset)`` naming each
    row; a column of another type than text is one BadRecord for the part (keyed "")."""
    import pyarrow as pa

    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        yield "", BadRecord(f"{file.name}: part {part}", "wrong column type", f"'{column}' is {values.type}, not a string")
        return
    for offset, value in enumerate(values.to_pylist()):
        if value is None:
            yield key(offset), BadRecord(f"{file.name}: {key(offset)}", "missing text", f"'{column}' is null")
        else:
            yield key(offset), value


def parquet_layout(file: StoredFile, columns: list[str], source: str) -> tuple[tuple[int, ...], str]:
    """(the rows of each row group, the columns' types) of a Parquet file, from its footer alone;
    a column the file lacks is the one-line error ``read_table_part`` gives. Files whose columns
    differ in type are read apart (Ray Data's ``read_parquet`` refuses to merge them, where each
    part whose column has the wrong type is a bad record)."""
    schema, rows = parquet_footer(file, source)
    check_columns(file, schema.names, columns, source)
    return rows, ", ".join(f"{c}: {schema.field(c).type}" for c in columns)


def row_keys(rows: Any) -> Callable[[int], str]:
    """``key(offset)`` -> "row N" for the rows of a part a Ray Data reader gave (``rows``: a
    ``pyarrow.Table`` with the engine's ``row`` column, each row's position in its file), as
    ``read_table_part`` names a Parquet file's rows."""
    positions = rows.column("row").to_pylist()
    return lambda offset: f"row {positions[offset]}"
