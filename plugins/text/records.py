"""``text_records``: text corpora as they ship (FineWeb, the Pile, RedPajama, C4): JSON lines or
Parquet with a text column, plain or compressed (``.gz``, ``.zst``, ``.bz2``), local or in an
object store (``plugins.common.stored_files``).

One part per JSONL file, one per Parquet row group. Each record is one document; its split is a
stable hash of its file's name and its line or row. A record that cannot be read (a line that
is not JSON, no text field, a text field that is not a string, an empty text, a file cut short)
is yielded as a ``BadRecord``: ``data.on_bad_record`` decides.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Literal

from pydantic import Field

from mot_core.errors import MotError
from mot_core.plugin_api import BadRecord, PluginOptions, RawDocument, RawSegment, Split
from plugins.common.records import (
    iter_jsonl, iter_jsonl_blocks, iter_table_column, parquet_layout, row_keys, table_kind, table_parts,
    text_column_values,
)
from plugins.common.stored_files import StoredFile, StoredFilesSource, in_val_split


class TextRecordsOptions(PluginOptions):
    paths: list[str] = Field(min_length=1, description="JSONL or Parquet files: paths, globs, {000..099} ranges, "
                             "s3:// or gs:// URIs (a glob in the last part); .gz/.zst/.bz2 JSONL is decompressed")
    text_field: str = Field("text", min_length=1, description="the field (JSONL) or column (Parquet) holding the text")
    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto", description="auto: by the extension (.parquet, .pq: Parquet; .arrow, .feather, .ipc: Arrow IPC; "
        ".jsonl, .json, .ndjson: JSON lines)")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of records held out (a stable hash of each)")
    text_modality: str = Field("text", description="the modality that receives the text")


class TextRecords(StoredFilesSource):
    """JSON lines or Parquet rows with a text field: one document each."""

    name = "text_records"
    Options = TextRecordsOptions
    modalities = ("text",)

    def __init__(self, options: TextRecordsOptions):
        super().__init__(options)
        self.modalities = (options.text_modality,)

    def _format(self, file: StoredFile) -> str:
        if self.options.format != "auto":
            return self.options.format
        if table_kind(file):
            return "parquet"  # or Arrow IPC: a table read in parts
        if file.stem_suffix() in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        raise MotError(f"dataset '{self.name}': cannot tell the format of {file.name} from its name; set format: jsonl "
                       "or parquet")

    def _file_parts(self, file: StoredFile) -> list[int | None]:
        """A JSONL file whole (None), a Parquet or Arrow file's row groups or record batches."""
        return list(range(table_parts(file, self.name))) if self._format(file) == "parquet" else [None]

    def _native_reader(self, file: StoredFile) -> tuple[str, dict] | None:
        """JSON lines: Ray Data reads the (decompressed) bytes and the lines are parsed here, as
        locally (``read_json`` fails a whole file for one bad line, and numbers no lines);
        Parquet: ``read_parquet``; an Arrow IPC file has no Ray Data reader."""
        if self._format(file) == "jsonl":
            return "read_binary_files", {}
        return ("read_parquet", {"columns": [self.options.text_field]}) if table_kind(file) == "parquet" else None

    def _native_layout(self, file: StoredFile) -> tuple[tuple[int, ...] | None, str]:
        if table_kind(file) != "parquet":
            return None, ""
        return parquet_layout(file, [self.options.text_field], self.name)

    def _read(self, file: StoredFile, group: int | None, split: Split) -> Iterator[RawDocument | BadRecord]:
        opts: TextRecordsOptions = self.options
        rows = (iter_jsonl(file, opts.text_field) if group is None
                else iter_table_column(file, group, opts.text_field, self.name))
        return self._documents(file, rows, split)

    def _read_rows(self, file: StoredFile, group: int | None, rows: Any, split: Split
                   ) -> Iterator[RawDocument | BadRecord]:
        opts: TextRecordsOptions = self.options
        records = (iter_jsonl_blocks(rows.column("bytes").to_pylist(), file, opts.text_field) if group is None
                   else text_column_values(file, group, rows.column(opts.text_field), row_keys(rows), opts.text_field))
        return self._documents(file, records, split)

    def _documents(self, file: StoredFile, rows: Iterable[tuple[str, Any]], split: Split
                   ) -> Iterator[RawDocument | BadRecord]:
        opts: TextRecordsOptions = self.options
        for key, text in rows:
            # a bad record too belongs to one split, and is reported once (a file's or a row
            # group's, without a key of its own, with the train split)
            if key == "":
                if split == "train":
                    yield text
                continue
            if in_val_split(f"{file.base_name}:{key}", opts.val_fraction) != (split == "val"):
                continue
            if isinstance(text, BadRecord):
                yield text
            elif not isinstance(text, str):
                yield BadRecord(f"{file.name}: {key}", "wrong column type",
                                f"'{opts.text_field}' holds {type(text).__name__}, not a string")
            elif not text.strip():
                yield BadRecord(f"{file.name}: {key}", "empty document")
            else:
                yield RawDocument((RawSegment(opts.text_modality, text),))
