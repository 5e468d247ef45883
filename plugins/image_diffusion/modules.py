"""The image modality's own modules: input adapters and output heads of latent patches.

A latent (C, h, w) is cut into p x p patches in raster order, one sequence position each,
``input_dim = C * p * p`` (Transfusion: 2x2 patches of a 32x32x8 latent = 256 positions).

- ``LinearPatchAdapter``: a linear map of the noised patch plus an embedding of its timestep
  (Transfusion's "simple linear layer", the default).
- ``UNetPatchAdapter`` / ``UNetPatchHead``: a small U-Net down block (ResNet blocks with the
  timestep embedding, then a stride-p convolution) over each whole latent image, and the
  matching up block after the transformer (Transfusion's U-Net variant). There is no skip
  connection across the transformer: adapter and head are separate modules of the model, and
  the head sees only the transformer's output.
The adapters read ``extras["noised"]`` (x_t, drawn by the loss) and ``extras["t"]``; given no
extras, they read the clean values at t = 0 (a finished image entering the sequence).
"""

from __future__ import annotations

import torch
import torch.nn as nn

# diffusers is imported inside the constructors: it costs ~4 s to import (it pulls in
# torch._dynamo) and every `mot` command loads this plugin; only runs that use it pay.

TIME_FREQUENCIES = 256


def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, (h/p)(w/p), C p p), patches in raster order."""
    n, c, h, w = latents.shape
    x = latents.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(patches: torch.Tensor, channels: int, grid: int, patch: int) -> torch.Tensor:
    """(N, grid*grid, C p p) -> (N, C, grid p, grid p); ``grid`` patches per side."""
    n = patches.shape[0]
    x = patches.reshape(n, grid, grid, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, grid * patch, grid * patch)


class _TimeEmbedding(nn.Module):
    """(V,) timesteps -> (V, dim): sinusoidal frequencies, then an MLP (as DDPM U-Nets and DiT)."""

    def __init__(self, dim: int):
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        super().__init__()
        self.frequencies = Timesteps(TIME_FREQUENCIES, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(TIME_FREQUENCIES, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(self.frequencies(t.float()).to(dtype))


def _inputs(values: torch.Tensor, extras: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x = extras.get("noised", values)
    t = extras.get("t")
    if t is None:
        t = torch.zeros(values.shape[0], device=values.device)
    return x.to(values.dtype), t


class LinearPatchAdapter(nn.Module):
    """(V, input_dim) patches -> (V, dim): W x_t + b + emb(t)."""

    def __init__(self, input_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, dim)
        self.time = _TimeEmbedding(dim)

    def forward(self, values: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        x, t = _inputs(values, extras)
        return self.proj(x) + self.time(t, x.dtype)


class LinearPatchHead(nn.Module):
    """(n, dim) -> (n, input_dim): the prediction (eps, v or flow) of each patch. Zero-initialised
    (as DiT), so training starts from predicting 0, the mean of every target."""

    def __init__(self, dim: int, input_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, input_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class UNetPatchAdapter(nn.Module):
    """(V, C p p) patches of whole images (V = images * grid^2, consecutive) -> (V, dim)."""

    def __init__(self, channels: int, grid: int, patch: int, dim: int, width: int = 64):
        from diffusers.models.resnet import ResnetBlock2D

        super().__init__()
        self.channels, self.grid, self.patch = channels, grid, patch
        self.time = _TimeEmbedding(width)
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(ResnetBlock2D(in_channels=width, out_channels=width, temb_channels=width, groups=8)
                                    for _ in range(2))
        self.down = nn.Conv2d(width, dim, patch, stride=patch)

    def forward(self, values: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        x, t = _inputs(values, extras)
        per_image = self.grid * self.grid
        images = unpatchify(x.reshape(-1, per_image, x.shape[-1]), self.channels, self.grid, self.patch)
        temb = self.time(t.reshape(-1, per_image)[:, 0], x.dtype)  # one timestep per image
        h = self.stem(images)
        for block in self.blocks:
            h = block(h, temb)
        return self.down(h).flatten(2).transpose(1, 2).reshape(-1, self.down.out_channels)


class UNetPatchHead(nn.Module):
    """(n, dim) states of whole images (n = images * grid^2) -> (n, C p p) predictions."""

    def __init__(self, dim: int, channels: int, grid: int, patch: int, width: int = 64):
        from diffusers.models.resnet import ResnetBlock2D

        super().__init__()
        self.channels, self.grid, self.patch = channels, grid, patch
        self.up = nn.ConvTranspose2d(dim, width, patch, stride=patch)
        self.blocks = nn.ModuleList(ResnetBlock2D(in_channels=width, out_channels=width, temb_channels=None, groups=8)
                                    for _ in range(2))
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.reshape(-1, self.grid, self.grid, hidden.shape[-1]).permute(0, 3, 1, 2)
        h = self.up(h)
        for block in self.blocks:
            h = block(h, None)
        return patchify(self.out(h), self.patch).reshape(-1, self.channels * self.patch * self.patch)
