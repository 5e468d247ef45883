"""Image-text data as it ships, local or in an object store (``plugins.common.stored_files``):

    webdataset            img2dataset's WebDataset tars: KEY.jpg|png|webp + KEY.txt and/or KEY.json
    image_text_parquet    Parquet (or Arrow IPC) rows with image bytes and a caption (LAION-style,
                          or the HF ``datasets`` Image feature: {"bytes", "path"} structs)
    interleaved_documents OBELICS / MMC4 rows: ``texts`` and ``images`` lists in document order
                          (Parquet or JSON lines), one document each, its segments in that order

One part per tar file, one per Parquet row group, one per JSONL file. A record's split is a
stable hash of its file's name and its key or row. A record that cannot be read (a tar cut
short, an image that does not decode, no caption, a column of another type, an empty document)
is yielded as a ``BadRecord``: ``data.on_bad_record`` decides. Images become (3, S, S) tensors
in [-1, 1] (``image_size``: shorter side resized, centre-cropped), as ``captioned_images`` reads
a folder of one's own.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Literal

from pydantic import Field

from mot_core.errors import MotError
from mot_core.plugin_api import BadRecord, PluginOptions, RawDocument, RawSegment, Split, storage_path
from plugins.common.images import decode_image_bytes, to_signed_float
from plugins.common.messages import one_line
from plugins.common.stored_files import StoredFile, StoredFilesSource, in_val_split
from plugins.images.data import Direction, _drops_caption
from plugins.common.records import (
    iter_jsonl, iter_jsonl_blocks, parquet_layout, read_table_part, row_keys, table_kind, table_parts,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ImageTextOptions(PluginOptions):
    paths: list[str] = Field(min_length=1, description="files: paths, globs, {00000..00099} ranges, s3:// or gs:// "
                             "URIs (a glob in the last part)")
    image_size: int = Field(32, ge=1, description="side of the square images: shorter side resized, centre-cropped")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of records held out (a stable hash of each)")
    text_modality: str = Field("text", description="modality that receives the text")
    image_modality: str = Field("image", description="modality that receives the (3, H, W) image tensors")


class PairOptions(ImageTextOptions):
    directions: list[Direction] = Field(
        default_factory=lambda: ["caption_to_image", "image_to_caption"], min_length=1,
        description="caption_to_image: caption then image; image_to_caption: image then caption")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="fraction of training caption_to_image documents "
                                   "without their caption (classifier-free guidance)")


class _StoredSource(StoredFilesSource):
    """Image-text files; subclasses say how a file splits into parts and reads."""

    def __init__(self, options: ImageTextOptions):
        super().__init__(options)
        self.modalities = (options.text_modality, options.image_modality)

    def _in_split(self, file: StoredFile, key: str, split: Split) -> bool:
        return in_val_split(f"{file.base_name}:{key}", self.options.val_fraction) == (split == "val")

    def _image(self, data: bytes, where: str) -> torch_tensor_or_bad:
        import torch

        try:
            pixels = decode_image_bytes(data, self.options.image_size)
        except ValueError as exc:
            return BadRecord(where, "undecodable image", str(exc))
        return to_signed_float(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())

    def _pair(self, caption: str, image, name: str, split: Split) -> Iterator[RawDocument]:
        opts: PairOptions = self.options
        text = RawSegment(opts.text_modality, caption)
        picture = RawSegment(opts.image_modality, image)
        for direction in opts.directions:
            if direction == "image_to_caption":
                yield RawDocument((picture, text))
            elif split == "train" and _drops_caption(name, opts.caption_dropout):
                yield RawDocument((picture,))
            else:
                yield RawDocument((text, picture))


torch_tensor_or_bad = Any  # a (3, S, S) float tensor, or the BadRecord saying why there is none


# -- WebDataset --------------------------------------------------------------------------------

class WebDatasetOptions(PairOptions):
    caption_field: str = Field(
        "txt", min_length=1,
        description="txt: the KEY.txt member; any other name: that field of the KEY.json member (e.g. caption)")


class WebDataset(_StoredSource):
    """img2dataset's WebDataset tars: one image-caption pair per key."""

    name = "webdataset"
    Options = WebDatasetOptions
    modalities = ("text", "image")

    def _native_reader(self, file: StoredFile) -> tuple[str, dict] | None:
        return "read_webdataset", {"decoder": None}  # the members' bytes, decoded here as locally

    def _read(self, file: StoredFile, part: Any, split: Split) -> Iterator[RawDocument | BadRecord]:
        return self._documents(file, iter_tar_samples(file), split)

    def _read_rows(self, file: StoredFile, part: Any, rows: Any, split: Split) -> Iterator[RawDocument | BadRecord]:
        return self._documents(file, webdataset_samples(rows), split)

    def _documents(self, file: StoredFile, samples: Iterable[tuple[str, Any]], split: Split
                   ) -> Iterator[RawDocument | BadRecord]:
        for key, members in samples:
            if isinstance(members, BadRecord):
                if split == "train":  # the rest of the file is lost: reported once
                    yield members
                continue
            if not self._in_split(file, key, split):
                continue
            where = f"{file.name}: {key}"
            caption = self._caption(members, where)
            if isinstance(caption, BadRecord):
                yield caption
                continue
            found = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
            if found is None:
                yield BadRecord(where, "missing image", f"no member {' or '.join(f'{key}.{e}' for e in IMAGE_EXTENSIONS)}")
                continue
            image = self._image(members[found], f"{where}.{found}")
            if isinstance(image, BadRecord):
                yield image
                continue
            yield from self._pair(caption, image, f"{file.base_name}/{key}", split)

    def _caption(self, members: dict[str, bytes], where: str) -> str | BadRecord:
        field = self.options.caption_field
        try:
            if field == "txt":
                if "txt" not in members:
                    return BadRecord(where, "missing caption", "no .txt member")
                caption = members["txt"].decode("utf-8")
            else:
                if "json" not in members:
                    return BadRecord(where, "missing caption", "no .json member")
                caption = json.loads(members["json"]).get(field)
                if caption is None:
                    return BadRecord(where, "missing caption", f"no '{field}' in its .json")
                if not isinstance(caption, str):
                    return BadRecord(where, "wrong column type", f"'{field}' holds {type(caption).__name__}")
        except (UnicodeDecodeError, ValueError, AttributeError) as exc:
            return BadRecord(where, "unreadable caption", one_line(exc))
        if not caption.strip():
            return BadRecord(where, "missing caption", "empty")
        return caption.strip()


def webdataset_samples(rows: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample Ray Data's ``read_webdataset`` gave (with
    ``decoder=None``): one row per key, a column per member extension (null where a sample
    lacks it), as ``iter_tar_samples`` reads them (extensions lower-cased)."""
    own = {"__key__", "__url__", "path", "row"}
    members = [name for name in rows.column_names if name not in own]
    columns = {name: rows.column(name).to_pylist() for name in members}
    for index, key in enumerate(rows.column("__key__").to_pylist()):
        sample = {}
        for name in members:
            value = columns[name][index]
            if isinstance(value, (bytes, bytearray)):
                sample[name.lower()] = bytes(value)
        yield key, sample


def iter_tar_samples(file: StoredFile) -> Iterator[tuple[str, dict[str, bytes] | BadRecord]]:
    """(key, {extension: bytes}) of each sample of a tar, read as a stream (WebDataset's
    convention: a member's key is its path up to the first dot of its name); a tar cut short
    ends with (``""``, BadRecord)."""
    import tarfile

    key, members = None, {}
    try:
        with file.open_stream() as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, _, base = info.name.rpartition("/")
                stem, _, extension = base.partition(".")
                member_key = f"{folder}/{stem}" if folder else stem
                if key is not None and member_key != key:
                    yield key, members
                    members = {}
                key = member_key
                members[extension.lower()] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield "", BadRecord(file.name, "truncated tar", f"{one_line(exc) or type(exc).__name__}; the samples after "
                            f"{key or 'its start'} are lost")
        return
    if key is not None:
        yield key, members


# -- Parquet with image bytes ------------------------------------------------------------------

class ImageTextParquetOptions(PairOptions):
    image_column: str = Field("image", min_length=1, description="image bytes, or a {bytes, path} struct (the HF "
                              "datasets Image feature; a path is relative to the Parquet file's folder)")
    caption_column: str = Field("caption", min_length=1, description="the caption (LAION: TEXT; HF sets: text)")


class ImageTextParquet(_StoredSource):
    """Parquet (or Arrow) rows of image bytes and a caption: LAION-style, or HF ``datasets``."""

    name = "image_text_parquet"
    Options = ImageTextParquetOptions
    modalities = ("text", "image")

    def _file_parts(self, file: StoredFile) -> list[Any]:
        return list(range(table_parts(file, self.name)))

    def _native_reader(self, file: StoredFile) -> tuple[str, dict] | None:
        opts: ImageTextParquetOptions = self.options
        return ("read_parquet", {"columns": [opts.image_column, opts.caption_column]}) \
            if table_kind(file) == "parquet" else None  # an Arrow IPC file has no Ray Data reader

    def _native_layout(self, file: StoredFile) -> tuple[tuple[int, ...] | None, str]:
        opts: ImageTextParquetOptions = self.options
        return parquet_layout(file, [opts.image_column, opts.caption_column], self.name)

    def _read(self, file: StoredFile, group: Any, split: Split) -> Iterator[RawDocument | BadRecord]:
        opts: ImageTextParquetOptions = self.options
        rows = read_table_part(file, group, [opts.image_column, opts.caption_column], self.name)
        if isinstance(rows, BadRecord):
            if split == "train":
                yield rows
            return
        yield from self._documents(file, *rows, split)

    def _read_rows(self, file: StoredFile, group: Any, rows: Any, split: Split) -> Iterator[RawDocument | BadRecord]:
        opts: ImageTextParquetOptions = self.options
        columns = {c: rows.column(c) for c in (opts.image_column, opts.caption_column)}
        return self._documents(file, row_keys(rows), columns, split)

    def _documents(self, file: StoredFile, key_of, columns: dict, split: Split) -> Iterator[RawDocument | BadRecord]:
        opts: ImageTextParquetOptions = self.options
        cells, captions = columns[opts.image_column].to_pylist(), columns[opts.caption_column].to_pylist()
        for offset, (cell, caption) in enumerate(zip(cells, captions)):
            key = key_of(offset)
            if not self._in_split(file, key, split):
                continue
            where = f"{file.name}: {key}"
            if caption is None or (isinstance(caption, str) and not caption.strip()):
                yield BadRecord(where, "missing caption", f"'{opts.caption_column}' is empty")
                continue
            if not isinstance(caption, str):
                yield BadRecord(where, "wrong column type", f"'{opts.caption_column}' holds {type(caption).__name__}")
                continue
            data = image_cell_bytes(cell, file, where, opts.image_column)
            if isinstance(data, BadRecord):
                yield data
                continue
            image = self._image(data, where)
            if isinstance(image, BadRecord):
                yield image
                continue
            yield from self._pair(caption.strip(), image, f"{file.base_name}/{key}", split)


def image_cell_bytes(cell: Any, file: StoredFile, where: str, column: str) -> bytes | BadRecord:
    """An image cell's encoded bytes: bytes themselves, a {bytes, path} struct (bytes first), or a
    path string (relative to the file's folder; a URL is not read: download the images first)."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str) and cell:
        if cell.startswith(("http://", "https://")):
            return BadRecord(where, "image not local", f"{cell[:80]}: fetch the images first (img2dataset)")
        path = cell if cell.startswith("/") or "://" in cell else f"{file.folder}/{cell}"
        try:
            fs, resolved = storage_path(path, column)
            with fs.open_input_stream(resolved) as handle:
                return handle.read()
        except (OSError, MotError) as exc:
            return BadRecord(where, "missing image", f"{path}: {one_line(exc)}")
    if cell is None:
        return BadRecord(where, "missing image", f"'{column}' is empty")
    return BadRecord(where, "wrong column type", f"'{column}' holds {type(cell).__name__}")


# -- interleaved documents ---------------------------------------------------------------------

class InterleavedOptions(ImageTextOptions):
    texts_column: str = Field("texts", min_length=1, description="the list of texts (None where an image stands)")
    images_column: str = Field("images", min_length=1, description="the list of images (None where a text stands): "
                               "bytes, {bytes, path} structs or paths relative to the file's folder")
    format: Literal["auto", "jsonl", "parquet"] = Field("auto", description="auto: by the extension")


class InterleavedDocuments(_StoredSource):
    """OBELICS / MMC4-style documents: texts and images in reading order, one document a row."""

    name = "interleaved_documents"
    Options = InterleavedOptions
    modalities = ("text", "image")

    def _format(self, file: StoredFile) -> str:
        if self.options.format != "auto":
            return self.options.format
        if table_kind(file):
            return "parquet"  # or Arrow IPC: a table read in parts
        if file.stem_suffix() in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        raise MotError(f"dataset '{self.name}': cannot tell the format of {file.name} from its name; set format")

    def _file_parts(self, file: StoredFile) -> list[Any]:
        return list(range(table_parts(file, self.name))) if self._format(file) == "parquet" else [None]

    def _native_reader(self, file: StoredFile) -> tuple[str, dict] | None:
        opts: InterleavedOptions = self.options
        if self._format(file) == "jsonl":
            return "read_binary_files", {}  # the lines are parsed here, as locally
        return ("read_parquet", {"columns": [opts.texts_column, opts.images_column]}) \
            if table_kind(file) == "parquet" else None

    def _native_layout(self, file: StoredFile) -> tuple[tuple[int, ...] | None, str]:
        opts: InterleavedOptions = self.options
        return parquet_layout(file, [opts.texts_column, opts.images_column], self.name) \
            if table_kind(file) == "parquet" else (None, "")

    def _read(self, file: StoredFile, group: Any, split: Split) -> Iterator[RawDocument | BadRecord]:
        return self._documents(file, self._rows(file, group), split)

    def _read_rows(self, file: StoredFile, group: Any, rows: Any, split: Split) -> Iterator[RawDocument | BadRecord]:
        opts: InterleavedOptions = self.options
        if group is None:
            records = self._pairs(iter_jsonl_blocks(rows.column("bytes").to_pylist(), file, None))
        else:
            records = self._table_pairs(row_keys(rows), {c: rows.column(c) for c in (opts.texts_column,
                                                                                     opts.images_column)})
        return self._documents(file, records, split)

    def _documents(self, file: StoredFile, rows: Iterable[tuple[str, Any]], split: Split
                   ) -> Iterator[RawDocument | BadRecord]:
        for key, row in rows:
            if not key:  # a file or row group that cannot be read: reported once, with the train split
                if split == "train":
                    yield row
                continue
            if not self._in_split(file, key, split):
                continue
            if isinstance(row, BadRecord):
                yield row
                continue
            yield self._document(row, file, f"{file.name}: {key}")

    def _rows(self, file: StoredFile, group: Any) -> Iterator[tuple[str, Any]]:
        opts: InterleavedOptions = self.options
        if group is None:
            yield from self._pairs(iter_jsonl_records(file))
            return
        rows = read_table_part(file, group, [opts.texts_column, opts.images_column], self.name)
        if isinstance(rows, BadRecord):
            yield "", rows
            return
        yield from self._table_pairs(*rows)

    def _pairs(self, records: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """(key, (texts, images)) of JSON lines records."""
        opts: InterleavedOptions = self.options
        for key, record in records:
            yield key, record if isinstance(record, BadRecord) else (record.get(opts.texts_column),
                                                                    record.get(opts.images_column))

    def _table_pairs(self, key_of, columns: dict) -> Iterator[tuple[str, Any]]:
        opts: InterleavedOptions = self.options
        for offset, pair in enumerate(zip(columns[opts.texts_column].to_pylist(), columns[opts.images_column].to_pylist())):
            yield key_of(offset), pair

    def _document(self, row: tuple[Any, Any], file: StoredFile, where: str) -> RawDocument | BadRecord:
        opts: InterleavedOptions = self.options
        texts, images = row
        if not isinstance(texts, list) or not isinstance(images, list):
            return BadRecord(where, "wrong column type", f"'{opts.texts_column}' and '{opts.images_column}' must be "
                             f"lists, not {type(texts).__name__} and {type(images).__name__}")
        if len(texts) != len(images):
            return BadRecord(where, "wrong column type", f"{len(texts)} texts but {len(images)} images (one of each "
                             "per position, the other None)")
        segments = []
        for position, (text, image) in enumerate(zip(texts, images)):
            if text is not None and image is not None:
                return BadRecord(where, "wrong column type", f"position {position} holds a text and an image")
            if text is not None:
                if not isinstance(text, str):
                    return BadRecord(where, "wrong column type", f"text {position} is {type(text).__name__}")
                if text.strip():
                    segments.append(RawSegment(opts.text_modality, text))
            elif image is not None:
                data = image_cell_bytes(image, file, f"{where}, image {position}", opts.images_column)
                if isinstance(data, BadRecord):
                    return data
                decoded = self._image(data, f"{where}, image {position}")
                if isinstance(decoded, BadRecord):
                    return decoded
                segments.append(RawSegment(opts.image_modality, decoded))
        if not segments:
            return BadRecord(where, "empty document", "no text and no image")
        return RawDocument(tuple(segments))


def iter_jsonl_records(file: StoredFile) -> Iterator[tuple[str, dict | BadRecord]]:
    """("line N", the JSON object) of each line; what is not an object as a BadRecord."""
    for key, value in iter_jsonl(file, field=None):
        yield key, value
