"""``hf_dataset``: a Hugging Face ``datasets`` set on local disk, read with ``datasets`` itself
(offline: ``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE`` are set before it is imported).

    path: runs/sets/captions          a save_to_disk folder (a Dataset or a DatasetDict)
    path: /data/my_set                a folder load_dataset reads (Parquet, JSON lines, CSV,
                                      imagefolder, audiofolder; a Hub cache snapshot)
    columns: {image: image, text: text}     column -> modality, in document order

A column's feature says what it holds: ``Image`` (decoded here to ``image_size``, centre-cropped),
``Audio`` (decoded here at its own rate; the speech modality resamples), a string ``Value``
(text). The val split is the set's ``val_split`` (default ``validation``, else ``test``) when
the set has it, else a stable hash of each train row with ``val_fraction``. A part is
``rows_per_part`` consecutive rows. A cell that cannot be read (an image that does not decode,
audio libsndfile cannot read, an empty text, a None) is a ``BadRecord``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field

from mot_core.errors import MotError
from mot_core.plugin_api import BadRecord, DataSource, PluginOptions, RawDocument, RawSegment, Split
from plugins.common.audio import decode_audio_bytes
from plugins.common.images import decode_image_bytes, to_signed_float
from plugins.common.messages import one_line
from plugins.common.stored_files import in_val_split

EXTRA = "pip install 'mot-framework[hf-datasets]'"


class HuggingFaceDatasetOptions(PluginOptions):
    path: str = Field(min_length=1, description="a save_to_disk folder, or a local folder datasets.load_dataset reads")
    columns: dict[str, str] = Field(min_length=1, description="column -> modality, in the order of the document's "
                                    "segments (e.g. {image: image, text: text})")
    train_split: str = Field("train", description="the set's split to train on")
    val_split: str | None = Field(None, description="the set's held-out split; default validation, else test, else "
                                  "val_fraction of the train rows")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="held out by a stable hash of each row, when the set "
                                "has no held-out split")
    image_size: int = Field(32, ge=1, description="side of the square images: shorter side resized, centre-cropped")
    rows_per_part: int = Field(4096, ge=1, description="consecutive rows per part")


class HuggingFaceDataset(DataSource):
    name = "hf_dataset"
    Options = HuggingFaceDatasetOptions
    modalities = ()

    def __init__(self, options: HuggingFaceDatasetOptions):
        super().__init__(options)
        self.modalities = tuple(dict.fromkeys(options.columns.values()))
        self._sets: dict[str, Any] | None = None
        self._kinds: dict[str, str] | None = None

    # -- opening ---------------------------------------------------------------------------

    def _open(self) -> dict[str, Any]:
        """{"train": Dataset, "val": Dataset or None} with Image and Audio columns left encoded."""
        if self._sets is not None:
            return self._sets
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched: the set is on this disk
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        try:
            import datasets
        except ImportError:
            raise MotError(f"dataset '{self.name}' needs the Hugging Face datasets package: {EXTRA}") from None
        opts: HuggingFaceDatasetOptions = self.options
        folder = Path(opts.path)
        if not folder.is_dir():
            raise MotError(f"dataset '{self.name}': no folder at {folder}")
        try:
            if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
                loaded = datasets.load_from_disk(str(folder))
            else:
                loaded = datasets.load_dataset(str(folder))
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; one line names the folder
            raise MotError(f"dataset '{self.name}': datasets cannot read {folder} ({one_line(exc)})") from None
        self._names = {"train": "train", "val": "train"}
        if isinstance(loaded, datasets.Dataset):
            train, val = loaded, None
        else:
            if opts.train_split not in loaded:
                raise MotError(f"dataset '{self.name}': {folder} has no split '{opts.train_split}' (it has: "
                               f"{', '.join(loaded)}); set train_split")
            train = loaded[opts.train_split]
            wanted = opts.val_split or next((s for s in ("validation", "test") if s in loaded), None)
            if opts.val_split is not None and opts.val_split not in loaded:
                raise MotError(f"dataset '{self.name}': {folder} has no split '{opts.val_split}' (it has: "
                               f"{', '.join(loaded)}); set val_split")
            val = loaded[wanted] if wanted else None
            self._names = {"train": opts.train_split, "val": wanted or opts.train_split}
        self._kinds = self._column_kinds(train)
        sets = {"train": self._encoded(train), "val": self._encoded(val) if val is not None else None}
        self._sets = sets
        return sets

    def _column_kinds(self, ds) -> dict[str, str]:
        import datasets

        kinds = {}
        for column in self.options.columns:
            if column not in ds.features:
                raise MotError(f"dataset '{self.name}': {self.options.path} has no column '{column}' (it has: "
                               f"{', '.join(ds.features)})")
            feature = ds.features[column]
            if isinstance(feature, datasets.Image):
                kinds[column] = "image"
            elif isinstance(feature, datasets.Audio):
                kinds[column] = "audio"
            elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
                kinds[column] = "text"
            else:
                raise MotError(f"dataset '{self.name}': column '{column}' is {feature}; a column must be an Image, an "
                               "Audio or a string Value")
        return kinds

    def _encoded(self, ds):
        """The columns asked for, with Image and Audio cells as {bytes, path} (decoded here)."""
        import datasets

        ds = ds.select_columns(list(self.options.columns))
        for column, kind in self._kinds.items():
            if kind == "image":
                ds = ds.cast_column(column, datasets.Image(decode=False))
            elif kind == "audio":
                ds = ds.cast_column(column, datasets.Audio(decode=False))
        return ds

    # -- parts -----------------------------------------------------------------------------

    def _split_set(self, split: Split):
        sets = self._open()
        return sets["train"] if split == "train" or sets["val"] is None else sets["val"]

    def num_parts(self, split: Split) -> int:
        return max(1, -(-self._split_set(split).num_rows // self.options.rows_per_part))

    def read_part(self, split: Split, part: int) -> Iterator[RawDocument | BadRecord]:
        parts = self.num_parts(split)
        if not 0 <= part < parts:
            raise MotError(f"dataset '{self.name}' has {parts} parts, asked for part {part}")
        return self._rows(split, part * self.options.rows_per_part)

    def documents(self, split: Split) -> Iterator[RawDocument | BadRecord]:
        for part in range(self.num_parts(split)):
            yield from self._rows(split, part * self.options.rows_per_part)

    def fingerprint(self) -> str:
        """The set's own fingerprints (``datasets`` derives them from its files), and the options."""
        import hashlib
        import json

        try:
            sets = self._open()
            prints = [getattr(s, "_fingerprint", "") for s in sets.values() if s is not None]
        except MotError:  # documents() says what is wrong
            prints = []
        return hashlib.sha256(json.dumps([prints, self.options.model_dump(mode="json")], sort_keys=True).encode()).hexdigest()

    def _rows(self, split: Split, first: int) -> Iterator[RawDocument | BadRecord]:
        opts: HuggingFaceDatasetOptions = self.options
        ds = self._split_set(split)
        hashed = self._open()["val"] is None
        stop = min(first + opts.rows_per_part, ds.num_rows)
        for start in range(first, stop, 256):
            batch = ds[start:min(start + 256, stop)]
            for offset in range(min(256, stop - start)):
                row = start + offset
                if hashed and in_val_split(f"row {row}", opts.val_fraction) != (split == "val"):
                    continue
                yield self._document({c: batch[c][offset] for c in opts.columns},
                                     f"{opts.path} [{self._names[split]}] row {row}")

    def _document(self, cells: dict[str, Any], where: str) -> RawDocument | BadRecord:
        segments = []
        for column, modality in self.options.columns.items():
            kind, cell = self._kinds[column], cells[column]
            if cell is None or (kind == "text" and not str(cell).strip()):
                return BadRecord(where, f"missing {'text' if kind == 'text' else kind}", f"'{column}' is empty")
            if kind == "text":
                segments.append(RawSegment(modality, cell))
                continue
            data = cell.get("bytes") if isinstance(cell, dict) else None
            if data is None and isinstance(cell, dict) and cell.get("path"):
                try:
                    data = Path(cell["path"]).read_bytes()
                except OSError as exc:
                    return BadRecord(where, f"missing {kind}", f"{cell['path']}: {one_line(exc)}")
            if data is None:
                return BadRecord(where, f"missing {kind}", f"'{column}' holds no bytes and no path")
            if kind == "image":
                try:
                    pixels = decode_image_bytes(data, self.options.image_size)
                except ValueError as exc:
                    return BadRecord(where, "undecodable image", str(exc))
                import torch

                segments.append(RawSegment(modality, to_signed_float(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())))
            else:
                try:
                    segments.append(RawSegment(modality, decode_audio_bytes(data, where)))
                except ValueError as exc:
                    return BadRecord(where, "unreadable audio", str(exc))
        return RawDocument(tuple(segments))
