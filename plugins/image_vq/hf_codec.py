"""The VQ image codec of an exported model (``mot export RUN --format hf``): copied next to
the model as ``codec_image_vq.py``, with ``vqgan.py`` (the tokenizer's network), and loaded
by its processor. Self-contained: needs ``torch``, ``safetensors``, ``numpy`` and ``Pillow``.
Encodes exactly as the image plugin does in training: an image is ``[begin, codes in raster
order, end]`` in the modality's local ids."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file


def _sibling(name: str):
    """A module copied next to this file, loaded by path (the folder is not a package)."""
    path = Path(__file__).with_name(f"{name}.py")
    key = f"_mot_export_{name}_{abs(hash(str(path)))}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


class VQImageCodec:
    """Images <-> the image modality's local ids: codes 0..n_embed-1, then begin-of-image
    (n_embed) and end-of-image (n_embed + 1).

    ``folder`` holds ``vqgan.json`` (the network's config) and ``vqgan.safetensors``."""

    def __init__(self, folder: str | Path, settings: dict):
        vqgan = _sibling("vqgan")
        folder = Path(folder)
        config = vqgan.VQGANConfig.from_dict(json.loads((folder / "vqgan.json").read_text())["config"])
        self.model = vqgan.VQGAN(config)
        self.model.load_state_dict(load_file(str(folder / "vqgan.safetensors")))
        self.model.eval().requires_grad_(False)
        self.resolution, self.grid = config.resolution, config.grid_size
        self.begin, self.end = config.n_embed, config.n_embed + 1

    def pixels(self, image) -> torch.Tensor:
        """A PIL image, an image file's path, or a (3, H, W) tensor in [-1, 1] -> (3, R, R)
        float32 in [-1, 1], R the tokenizer's resolution: an image already R pixels a side as
        is, any other upright, shorter side resized (Lanczos) and centre-cropped; transparent
        pixels on white."""
        if isinstance(image, torch.Tensor):
            if tuple(image.shape) != (3, self.resolution, self.resolution):
                raise ValueError(f"an image tensor must be (3, {self.resolution}, {self.resolution}) in [-1, 1]")
            return image.float()
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                if opened.size != (self.resolution, self.resolution):  # JPEG: decode at >= 2x the target
                    opened.draft(None, (2 * self.resolution, 2 * self.resolution))
                opened.load()
                image = opened.copy()
        if image.size != (self.resolution, self.resolution):
            image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        else:
            image = image.convert("RGB")
        if image.size != (self.resolution, self.resolution):
            image = ImageOps.fit(image, (self.resolution, self.resolution), method=Image.Resampling.LANCZOS,
                                 centering=(0.5, 0.5))
        array = np.array(image, dtype=np.uint8)
        return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)

    @torch.no_grad()
    def encode(self, image) -> list[int]:
        """An image -> [begin, codes, end]."""
        codes = self.model.encode(self.pixels(image)[None])  # (1, g, g)
        return [self.begin, *codes.flatten().tolist(), self.end]

    def encode_prompt(self, image) -> list[int]:
        return self.encode(image)

    @torch.no_grad()
    def decode(self, ids: list[int]) -> Image.Image:
        """An image span's ids (markers optional) -> a PIL image."""
        ids = [int(i) for i in ids if int(i) not in (self.begin, self.end)]
        if len(ids) != self.grid * self.grid:
            raise ValueError(f"an image span holds {self.grid * self.grid} codes, got {len(ids)}")
        pixels = self.model.decode_codes(torch.tensor(ids).view(1, self.grid, self.grid))[0]
        array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(array)
