"""Images shared by the built-in image plugins (``images``, ``image_vq``, ``image_diffusion``):
reading image files, the captioned images of documents, PNG grids of images, and PSNR.

Payload convention: an image is a float32 tensor (3, H, W) in [-1, 1]; files are read as
(H, W, 3) uint8 RGB first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from mot_core.errors import MotError
from mot_core.plugin_api import RawDocument
from plugins.common.messages import one_line

CAPTION_FONT_PX = 10
CAPTION_LINES = 2
MIN_CAPTIONED_TILE_PX = 96  # captions need about this much width to be legible


# --- reading image files ----------------------------------------------------------------------


def read_prepared_image(path: Path, expected_size: int) -> np.ndarray:
    """One image file of ``expected_size`` (S) pixels a side, as ``mot data prepare`` writes them
    -> (S, S, 3) uint8 RGB; transparent pixels become white. Any other size is a ``MotError``."""
    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
            rgb = on_white(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MotError(f"cannot read image {path} ({exc}); run `mot data prepare` again, forcing a rebuild") from None
    if size != (expected_size, expected_size):
        raise MotError(
            f"image {path} is {size[0]}x{size[1]} pixels but image_size is {expected_size}; "
            f"prepare the data at that size (`mot data prepare`) or change image_size"
        )
    return np.array(rgb, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def read_any_image(path: Path, size: int, named_in: str) -> np.ndarray:
    """Any image Pillow reads -> (size, size, 3) uint8 RGB: upright (EXIF orientation), flattened
    on white if transparent, shorter side resized to ``size`` and centre-cropped."""
    if not path.is_file():
        raise MotError(f"dataset 'captioned_images': image {path} (named in {named_in}) is missing; "
                       "add the file or remove its line")
    try:
        with Image.open(path) as image:
            image.draft(None, (2 * size, 2 * size))  # JPEG: decode at a reduced scale, still >= 2x the target
            image.load()
            return square_rgb(image, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MotError(f"dataset 'captioned_images': cannot read image {path} (named in {named_in}): {one_line(exc)}; "
                       "replace the file or remove its line") from None


def square_rgb(image: Image.Image, size: int) -> np.ndarray:
    """A decoded Pillow image -> (size, size, 3) uint8 RGB: upright (EXIF orientation),
    flattened on white if transparent, shorter side resized to ``size`` and centre-cropped."""
    square = ImageOps.fit(on_white(ImageOps.exif_transpose(image)), (size, size), method=Image.Resampling.LANCZOS,
                          centering=(0.5, 0.5))
    return np.array(square, dtype=np.uint8)


def on_white(image: Image.Image) -> Image.Image:
    """RGB, transparent pixels flattened on white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def decode_image_bytes(data: bytes, size: int) -> np.ndarray:
    """An encoded image (JPEG, PNG, WebP, ... as a WebDataset member or a Parquet cell holds it)
    -> (size, size, 3) uint8 RGB, as ``square_rgb``. Raises ``ValueError`` saying why it cannot
    be decoded (the caller names the record)."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft(None, (2 * size, 2 * size))  # JPEG: decode at a reduced scale, still >= 2x the target
            image.load()
            return square_rgb(image, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(one_line(exc) or type(exc).__name__) from None


def to_signed_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) in [0, 255] -> float32 in [-1, 1]."""
    return pixels.to(torch.float32).div_(127.5).sub_(1.0)


def load_image_file(path: str | Path, expected_size: int) -> torch.Tensor:
    """Any image file Pillow reads -> float32 (3, expected_size, expected_size) in [-1, 1]: an
    image of that size as the dataset reads its prepared files, any other (a photo) as the
    dataset reads a user folder (upright, shorter side resized, centre-cropped).

    Raises ``MotError`` naming the file if it is missing or cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise MotError(f"image {path} not found")
    try:
        with Image.open(path) as probe:
            size = probe.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MotError(f"cannot read image {path}: {one_line(exc)}") from None
    if size == (expected_size, expected_size):
        array = read_prepared_image(path, expected_size)
    else:
        array = read_any_image(path, expected_size, "the command line")
    return to_signed_float(torch.from_numpy(array).permute(2, 0, 1))


# --- the captioned images of documents --------------------------------------------------------


def images_with_captions(docs: list[RawDocument], image_modality: str) -> tuple[torch.Tensor, list[str]]:
    """All images of ``image_modality`` in the documents, (N, 3, H, W), with the text of the
    document's other segments as each image's caption ("" when it has none)."""
    images, captions = [], []
    for doc in docs:
        text = " ".join(s.payload for s in doc.segments if s.modality != image_modality and isinstance(s.payload, str))
        for segment in doc.segments:
            if segment.modality == image_modality:
                images.append(segment.payload)
                captions.append(text)
    if not images:
        raise MotError(f"no '{image_modality}' images in the data to fit the tokenizer on")
    # Each image appears once per direction (caption->image, image->caption): keep one copy.
    unique: dict[int, int] = {}
    for index, image in enumerate(images):
        key = hash(image.numpy().tobytes())
        if key not in unique or (not captions[unique[key]] and captions[index]):
            unique[key] = index
    keep = sorted(unique.values())
    return torch.stack([images[i] for i in keep]).float(), [captions[i] for i in keep]


# --- image grids ------------------------------------------------------------------------------


def save_image_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int = 8,
    captions: list[str] | None = None,
    *,
    tile_scale: int | None = None,
    padding: int = 2,
) -> Path:
    """Write images as one PNG grid, optionally with each caption under its tile.

    Args:
        images: (N, 3, H, W) in [-1, 1] (values outside are clipped).
        path: output PNG; parent folders are created.
        nrow: tiles per row.
        captions: N strings, wrapped to two lines under each tile (cut with "…" if longer).
        tile_scale: integer nearest-neighbour upscaling of every tile. Default: 1 without
            captions; with captions, the smallest factor making tiles >= 96 px wide.
        padding: grey pixels between and around tiles.

    Output size, with s = tile_scale, c = caption strip height (0 without captions),
    cols = min(nrow, N), rows = ceil(N / cols):
        width  = cols * (W * s + padding) + padding
        height = rows * (H * s + c + padding) + padding
    """
    if images.dim() != 4 or images.size(1) != 3 or images.size(0) == 0:
        raise ValueError(f"images must be (N, 3, H, W) with N >= 1, got {tuple(images.shape)}")
    if captions is not None and len(captions) != images.size(0):
        raise ValueError(f"{len(captions)} captions for {images.size(0)} images")
    from torchvision.utils import make_grid

    count, _, height, width = images.shape
    if tile_scale is None:
        tile_scale = 1 if captions is None else max(1, math.ceil(MIN_CAPTIONED_TILE_PX / width))
    tiles = (images.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) / 2  # (N, 3, H, W) in [0, 1]
    if tile_scale > 1:
        tiles = tiles.repeat_interleave(tile_scale, dim=2).repeat_interleave(tile_scale, dim=3)
    font = ImageFont.load_default(size=CAPTION_FONT_PX)
    line_height = CAPTION_FONT_PX + 3
    strip = CAPTION_LINES * line_height + 2 if captions is not None else 0
    if strip:
        tiles = torch.cat([tiles, tiles.new_ones(count, 3, strip, tiles.size(3))], dim=2)
    columns = min(nrow, count)
    grid = make_grid(tiles, nrow=columns, padding=padding, pad_value=0.5)
    if count == 1:  # make_grid returns a lone image without its padding
        grid = torch.nn.functional.pad(grid, (padding,) * 4, value=0.5)
    picture = Image.fromarray(grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    if captions is not None:
        draw = ImageDraw.Draw(picture)
        tile_width, tile_height = tiles.size(3), tiles.size(2)
        for k, caption in enumerate(captions):
            left = (k % columns) * (tile_width + padding) + padding
            top = (k // columns) * (tile_height + padding) + padding + height * tile_scale + 1
            for n, line in enumerate(_wrap(caption, font, tile_width - 2, CAPTION_LINES)):
                draw.text((left + 1, top + n * line_height), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, max_width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to at most ``max_lines`` lines of ``max_width`` pixels; the last line
    ends with "…" when text was left out."""
    def fits(candidate: str) -> bool:
        return font.getlength(candidate) <= max_width

    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and fits(f"{line} {words[0]}"):
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    truncated = bool(words)
    last = lines[-1] if lines else ""
    if truncated or not fits(last):
        while last and not fits(last + "…"):
            last = last[:-1].rstrip()
        lines[-1] = last + "…"
    # A single over-long word on an earlier line is cut without a mark: rare, and still readable.
    return [line if fits(line) else _cut(line, fits) for line in lines]


def _cut(line: str, fits: Callable[[str], bool]) -> str:
    while line and not fits(line):
        line = line[:-1]
    return line


# --- scores -----------------------------------------------------------------------------------


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for a mean squared error on a [0, peak] scale."""
    return float("inf") if mse <= 0 else 10.0 * math.log10(peak * peak / mse)
