"""A VQGAN image tokenizer in plain torch, state-dict compatible with taming-transformers.

The module tree and parameter names follow taming's ``VQModel`` (``taming/models/vqgan.py`` with
``Encoder``/``Decoder`` from ``taming/modules/diffusionmodules/model.py`` and ``VectorQuantizer2``),
which is also what Chameleon's image tokenizer uses (8192 codes, 512px -> 32x32 tokens). A real
taming/Chameleon checkpoint therefore loads into :class:`VQGAN` key for key; only the
discriminator/perceptual ``loss.*`` weights are not part of this module.

What differs from taming is training-only:

* ``quantizer="ema"`` learns the codebook by exponential moving averages of the encoder outputs
  assigned to each code instead of by gradient (the codebook then gets no gradient at all);
* codes whose moving-average usage falls below ``dead_code_threshold`` are restarted from random
  encoder outputs of the current batch, and a freshly constructed codebook is seeded from the
  first training batch, which is what keeps a small codebook from collapsing;
* the commitment loss puts ``beta`` on ``||z - sg(e)||^2`` as in the VQ-VAE paper (taming's
  default ``legacy=True`` put it on the codebook term by mistake).

Shapes: ``B`` batch, ``C`` image channels, ``H = W = resolution``, ``g = grid_size``,
``Z = z_channels``, ``D = embed_dim``, ``K = n_embed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZERS = ("ema", "straight_through")


@dataclass(frozen=True)
class VQGANConfig:
    """Architecture and quantizer settings of a :class:`VQGAN`.

    The defaults describe our *small local tokenizer*: 32x32 RGB images -> an 8x8 grid of codes
    from a 512-entry codebook, small enough to train on a CPU in a few minutes. They are not
    Chameleon's tokenizer, which is ``resolution=512, ch=128, ch_mult=(1, 1, 2, 2, 4),
    num_res_blocks=2, attn_resolutions=(), z_channels=256, embed_dim=256, n_embed=8192``
    (512px -> 32x32 = 1024 tokens) and is loaded from a published checkpoint instead.

    ``ch_mult`` has one entry per resolution level; every level but the last halves the image, so
    ``grid_size = resolution // 2 ** (len(ch_mult) - 1)``. ``attn_resolutions`` lists the feature
    map sizes (e.g. 8 for 8x8) at which self-attention follows each residual block.
    ``dead_code_threshold`` is in vectors per training step: a code whose moving-average number of
    assigned encoder vectors per step drops below it is restarted (0 disables restarts).
    """

    resolution: int = 32
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 64
    embed_dim: int = 32
    n_embed: int = 512
    dropout: float = 0.0
    quantizer: str = "ema"
    beta: float = 0.25
    ema_decay: float = 0.99
    dead_code_threshold: float = 1.0

    def __post_init__(self) -> None:
        # JSON and YAML give lists; the config is hashable and frozen, so store tuples.
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        problems = []
        if self.quantizer not in QUANTIZERS:
            problems.append(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            problems.append(f"ch_mult must be a non-empty list of positive ints, got {list(self.ch_mult)}")
        for name in ("resolution", "in_channels", "out_ch", "ch", "num_res_blocks", "z_channels",
                     "embed_dim", "n_embed"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ch_mult and self.resolution % 2 ** (len(self.ch_mult) - 1):
            problems.append(
                f"resolution {self.resolution} is not divisible by 2**(len(ch_mult)-1) = "
                f"{2 ** (len(self.ch_mult) - 1)}"
            )
        # GroupNorm(32) runs on every width ch * m of the encoder and decoder.
        for width in {self.ch * m for m in self.ch_mult}:
            if width % GROUPNORM_GROUPS:
                problems.append(f"channel width {width} (ch * ch_mult) is not divisible by {GROUPNORM_GROUPS}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.dead_code_threshold < 0:
            problems.append(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ValueError("invalid VQGANConfig: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        """Side of the code grid: ``resolution // 2 ** (len(ch_mult) - 1)``."""
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size ** 2

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists); inverse of :meth:`from_dict`."""
        data = asdict(self)
        data["ch_mult"] = list(self.ch_mult)
        data["attn_resolutions"] = list(self.attn_resolutions)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "VQGANConfig":
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VQGANConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def taming_ddconfig(self) -> dict:
        """The ``model.params.ddconfig`` block a taming YAML would hold for this architecture."""
        return {
            "double_z": False, "z_channels": self.z_channels, "resolution": self.resolution,
            "in_channels": self.in_channels, "out_ch": self.out_ch, "ch": self.ch,
            "ch_mult": list(self.ch_mult), "num_res_blocks": self.num_res_blocks,
            "attn_resolutions": list(self.attn_resolutions), "dropout": self.dropout,
        }


GROUPNORM_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """taming's ``Normalize``: GroupNorm with 32 groups and eps 1e-6."""
    return nn.GroupNorm(num_groups=GROUPNORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """(B, in, h, w) -> (B, out, h, w): two GroupNorm-swish-conv3x3 layers plus a residual.

    The residual goes through a 1x1 ``nin_shortcut`` when the width changes (taming's default;
    its ``conv_shortcut`` variant is never used by VQGAN configs). No timestep embedding, as in
    taming's encoder and decoder (``temb_channels=0``), hence no ``temb_proj``.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """(B, c, h, w) -> (B, c, h, w): single-head self-attention over the h*w positions, residual.

    Same parameters (1x1 convs ``q``, ``k``, ``v``, ``proj_out``) and the same softmax(q k^T /
    sqrt(c)) v as taming; ``scaled_dot_product_attention`` computes it without materialising the
    (h*w, h*w) weights twice.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        normed = self.norm(x)

        def as_sequence(t: torch.Tensor) -> torch.Tensor:  # (B, c, h, w) -> (B, 1, h*w, c)
            return t.reshape(batch, 1, channels, height * width).transpose(2, 3)

        attended = F.scaled_dot_product_attention(
            as_sequence(self.q(normed)), as_sequence(self.k(normed)), as_sequence(self.v(normed))
        )
        attended = attended.transpose(2, 3).reshape(batch, channels, height, width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """(B, c, h, w) -> (B, c, h/2, w/2): stride-2 3x3 conv after zero-padding only right and
    bottom by one pixel, exactly as taming (torch's conv padding is symmetric, so it is explicit)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """(B, c, h, w) -> (B, c, 2h, 2w): nearest-neighbour upsampling then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """Bottleneck ``block_1 -> attn_1 -> block_2`` at the lowest resolution (keys ``mid.*``)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class ResolutionLevel(nn.Module):
    """One entry of taming's ``down``/``up`` lists: residual ``block``s, each followed by its
    ``attn`` block when the level's resolution is in ``attn_resolutions``, then an optional
    ``downsample`` or ``upsample``."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, with_attention: bool,
                 dropout: float, resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_blocks):
            self.block.append(ResnetBlock(in_channels, out_channels, dropout))
            in_channels = out_channels
            if with_attention:
                self.attn.append(AttnBlock(out_channels))
        # Registered under taming's name ("downsample" / "upsample") and nothing else, so the
        # state-dict key is e.g. ``down.0.downsample.conv.weight``.
        self.resample_name = resample_name if resample is not None else None
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[index](h)
        return h if self.resample_name is None else getattr(self, self.resample_name)(h)


class Encoder(nn.Module):
    """(B, C, H, W) images -> (B, Z, g, g) latents (taming ``Encoder`` with ``double_z=False``)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        resolution = config.resolution
        block_in = ch
        for level in range(len(mult)):
            is_last = level == len(mult) - 1
            block_out = ch * mult[level]
            self.down.append(ResolutionLevel(
                block_in, block_out, config.num_res_blocks, resolution in config.attn_resolutions,
                config.dropout, None if is_last else Downsample(block_out), "downsample",
            ))
            block_in = block_out
            if not is_last:
                resolution //= 2
        self.mid = MidBlock(block_in, config.dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, Z, g, g) latents -> (B, out_ch, H, W) images (taming ``Decoder``).

    ``up[i]`` works at the same resolution as ``down[i]`` (``up[0]`` is the full-resolution
    level), but the levels are *run* from the last index to 0; each has ``num_res_blocks + 1``
    residual blocks and all but ``up[0]`` end with an upsample.
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        block_in = ch * mult[-1]
        resolution = config.grid_size
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(block_in, config.dropout)
        levels_lowest_first = []
        for level in reversed(range(len(mult))):
            block_out = ch * mult[level]
            levels_lowest_first.append(ResolutionLevel(
                block_in, block_out, config.num_res_blocks + 1, resolution in config.attn_resolutions,
                config.dropout, None if level == 0 else Upsample(block_out), "upsample",
            ))
            block_in = block_out
            if level != 0:
                resolution *= 2
        # Index i must hold level i, as taming's ``self.up.insert(0, up)`` does.
        self.up = nn.ModuleList(reversed(levels_lowest_first))
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(latents))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with taming's ``embedding`` parameter (K, D).

    Training-only state lives in non-persistent buffers so that ``state_dict()`` holds exactly
    taming's ``quantize.embedding.weight``:

    * ``code_usage_ema`` (K,): moving average of how many vectors each code receives per step;
    * ``code_sum_ema`` (K, D): moving average of the sum of those vectors (``ema`` mode);
    * ``codebook_seeded``: False only for a freshly constructed codebook, which the first training
      batch then overwrites with random encoder outputs (loading weights sets it True);
    * ``usage_initialised``: the moving averages start from a uniform prior at the first training
      step, so codes are not all "dead" while the averages warm up.
    """

    LAPLACE_EPS = 1e-5

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.n_embed = config.n_embed
        self.embed_dim = config.embed_dim
        self.beta = config.beta
        self.mode = config.quantizer
        self.decay = config.ema_decay
        self.dead_code_threshold = config.dead_code_threshold
        self.embedding = nn.Embedding(config.n_embed, config.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / config.n_embed, 1.0 / config.n_embed)
        if self.mode == "ema":
            # The moving averages own the codebook; a gradient step would fight them.
            self.embedding.weight.requires_grad_(False)
        self.register_buffer("code_usage_ema", torch.zeros(config.n_embed), persistent=False)
        self.register_buffer("code_sum_ema", torch.zeros(config.n_embed, config.embed_dim), persistent=False)
        self.register_buffer("codebook_seeded", torch.tensor(False), persistent=False)
        self.register_buffer("usage_initialised", torch.tensor(False), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "embedding.weight" in state_dict:
            # A trained codebook: keep it, and restart the usage statistics from the prior.
            self.codebook_seeded.fill_(True)
            self.usage_initialised.fill_(False)

    @torch.no_grad()
    def nearest_codes(self, flat_latents: torch.Tensor) -> torch.Tensor:
        """(N, D) vectors -> (N,) long index of the nearest codebook entry (squared L2)."""
        codebook = self.embedding.weight
        # ||z||^2 + ||e||^2 - 2 z.e, the expansion taming uses, so ties resolve the same way.
        distances = torch.addmm(
            flat_latents.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1),
            flat_latents, codebook.t(), beta=1.0, alpha=-2.0,
        )
        return distances.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, g, g) long codes -> (B, D, g, g) codebook vectors."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Quantize (B, D, g, g) latents.

        Returns ``(quantized (B, D, g, g), vq_loss scalar, codes (B, g, g) long, stats)``.
        ``quantized`` is the straight-through estimate ``z + sg(e - z)``: its value is the code
        vector, its gradient flows to ``z`` unchanged. ``vq_loss`` is ``beta * ||z - sg(e)||^2``
        plus, for ``straight_through``, the codebook term ``||sg(z) - e||^2``. In training mode
        the codebook statistics are updated (``ema``) and dead codes restarted.
        """
        batch, dim, height, width = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)
        if self.training and not bool(self.codebook_seeded):
            self._seed_codebook(flat.detach())
        codes = self.nearest_codes(flat.detach())
        code_vectors = self.embedding(codes)
        commitment = F.mse_loss(flat, code_vectors.detach())
        vq_loss = self.beta * commitment
        if self.mode == "straight_through":
            vq_loss = vq_loss + F.mse_loss(code_vectors, flat.detach())
        quantized_flat = flat + (code_vectors - flat).detach()
        quantized = quantized_flat.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
        if self.training:
            self._update_statistics(flat.detach(), codes)
        return quantized, vq_loss, codes.reshape(batch, height, width), code_statistics(codes, self.n_embed)

    @torch.no_grad()
    def _seed_codebook(self, flat_latents: torch.Tensor) -> None:
        """Replace the random initial codebook by K encoder outputs of this batch (N, D)."""
        self.embedding.weight.copy_(_sample_rows(flat_latents, self.n_embed))
        self.codebook_seeded.fill_(True)

    @torch.no_grad()
    def _update_statistics(self, flat_latents: torch.Tensor, codes: torch.Tensor) -> None:
        """Moving averages of usage (and, for ``ema``, of assigned vectors) for (N, D) latents
        with (N,) codes; then the ``ema`` codebook update and dead-code restarts."""
        counts = torch.bincount(codes, minlength=self.n_embed).to(flat_latents.dtype)
        codebook = self.embedding.weight
        if not bool(self.usage_initialised):
            prior_usage = flat_latents.shape[0] / self.n_embed
            self.code_usage_ema.fill_(prior_usage)
            self.code_sum_ema.copy_(codebook * prior_usage)
            self.usage_initialised.fill_(True)
        self.code_usage_ema.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        if self.mode == "ema":
            sums = torch.zeros_like(self.code_sum_ema).index_add_(0, codes, flat_latents)
            self.code_sum_ema.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            total = self.code_usage_ema.sum()
            smoothed = (self.code_usage_ema + self.LAPLACE_EPS) / (total + self.n_embed * self.LAPLACE_EPS) * total
            codebook.copy_(self.code_sum_ema / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            dead = self.code_usage_ema < self.dead_code_threshold
            n_dead = int(dead.sum())
            if n_dead:
                replacements = _sample_rows(flat_latents, n_dead)
                codebook[dead] = replacements
                # A restarted code gets the threshold as usage: a step without assignments
                # restarts it again, a step with some keeps it alive.
                self.code_usage_ema[dead] = self.dead_code_threshold
                self.code_sum_ema[dead] = replacements * self.dead_code_threshold


def _sample_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` random rows of (N, D) ``rows``: distinct rows when N >= count; otherwise drawn
    with replacement plus tiny noise so that no two codes are identical."""
    n_rows = rows.shape[0]
    if n_rows >= count:
        return rows[torch.randperm(n_rows, device=rows.device)[:count]].clone()
    picked = rows[torch.randint(n_rows, (count,), device=rows.device)]
    scale = rows.std().clamp_min(1e-6) * 1e-3
    return picked + torch.randn_like(picked) * scale


def code_statistics(codes: torch.Tensor, n_embed: int) -> dict:
    """Perplexity (exp of the entropy of the code frequencies) and number of distinct codes
    used, for any tensor of long codes."""
    counts = torch.bincount(codes.reshape(-1), minlength=n_embed).double()
    probabilities = counts / counts.sum().clamp_min(1.0)
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-30))).sum()
    return {"perplexity": float(torch.exp(entropy)), "codes_used": int((counts > 0).sum())}


class VQGAN(nn.Module):
    """Encoder -> quant_conv -> vector quantizer -> post_quant_conv -> decoder.

    ``state_dict()`` keys equal taming ``VQModel``'s without its ``loss.*`` entries:
    ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*`` and
    ``quantize.embedding.weight`` (K, D).
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    def _check_images(self, images: torch.Tensor) -> None:
        factor = 2 ** (len(self.config.ch_mult) - 1)
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}"
            )
        if images.shape[2] % factor or images.shape[3] % factor:
            raise ValueError(f"image height and width must be multiples of {factor}, got {tuple(images.shape[2:])}")

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, D, H/f, W/f) pre-quantization vectors, f = 2**(levels-1)."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [-1, 1] -> (B, g, g) long codes in [0, K). No training updates."""
        latents = self.latents(images)
        batch, dim, height, width = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)
        return self.quantize.nearest_codes(flat).reshape(batch, height, width)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, g, g) long codes -> (B, out_ch, g*f, g*f) images clamped to [-1, 1]."""
        if codes.dim() != 3:
            raise ValueError(f"expected codes of shape (B, g, g), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.n_embed):
            raise ValueError(f"codes must lie in [0, {self.config.n_embed}), got [{int(codes.min())}, {int(codes.max())}]")
        return self.decode_latents(self.quantize.lookup(codes.long())).clamp(-1.0, 1.0)

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """(B, D, g, g) code vectors -> (B, out_ch, H, W) unclamped images."""
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(B, C, H, W) in [-1, 1] -> ``(reconstruction (B, out_ch, H, W), vq_loss scalar, stats)``.

        The reconstruction is not clamped so that its gradient stays informative; ``stats`` has
        the batch's code ``perplexity`` and ``codes_used``. The decoder sees straight-through
        code vectors, so the reconstruction loss reaches the encoder.
        """
        quantized, vq_loss, _codes, stats = self.quantize(self.latents(images))
        return self.decode_latents(quantized), vq_loss, stats

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
