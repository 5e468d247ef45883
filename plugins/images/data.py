"""Captioned images as documents: caption then image (to generate images) and image then caption
(to describe them), from the built-in sources written by ``plugins.images.prepare`` or from
folders of one's own captioned images.

Built-in sources (``sources``): each folder under ``root`` holds ``captions.jsonl`` (one
``{"file", "caption", "split"}`` object a line, ``file`` relative to the folder) and the square
RGB PNGs it names; ``meta.json`` is optional and, when present, its ``size`` is checked against
``image_size``. The train/val split is the one recorded at prepare time (a stable hash of each
image's id).

Folders of one's own (``folders``): used as they are, nothing to prepare. A captions file,
``captions.jsonl`` (``{"file": ..., "caption": ...[, "split": "train"|"val"]}`` a line) or
``captions.csv`` (header ``file,caption[,split]``), names images of any size and any format
Pillow reads; each is turned upright (EXIF), flattened on white if transparent, converted to
RGB, its shorter side resized to ``image_size`` and centre-cropped to a square. A line without
a split goes to "val" for a stable hash of its file name (``val_fraction``).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from pydantic import Field, field_validator, model_validator

from mot_core.errors import MotError
from mot_core.plugin_api import DataSource, PluginOptions, RawDocument, RawSegment, Split, fingerprint_files
from plugins.common.images import read_any_image, read_prepared_image, to_signed_float
from plugins.common.messages import one_line

Direction = Literal["caption_to_image", "image_to_caption"]
PREPARE_HINT = "run `mot data prepare` first"
BUILT_IN_SOURCES = ("emoji", "mnist")  # rendered by plugins.images.prepare
CAPTIONS_NAMES = ("captions.jsonl", "captions.csv")  # looked for in this order in a folder of one's own
CAPTIONS_FORMAT = (
    'captions.jsonl with one {"file": "cat.jpg", "caption": "a cat on a sofa"} a line '
    '("split": "train" or "val" optional), or captions.csv with a header line file,caption[,split]'
)
IMAGES_PER_PART = 4096  # a split is read in parts of at most this many images of one source or folder


class CaptionedImagesOptions(PluginOptions):
    root: str = Field("data/captioned_images", description="folder where `mot data prepare` writes the built-in sources")
    sources: list[str] | None = Field(
        None,
        description="built-in sources (emoji, mnist) rendered under root by `mot data prepare`; "
        "default: both, or none when folders are given",
    )
    folders: list[str] = Field(
        default_factory=list,
        description="folders of your own captioned images, used as they are: a captions file "
        "(captions.jsonl or captions.csv) and images of any size and format",
    )
    captions_file: str | None = Field(
        None,
        description="name of the captions file in each of folders (.csv: CSV, else JSON lines); "
        "default: captions.jsonl, else captions.csv",
    )
    val_fraction: float = Field(
        0.05, gt=0, lt=1,
        description="in folders, the share of images whose captions line names no split held out for validation "
        "(by a stable hash of the file name)",
    )
    image_size: int = Field(
        32, ge=1,
        description="side of the square images, in pixels; built-in sources must match it, images in folders are "
        "resized (shorter side) and centre-cropped to it",
    )
    directions: list[Direction] = Field(
        default_factory=lambda: ["caption_to_image", "image_to_caption"],
        min_length=1,
        description="caption_to_image: caption then image; image_to_caption: image then caption",
    )
    caption_dropout: float = Field(
        0.1, ge=0, lt=1,
        description="fraction of training caption_to_image documents without their caption (classifier-free guidance)",
    )
    text_modality: str = Field("text", description="modality that receives the captions")
    image_modality: str = Field("image", description="modality that receives the (3, H, W) image tensors")
    max_images_per_source: int | None = Field(
        None, ge=1, description="use only the first N images of each source and folder (before the train/val split)"
    )

    @field_validator("sources", "directions")
    @classmethod
    def _no_repeats(cls, values: list[str] | None) -> list[str] | None:
        repeated = sorted({v for v in values if values.count(v) > 1}) if values else []
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return values

    @field_validator("folders")
    @classmethod
    def _no_repeated_folders(cls, values: list[str]) -> list[str]:
        """One folder under two spellings (``data/x`` and ``data/x/``, a relative and an
        absolute path, a symlink) would be read twice: folders are compared resolved."""
        seen: dict[str, str] = {}
        for value in values:
            resolved = os.path.realpath(value)
            if resolved in seen:
                raise ValueError(f"'{seen[resolved]}' and '{value}' are the same folder ({resolved}); list it once")
            seen[resolved] = value
        return values

    @field_validator("sources")
    @classmethod
    def _names_not_paths(cls, values: list[str] | None) -> list[str] | None:
        for value in values or []:
            if value not in BUILT_IN_SOURCES and ("/" in value or "\\" in value):
                raise ValueError(
                    f"'{value}' is a path: sources names built-in sources ({', '.join(BUILT_IN_SOURCES)}) rendered under "
                    f"root; for a folder of your own images write folders: [{value}]"
                )
        return values

    @model_validator(mode="after")
    def _distinct_modalities(self) -> "CaptionedImagesOptions":
        if self.text_modality == self.image_modality:
            raise ValueError(f"text_modality and image_modality must differ (both are '{self.text_modality}')")
        if self.sources is None:  # resolved here, so the saved run config names what was read
            self.sources = [] if self.folders else list(BUILT_IN_SOURCES)
        if not self.sources and not self.folders:
            raise ValueError(
                "no images: list built-in sources (sources: [emoji, mnist]) or folders of your own (folders: [path/to/folder])"
            )
        return self


class CaptionedImages(DataSource):
    """Real captioned images (emoji named by Unicode, handwritten MNIST digits, or folders of
    one's own), one document per image and direction.

    Payloads: captions are ``str``; images are float32 tensors (3, H, W) in [-1, 1].
    """

    name = "captioned_images"
    Options = CaptionedImagesOptions

    def __init__(self, options: CaptionedImagesOptions):
        super().__init__(options)
        # Per instance: the modality names come from the options.
        self.modalities = (options.text_modality, options.image_modality)

    def prepare(self, progress: bool = True) -> dict:
        """Render the built-in sources into ``root`` (``mot data prepare``); idempotent. Folders
        of one's own are used as they are: their captions file is only checked."""
        from plugins.images.prepare import prepare_captioned_images

        opts: CaptionedImagesOptions = self.options
        report: dict = {}
        built_in = [s for s in opts.sources if s in BUILT_IN_SOURCES]
        for source in opts.sources:
            if source not in BUILT_IN_SOURCES:  # a folder already in the prepared layout under root
                captions = Path(opts.root) / source / "captions.jsonl"
                if not captions.is_file():
                    raise MotError(_unknown_source_message(source, captions))
                report[source] = f"used as it is (nothing to prepare): {captions}"
        if built_in:
            report.update(prepare_captioned_images(Path(opts.root), size=opts.image_size, sources=built_in, progress=progress))
        for folder in opts.folders:
            captions = _find_captions(Path(folder), opts.captions_file)
            count = len(_read_folder_captions(captions, opts.val_fraction))
            report[folder] = f"used as it is (nothing to prepare): {count} images listed in {captions}"
        return report

    def documents(self, split: Split) -> Iterator[RawDocument]:
        """All documents of ``split``, in a fixed order: sources as listed, then folders as
        listed, images in captions-file order, and for each image its directions as listed.

        The captions files are read (and checked) when called; each image is decoded when its
        documents are taken, so memory does not grow with the number of images."""
        plans = self._plans(split)
        return (doc for plan in plans for doc in self._plan_documents(plan, plan.chosen, split))

    def num_parts(self, split: Split) -> int:
        """Each source and folder in parts of at most ``IMAGES_PER_PART`` images of the split."""
        return len(self._parts(self._plans(split)))

    def read_part(self, split: Split, part: int) -> Iterator[RawDocument]:
        parts = self._parts(self._plans(split))
        if not 0 <= part < len(parts):
            raise MotError(f"dataset '{self.name}' has {len(parts)} parts in its '{split}' split, asked for part {part}")
        plan, start, stop = parts[part]
        return self._plan_documents(plan, plan.chosen[start:stop], split)

    def fingerprint(self) -> str:
        """Names, sizes and modification times of each captions file, meta.json and the images
        they name (no image is read), and the options."""
        opts: CaptionedImagesOptions = self.options
        paths: list[Path] = []
        for source in opts.sources:
            folder = Path(opts.root) / source
            paths += [folder / "captions.jsonl", folder / "meta.json"]
            try:
                listing = _load_source(Path(opts.root), source, opts.image_size)
            except MotError:  # documents() will say what is wrong
                continue
            paths += [folder / file for file in listing.files[: opts.max_images_per_source]]
        for folder in map(Path, opts.folders):
            try:
                captions = _find_captions(folder, opts.captions_file)
                listing = _load_folder(folder, opts.captions_file, opts.image_size, opts.val_fraction)
            except MotError:
                paths += [folder / name for name in ((opts.captions_file,) if opts.captions_file else CAPTIONS_NAMES)]
                continue
            paths += [captions, *(folder / file for file in listing.files[: opts.max_images_per_source])]
        return fingerprint_files(paths, extra=super().fingerprint(), contents=False)

    def _plans(self, split: Split) -> list["_Plan"]:
        """Each source and folder, in order, with the images of ``split`` (captions files read
        and checked; no image decoded)."""
        opts: CaptionedImagesOptions = self.options
        root = Path(opts.root)
        if opts.sources and not root.is_dir():
            raise MotError(f"dataset '{self.name}': no captioned images at {root}; {PREPARE_HINT}")
        plans: list[_Plan] = []
        for source in opts.sources:
            loaded = _load_source(root, source, opts.image_size)
            usable = len(loaded.files) if opts.max_images_per_source is None else opts.max_images_per_source
            chosen = tuple(i for i, s in enumerate(loaded.splits[:usable]) if s == split)
            if not chosen:
                limited = f" among its first {usable} images (max_images_per_source)" if opts.max_images_per_source else ""
                raise MotError(
                    f"dataset '{self.name}': source '{source}' has no images in its '{split}' split{limited} ({root / source})"
                )
            plans.append(_Plan(loaded, chosen, source))
        for folder in opts.folders:
            loaded = _load_folder(Path(folder), opts.captions_file, opts.image_size, opts.val_fraction)
            usable = len(loaded.files) if opts.max_images_per_source is None else opts.max_images_per_source
            chosen = tuple(i for i, s in enumerate(loaded.splits[:usable]) if s == split)
            if not chosen:
                count = min(usable, len(loaded.files))
                limited = " (max_images_per_source)" if opts.max_images_per_source else ""
                raise MotError(
                    f"dataset '{self.name}': folder {folder} has no images in its '{split}' split "
                    f"({count} images{limited}, val_fraction {opts.val_fraction}); "
                    f"{'raise val_fraction, ' if split == 'val' else 'lower val_fraction, '}"
                    f"add more images, or give some captions lines \"split\": \"{split}\""
                )
            plans.append(_Plan(loaded, chosen, Path(folder).resolve().name))
        return plans

    @staticmethod
    def _parts(plans: list["_Plan"]) -> list[tuple["_Plan", int, int]]:
        """(plan, start, stop) of each part: consecutive runs of a plan's chosen images."""
        return [(plan, start, min(start + IMAGES_PER_PART, len(plan.chosen)))
                for plan in plans for start in range(0, len(plan.chosen), IMAGES_PER_PART)]

    def _plan_documents(self, plan: "_Plan", chosen: tuple[int, ...], split: Split) -> Iterator[RawDocument]:
        opts: CaptionedImagesOptions = self.options
        loaded = plan.loaded
        for index in chosen:
            # One independent tensor per image, decoded now: a payload carries only its own
            # pixels when pickled, and nothing holds the images already taken.
            caption = RawSegment(opts.text_modality, loaded.captions[index])
            image = RawSegment(opts.image_modality, to_signed_float(loaded.pixels(index)))
            for direction in opts.directions:
                if direction == "image_to_caption":
                    yield RawDocument((image, caption))
                elif split == "train" and _drops_caption(f"{plan.label}/{loaded.files[index]}", opts.caption_dropout):
                    # Validation keeps every caption: it measures conditional generation.
                    yield RawDocument((image,))
                else:
                    yield RawDocument((caption, image))


def _unknown_source_message(source: str, captions: Path) -> str:
    if source in BUILT_IN_SOURCES:
        return f"dataset 'captioned_images': source '{source}' is not prepared ({captions} missing); {PREPARE_HINT}"
    return (
        f"dataset 'captioned_images': source '{source}' is not prepared ({captions} missing) and `mot data prepare` "
        f"renders only {', '.join(BUILT_IN_SOURCES)}; for a folder of your own images write folders: [{source}]"
    )


def _drops_caption(name: str, caption_dropout: float) -> bool:
    # Salted so that the dropped documents are independent of the val split's hash.
    return zlib.crc32(f"caption-dropout/{name}".encode("utf-8")) % 10_000 < caption_dropout * 10_000


@dataclass(frozen=True)
class _LoadedSource:
    """One source folder's captions file read: parallel tuples, and where to find each image.
    ``pixels(i)`` decodes image ``i`` -> (3, S, S) uint8, contiguous."""

    folder: Path
    files: tuple[str, ...]
    captions: tuple[str, ...]
    splits: tuple[str, ...]
    image_size: int
    lines: tuple[int, ...] | None = None  # folders of one's own: captions-file line of each image, for errors
    captions_name: str = ""

    def pixels(self, index: int) -> torch.Tensor:
        path = self.folder / self.files[index]
        if self.lines is None:
            array = read_prepared_image(path, self.image_size)
        else:
            array = read_any_image(path, self.image_size, f"{self.captions_name} line {self.lines[index]}")
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class _Plan:
    """A source or folder and the indices of its images in one split."""

    loaded: _LoadedSource
    chosen: tuple[int, ...]
    label: str  # names the image in the caption-dropout hash


def _load_source(root: Path, source: str, image_size: int) -> _LoadedSource:
    folder = root / source
    captions_file = folder / "captions.jsonl"
    if not folder.is_dir() or not captions_file.is_file():
        raise MotError(_unknown_source_message(source, captions_file))
    stat = captions_file.stat()
    # The file's identity is part of the key, so a source prepared again is read again.
    return _load_source_cached(str(folder.resolve()), image_size, (stat.st_mtime_ns, stat.st_size, stat.st_ino))


@functools.lru_cache(maxsize=64)
def _load_source_cached(folder: str, image_size: int, captions_identity: tuple[int, int, int]) -> _LoadedSource:
    """The captions file, read once per process (its images are decoded as they are used)."""
    source_dir = Path(folder)
    meta_size = _prepared_size(source_dir / "meta.json")
    if meta_size is not None and meta_size != image_size:
        raise MotError(
            f"{source_dir} holds {meta_size}x{meta_size} images but image_size is {image_size}; "
            f"set image_size: {meta_size} or run `mot data prepare` at size {image_size}"
        )
    files, captions, splits = _read_captions(source_dir / "captions.jsonl")
    return _LoadedSource(source_dir, tuple(files), tuple(captions), tuple(splits), image_size)


def _prepared_size(meta_path: Path) -> int | None:
    if not meta_path.is_file():
        return None
    try:
        size = json.loads(meta_path.read_text(encoding="utf-8")).get("size")
    except (OSError, ValueError, AttributeError) as exc:
        raise MotError(f"cannot read {meta_path} ({exc}); {PREPARE_HINT} again") from None
    return size if isinstance(size, int) else None


def _read_captions(path: Path) -> tuple[list[str], list[str], list[str]]:
    files: list[str] = []
    captions: list[str] = []
    splits: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MotError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise MotError(f"{path} line {number}: not valid JSON ({exc})") from None
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str) and entry["file"]
            and isinstance(entry.get("caption"), str) and entry["caption"].strip()
            and entry.get("split") in ("train", "val")
        ):
            raise MotError(
                f"{path} line {number}: expected {{\"file\": non-empty string, \"caption\": non-empty string, "
                f"\"split\": \"train\" or \"val\"}}, got {line.strip()[:120]}"
            )
        files.append(entry["file"])
        captions.append(entry["caption"])
        splits.append(entry["split"])
    return files, captions, splits


# --- folders of one's own ----------------------------------------------------------------------


def _find_captions(folder: Path, captions_file: str | None) -> Path:
    """The captions file of a folder of one's own: ``captions_file`` if set, else the first of
    ``CAPTIONS_NAMES`` present."""
    if not folder.is_dir():
        raise MotError(f"dataset 'captioned_images': folder {folder} not found (folders: paths to folders of captioned images)")
    names = (captions_file,) if captions_file else CAPTIONS_NAMES
    for name in names:
        if (folder / name).is_file():
            return folder / name
    looked = f"{folder / captions_file} not found" if captions_file else f"no {' or '.join(CAPTIONS_NAMES)} in {folder}"
    raise MotError(f"dataset 'captioned_images': {looked}; write {CAPTIONS_FORMAT}")


@dataclass(frozen=True)
class _CaptionLine:
    number: int  # line in the captions file, for errors
    file: str
    caption: str
    split: str


def _read_folder_captions(path: Path, val_fraction: float) -> list[_CaptionLine]:
    """Every line of a captions file (JSON lines, or CSV for a ``.csv`` name), each with its
    split: the one written, else "val" for a stable hash of the file name."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often start a CSV with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise MotError(f"dataset 'captioned_images': cannot read {path}: {one_line(exc)}") from None
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)
    lines = []
    for number, file, caption, split in rows:
        where = f"{path} line {number}"
        if not file:
            raise MotError(f"dataset 'captioned_images': {where} names no image file; give its file or remove the line")
        if not caption.strip():
            raise MotError(f"dataset 'captioned_images': {where} has an empty caption for '{file}'; write one or remove the line")
        if split is None or split == "":
            split = "val" if _in_val_split(file, val_fraction) else "train"
        elif split not in ("train", "val"):
            raise MotError(f"dataset 'captioned_images': {where}: split must be \"train\" or \"val\" (or left out), got {split!r}")
        lines.append(_CaptionLine(number, file, caption.strip(), split))
    if not lines:
        raise MotError(f"dataset 'captioned_images': {path} lists no images; write {CAPTIONS_FORMAT}")
    return lines


def _jsonl_rows(path: Path, text: str):
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise MotError(f"dataset 'captioned_images': {path} line {number}: not valid JSON ({exc}); "
                           f"expected {{\"file\": \"cat.jpg\", \"caption\": \"a cat\"}}") from None
        if not (isinstance(entry, dict) and isinstance(entry.get("file", ""), str)
                and isinstance(entry.get("caption", ""), str) and isinstance(entry.get("split"), (str, type(None)))):
            raise MotError(f"dataset 'captioned_images': {path} line {number}: expected {{\"file\": \"cat.jpg\", "
                           f"\"caption\": \"a cat\"[, \"split\": \"train\" or \"val\"]}}, got {line.strip()[:120]}")
        yield number, entry.get("file", "").strip(), entry.get("caption", ""), entry.get("split")


def _csv_rows(path: Path, text: str):
    reader = csv.reader(text.splitlines())
    try:
        header = [name.strip().lower() for name in next(reader)]
    except StopIteration:
        header = []
    if "file" not in header or "caption" not in header:
        raise MotError(f"dataset 'captioned_images': {path}: the first line must be a header naming the columns "
                       f"file,caption[,split], got {','.join(header)[:120]!r}")
    file_at, caption_at = header.index("file"), header.index("caption")
    split_at = header.index("split") if "split" in header else None
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            number = reader.line_num
            if len(row) != len(header):
                raise MotError(f"dataset 'captioned_images': {path} line {number}: {len(row)} columns, the header "
                               f"has {len(header)} (quote a caption holding a comma: \"a cat, asleep\")")
            split = row[split_at].strip() if split_at is not None else None
            yield number, row[file_at].strip(), row[caption_at], split
    except csv.Error as exc:
        raise MotError(f"dataset 'captioned_images': {path} line {reader.line_num}: {exc}") from None


def _in_val_split(name: str, val_fraction: float) -> bool:
    """Stable across runs and machines; the same rule as the built-in sources' split."""
    return zlib.crc32(name.encode("utf-8")) % 10_000 < val_fraction * 10_000


def _load_folder(folder: Path, captions_file: str | None, image_size: int, val_fraction: float) -> _LoadedSource:
    captions = _find_captions(folder, captions_file)
    stat = captions.stat()
    return _load_folder_cached(str(captions.resolve()), image_size, val_fraction, (stat.st_mtime_ns, stat.st_size, stat.st_ino))


@functools.lru_cache(maxsize=64)
def _load_folder_cached(captions: str, image_size: int, val_fraction: float,
                        captions_identity: tuple[int, int, int]) -> _LoadedSource:
    """The captions file, read once per process and file (the train and val splits,
    evaluators and tokenizer fitting all read the same list); images are decoded as used."""
    path = Path(captions)
    lines = _read_folder_captions(path, val_fraction)
    return _LoadedSource(
        path.parent, tuple(line.file for line in lines), tuple(line.caption for line in lines),
        tuple(line.split for line in lines), image_size, tuple(line.number for line in lines), path.name,
    )
