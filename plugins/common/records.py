"""Records of data files as they ship, for the built-in sources: JSON lines (plain or
compressed) and Parquet row groups, each record with its key (``line N``, ``row N``) and what
cannot be read as a ``BadRecord`` naming it."""

from __future__ import annotations

import json
from typing import Iterator

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
            number, pending = 0, b""
            while True:
                block = stream.read(1 << 20)
                if not block:
                    break
                pending += block
                lines = pending.split(b"\n")
                pending = lines.pop()
                for line in lines:
                    number += 1
                    yield from _jsonl_line(file, number, line, field)
            if pending.strip():
                yield from _jsonl_line(file, number + 1, pending, field)
    except OSError as exc:
        yield "", BadRecord(file.name, "truncated file", one_line(exc))


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


def parquet_row_groups(file: StoredFile, source: str) -> int:
    """How many row groups a Parquet file has (its footer alone is read)."""
    import pyarrow.parquet as pq

    try:
        with file.open_random_access() as handle:
            return pq.ParquetFile(handle).metadata.num_row_groups
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise MotError(f"dataset '{source}': {file.name} is not a readable Parquet file ({one_line(exc)})") from None


def iter_parquet_column(file: StoredFile, group: int, column: str, source: str) -> Iterator[tuple[str, object]]:
    """("row N", value) of one column of one row group (N counts from the file's first row); a
    column of another type than text is one BadRecord for the row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with file.open_random_access() as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            if column not in names:
                raise MotError(f"dataset '{source}': {file.name} has no column '{column}' (it has: {', '.join(names)}); "
                               "set text_field")
            first = sum(parquet.metadata.row_group(g).num_rows for g in range(group))
            table = parquet.read_row_group(group, columns=[column])
    except (OSError, ValueError) as exc:
        yield f"row group {group}", BadRecord(f"{file.name}: row group {group}", "unreadable row group", one_line(exc))
        return
    values = table.column(column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        yield f"row group {group}", BadRecord(f"{file.name}: row group {group}", "wrong column type",
                                              f"'{column}' is {values.type}, not a string")
        return
    for offset, value in enumerate(values.to_pylist()):
        key = f"row {first + offset}"
        if value is None:
            yield key, BadRecord(f"{file.name}: {key}", "missing text", f"'{column}' is null")
        else:
            yield key, value
