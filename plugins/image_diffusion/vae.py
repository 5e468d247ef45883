"""The continuous image tokenizer of the Transfusion setting: a diffusers ``AutoencoderKL``.

Images are float tensors (N, 3, H, W) in [-1, 1]; the VAE maps them to latents (N, C, h, w)
with ``h = H / f``, ``w = W / f`` (``f = 2 ** (len(block_out_channels) - 1)``). Latents handed
to the diffusion side are the posterior *means* times ``config.scaling_factor`` (after
subtracting ``config.shift_factor`` when a VAE has one), so they have about unit std.

Two sources of a VAE, both a diffusers folder (``config.json`` +
``diffusion_pytorch_model.safetensors``) read by :func:`load_vae`:

* our own small one, trained on CPU by :func:`fit_vae`, which also measures its scaling factor
  and writes ``report.json`` next to it;
* a published one the user downloaded (e.g. ``stabilityai/sd-vae-ft-mse``).

:class:`LatentCache` keeps the latents of images already encoded, in the VAE folder.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mot_core.errors import MotError
from mot_core.plugin_api import progress as progress_display
from plugins.common.tokenizer_fitting import warmup_cosine_lr, write_folder_atomically

# AutoencoderKL is imported where it is used: diffusers costs ~4 s to import and every `mot`
# command loads this plugin; only runs that use it pay.
if TYPE_CHECKING:
    from diffusers import AutoencoderKL

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
REPORT_FILE = "report.json"

# Small enough to train in minutes on 2 CPU cores: 32x32 images -> 4 x 8 x 8 latents.
DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (16, 32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": 32,
}
# Training schedule for DEFAULT_ARCHITECTURE on ~6000 32x32 images: about 0.4 s/step at batch
# 32 on 2 CPU cores, so these steps take about 4 minutes (the wider (32, 64, 64) variant
# costs ~1.5 s/step at batch 64).
DEFAULT_FIT_STEPS = 600
DEFAULT_FIT_BATCH_SIZE = 32
DEFAULT_FIT_LR = 1e-3
# The KL term is summed over the latent elements of an image while the MSE is a per-pixel mean:
# a small weight keeps the posterior close to deterministic (like SD's VAE) while still
# stopping the latent scale from drifting.
DEFAULT_KL_WEIGHT = 1e-6

# Fields of the AutoencoderKL config that describe the data, not the architecture: measured by
# fit_vae (scaling_factor) or only set by published VAEs (shift/mean/std). Never configured.
_MEASURED_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
_INT_KEYS = ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups", "sample_size")
_SEQUENCE_KEYS = ("block_out_channels", "down_block_types", "up_block_types")
_PSNR_CAP_DB = 100.0


def _architecture_keys() -> dict[str, Any]:
    """Configurable AutoencoderKL constructor arguments and their diffusers defaults."""
    from diffusers import AutoencoderKL

    parameters = inspect.signature(AutoencoderKL.__init__).parameters
    return {
        name: parameter.default
        for name, parameter in parameters.items()
        if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD and name not in _MEASURED_KEYS
    }


def resolve_architecture(architecture: dict | None) -> dict[str, Any]:
    """``DEFAULT_ARCHITECTURE`` updated with ``architecture``, checked; sequences as lists, as they
    come back from JSON, so the ``architecture`` of a saved ``report.json`` compares equal.

    When ``block_out_channels`` is given without ``down_block_types`` / ``up_block_types``, the
    block types follow its length (plain encoder/decoder blocks), so ``{"block_out_channels":
    [8, 16]}`` alone is a valid two-level VAE. Unknown keys or bad values raise a one-line
    :class:`MotError` naming the key.
    """
    if architecture is None:
        architecture = {}
    if not isinstance(architecture, dict):
        raise MotError(f"the VAE architecture must be a mapping of AutoencoderKL arguments, got {type(architecture).__name__}")
    known = _architecture_keys()
    for key in architecture:
        if key in _MEASURED_KEYS:
            raise MotError(f"VAE architecture key {key!r} is not configurable: fit_vae measures it from the data")
        if key not in known:
            raise MotError(f"unknown VAE architecture key {key!r}; known keys: {', '.join(sorted(known))}")
    resolved = dict(DEFAULT_ARCHITECTURE)
    resolved.update(architecture)
    if "block_out_channels" in architecture:
        levels = len(architecture["block_out_channels"]) if isinstance(architecture["block_out_channels"], (list, tuple)) else 0
        if "down_block_types" not in architecture:
            resolved["down_block_types"] = ["DownEncoderBlock2D"] * levels
        if "up_block_types" not in architecture:
            resolved["up_block_types"] = ["UpDecoderBlock2D"] * levels
    for key in _INT_KEYS:
        value = resolved.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MotError(f"VAE architecture key {key!r} must be a positive integer, got {value!r}")
    for key in _SEQUENCE_KEYS:
        value = resolved[key]
        if not isinstance(value, (list, tuple)) or not value:
            raise MotError(f"VAE architecture key {key!r} must be a non-empty list, got {value!r}")
        resolved[key] = list(value)
    channels = resolved["block_out_channels"]
    groups = resolved["norm_num_groups"]
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 or c % groups for c in channels):
        raise MotError(
            f"VAE architecture key 'block_out_channels' must be positive integers divisible by "
            f"norm_num_groups={groups}, got {list(channels)}"
        )
    for key in ("down_block_types", "up_block_types"):
        if len(resolved[key]) != len(channels) or not all(isinstance(t, str) for t in resolved[key]):
            raise MotError(
                f"VAE architecture key {key!r} must list {len(channels)} block type names "
                f"(one per block_out_channels entry), got {list(resolved[key])}"
            )
    if resolved["out_channels"] != resolved["in_channels"]:
        raise MotError(
            f"VAE architecture key 'out_channels' ({resolved['out_channels']}) must equal in_channels "
            f"({resolved['in_channels']}): the VAE reconstructs its input"
        )
    return resolved


def build_vae(architecture: dict | None) -> AutoencoderKL:
    """A freshly initialised ``AutoencoderKL`` of ``DEFAULT_ARCHITECTURE`` updated with ``architecture``.

    Unknown keys or bad values raise a one-line :class:`MotError` naming the key.
    """
    from diffusers import AutoencoderKL

    resolved = resolve_architecture(architecture)
    try:
        return AutoencoderKL(**resolved)
    except Exception as error:  # diffusers rejects e.g. an unknown block type or activation name
        given = ", ".join(sorted(architecture or {})) or "defaults"
        raise MotError(f"bad VAE architecture ({given}): {_first_line(error)}") from None


def downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent position along each side: each encoder level but the last halves the size."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def architecture_mismatches(saved_config: dict, architecture: dict | None) -> list[str]:
    """``"key: saved X vs configured Y"`` for every configurable key on which a saved VAE config
    differs from ``DEFAULT_ARCHITECTURE | architecture`` (keys set by neither take the diffusers
    default). Empty when they agree."""
    resolved = resolve_architecture(architecture)
    problems = []
    for key, default in _architecture_keys().items():
        wanted = _jsonable(resolved.get(key, default))
        saved = _jsonable(saved_config.get(key, default))
        if saved != wanted:
            problems.append(f"{key}: saved {saved} vs configured {wanted}")
    return problems


# -- training --------------------------------------------------------------------------------
def _learning_rate(step: int, steps: int, peak: float) -> float:
    # Warm-up of at most 50 steps (the GroupNorm statistics of a fresh net are wild for a few steps).
    return warmup_cosine_lr(step, steps, peak, max_warmup=50)


def fit_vae(
    train: torch.Tensor,
    val: torch.Tensor,
    architecture: dict | None,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    seed: int,
    out_dir: Path,
    progress: bool = True,
) -> dict[str, float]:
    """Train a small ``AutoencoderKL`` on (N, 3, H, W) images in [-1, 1] and save it to ``out_dir``.

    AdamW on ``MSE(reconstruction, image) + kl_weight * KL`` (KL of the posterior to N(0, I),
    summed over an image's latent elements, averaged over the batch); the decoder sees a
    posterior sample. Learning rate: short warm-up, cosine decay. The model is initialised under
    ``seed`` and batches (shuffled epochs) and posterior samples are drawn from a generator
    seeded with ``seed``, so on CPU the result is the same for the same inputs; the caller's
    global RNG state is left as it was.

    Afterwards the latent scaling factor is measured as ``1 / std`` of the posterior means of all
    training images (like SD's 0.18215) and stored in the VAE config. ``out_dir`` is written
    atomically (a sibling temporary folder, then renamed into place, replacing an earlier VAE
    there): ``config.json``, ``diffusion_pytorch_model.safetensors`` and ``report.json`` with
    ``{"architecture": resolved kwargs, "report": metrics}``.

    Returns metrics on ``val``: ``recon_mse`` (round trip through the scaled posterior mean,
    images mapped to [0, 1]), ``recon_psnr`` (dB, from that mse), ``latent_std`` (std of the
    unscaled posterior means), ``scaling_factor``, ``steps``, plus ``kl`` (mean per image),
    ``final_train_loss``, ``train_seconds``, ``n_train``, ``n_val``. Costs: see DEFAULT_FIT_STEPS.
    """
    resolved = resolve_architecture(architecture)
    factor = 2 ** (len(resolved["block_out_channels"]) - 1)
    _check_images(train, "train images", resolved["in_channels"], factor)
    _check_images(val, "val images", resolved["in_channels"], factor)
    if steps < 1 or batch_size < 1 or not lr > 0 or not kl_weight >= 0:
        raise MotError(f"steps, batch_size and lr must be positive and kl_weight >= 0, got {steps}, {batch_size}, {lr}, {kl_weight}")
    out_dir = Path(out_dir)
    train = train.float().contiguous()
    device = train.device
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_vae(architecture).to(device)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator)
    cursor = 0
    recent_losses: list[float] = []
    bar = None
    if progress:
        bar = progress_display(total=steps, desc="image vae", unit="step")
    try:
        for step in range(steps):
            if cursor + batch_size > len(order):
                order = torch.randperm(len(train), generator=generator)
                cursor = 0
            batch = train[order[cursor:cursor + batch_size].to(device)]
            cursor += batch_size
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps, lr)
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample(generator=generator)).sample
            kl = posterior.kl().mean()
            loss = F.mse_loss(reconstruction, batch) + kl_weight * kl
            if not torch.isfinite(loss.detach()):
                raise MotError(f"VAE training diverged at step {step} (loss {float(loss.detach())}); lower lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            recent_losses = (recent_losses + [float(loss.detach())])[-20:]
            if bar is not None:
                if step % 10 == 0 or step == steps - 1:  # before the update, which shows it
                    bar.set_postfix(loss=f"{sum(recent_losses) / len(recent_losses):.4f}", kl=f"{float(kl.detach()):.1f}",
                                    refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    vae.eval().requires_grad_(False)
    train_seconds = time.perf_counter() - started

    encode_batch = max(batch_size, 256)
    train_std = _latent_std(vae, train, encode_batch)
    if not train_std > 0:
        raise MotError(f"the fitted VAE maps every training image to the same latent (std {train_std}); train longer or raise lr")
    scaling_factor = 1.0 / train_std
    vae.register_to_config(scaling_factor=scaling_factor)
    metrics = _reconstruction_metrics(vae, val.float(), encode_batch)
    report = {
        "recon_mse": metrics["mse"],
        "recon_psnr": metrics["psnr"],
        "latent_std": metrics["latent_std"],
        "scaling_factor": scaling_factor,
        "steps": float(steps),
        "kl": metrics["kl"],
        "final_train_loss": sum(recent_losses) / len(recent_losses),
        "train_seconds": round(train_seconds, 2),
        "n_train": float(len(train)),
        "n_val": float(len(val)),
    }
    _save_atomically(vae, {"architecture": _jsonable(resolved), "report": report}, out_dir)
    return report


def _latent_std(vae: AutoencoderKL, images: torch.Tensor, batch_size: int) -> float:
    """Std over every element of the (unscaled) posterior means, accumulated in float64 so
    thousands of images cost one pass and no concatenation."""
    total = total_sq = count = 0.0
    for start in range(0, len(images), batch_size):
        means = _posterior_mean(vae, images[start:start + batch_size]).double()
        total += float(means.sum())
        total_sq += float(means.pow(2).sum())
        count += means.numel()
    mean = total / count
    return math.sqrt(max(total_sq / count - mean * mean, 0.0))


@torch.no_grad()
def _reconstruction_metrics(vae: AutoencoderKL, images: torch.Tensor, batch_size: int) -> dict[str, float]:
    squared_error = kl_sum = 0.0
    latent_sum = latent_sq = latent_count = 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        posterior = vae.encode(batch.to(_device(vae), _dtype(vae))).latent_dist
        kl_sum += float(posterior.kl().double().sum())
        means = posterior.mean.double()
        latent_sum += float(means.sum())
        latent_sq += float(means.pow(2).sum())
        latent_count += means.numel()
        # The path the diffusion model's samples take (as encode_latents): scaled means in,
        # clamped images out.
        shift = vae.config.get("shift_factor") or 0.0
        scaled = (posterior.mean.float() - shift) * float(vae.config.scaling_factor)
        reconstruction = decode_latents(vae, scaled, batch_size).to(batch.device)
        # Both in [-1, 1]; halving the difference maps the error to the [0, 1] scale.
        squared_error += float(((reconstruction - batch.float()) / 2.0).pow(2).sum(dtype=torch.float64))
    mse = squared_error / images.numel()
    latent_mean = latent_sum / latent_count
    return {
        "mse": mse,
        "psnr": _PSNR_CAP_DB if mse <= 0 else min(_PSNR_CAP_DB, 10.0 * math.log10(1.0 / mse)),
        "latent_std": math.sqrt(max(latent_sq / latent_count - latent_mean * latent_mean, 0.0)),
        "kl": kl_sum / len(images),
    }


def _save_atomically(vae: AutoencoderKL, report: dict, out_dir: Path) -> None:
    """``save_pretrained`` into a sibling temporary folder with ``report.json``, then rename it
    into place, so an interrupted fit never leaves a half-written VAE where load_vae looks."""
    def write(folder: Path) -> None:
        vae.save_pretrained(str(folder), safe_serialization=True)
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    write_folder_atomically(out_dir, write)


# -- loading ---------------------------------------------------------------------------------
def load_vae(directory: Path, architecture: dict | None, *, modality: str = "<name>") -> AutoencoderKL:
    """Load a diffusers-format VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    ``architecture`` is given for our own fitted VAE: the saved config must then match
    ``DEFAULT_ARCHITECTURE | architecture`` (see :func:`architecture_mismatches`). ``None`` for a
    published VAE, taken as it is. ``modality`` only names the config section in messages.
    Missing or unreadable files, or weights that do not fit the config, raise a one-line
    :class:`MotError`. Returns the model in eval mode with ``requires_grad`` off.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MotError(f"no image VAE folder at {directory}; run `mot tokenizer fit` or fix the path")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise MotError(f"image VAE in {directory} has no {name}; run `mot tokenizer fit` or fix the path")
    try:
        saved_config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        if not isinstance(saved_config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise MotError(f"image VAE config {directory / CONFIG_FILE} is unreadable: {_first_line(error)}") from None
    if architecture is not None:
        problems = architecture_mismatches(saved_config, architecture)
        if problems:
            raise MotError(
                f"image VAE in {directory} does not match the config ({'; '.join(problems)}); run "
                f"`mot tokenizer fit --force` or fix mixture.modalities.{modality}.options.vae"
            )
    from diffusers import AutoencoderKL

    try:
        vae, info = AutoencoderKL.from_pretrained(
            str(directory), local_files_only=True, use_safetensors=True,
            # accelerate is not a dependency; saying so up front keeps diffusers from warning.
            low_cpu_mem_usage=False, output_loading_info=True,
        )
    except Exception as error:  # a corrupt file surfaces as OSError, SafetensorError, RuntimeError ...
        raise MotError(f"image VAE weights in {directory} are unreadable: {_first_line(error)}") from None
    # diffusers only warns about missing weights and initialises them at random: refuse instead.
    for label in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = info.get(label) or []
        if keys:
            shown = ", ".join(str(k) for k in list(keys)[:3])
            raise MotError(
                f"image VAE weights in {directory} do not fit its {CONFIG_FILE}: {len(keys)} "
                f"{label.replace('_', ' ')} ({shown}); re-download or refit it"
            )
    return vae.eval().requires_grad_(False)


def weights_digest(directory: Path) -> str:
    """blake2b (8 bytes, hex) of the VAE weights file: part of every cache key derived from it."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise MotError(f"image VAE in {directory} has no {WEIGHTS_FILE}; run `mot tokenizer fit` or fix the path")
    hasher = hashlib.blake2b(digest_size=8)
    with path.open("rb") as handle:
        # Published VAEs are a few hundred MB: hash in chunks rather than reading it whole.
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


# -- encoding --------------------------------------------------------------------------------
def _device(vae: AutoencoderKL) -> torch.device:
    return next(vae.parameters()).device


def _dtype(vae: AutoencoderKL) -> torch.dtype:
    return next(vae.parameters()).dtype


def _check_images(images: torch.Tensor, what: str, channels: int, factor: int) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != channels:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise MotError(f"{what} must be a float tensor of shape (N, {channels}, H, W), got {shape}")
    height, width = images.shape[2:]
    if height % factor or width % factor or height == 0 or width == 0:
        raise MotError(f"{what} are {height}x{width}; the VAE needs sides divisible by its downsampling factor {factor}")
    if not images.is_floating_point():
        raise MotError(f"{what} must be floats scaled to [-1, 1], got dtype {images.dtype}")
    if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
        raise MotError(f"{what} must be scaled to [-1, 1], got range [{float(images.min()):.3g}, {float(images.max()):.3g}]")


@torch.no_grad()
def _posterior_mean(vae: AutoencoderKL, batch: torch.Tensor) -> torch.Tensor:
    return vae.encode(batch.to(_device(vae), _dtype(vae))).latent_dist.mean


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] -> (N, C, H/f, W/f) float32 latents on the images' device.

    The posterior mean (deterministic: the same image always gives the same latent), minus
    ``config.shift_factor`` when the VAE has one, times ``config.scaling_factor``.
    """
    factor = downsample_factor(vae)
    _check_images(images, "images to encode", vae.config.in_channels, factor)
    n, _, height, width = images.shape
    shift = vae.config.get("shift_factor") or 0.0
    scale = float(vae.config.scaling_factor)
    if n == 0:
        return torch.empty(0, vae.config.latent_channels, height // factor, width // factor, device=images.device)
    chunks = []
    for start in range(0, n, max(1, batch_size)):
        means = _posterior_mean(vae, images[start:start + batch_size])
        chunks.append(((means.float() - shift) * scale).to(images.device))
    return torch.cat(chunks)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, C, h, w) scaled latents -> (N, 3, h*f, w*f) float32 images clamped to [-1, 1], on the
    latents' device. Undoes :func:`encode_latents`' scaling (and shift) before decoding."""
    channels = vae.config.latent_channels
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != channels:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise MotError(f"latents to decode must be a float tensor of shape (N, {channels}, h, w), got {shape}")
    factor = downsample_factor(vae)
    n, _, height, width = latents.shape
    if n == 0:
        return torch.empty(0, vae.config.out_channels, height * factor, width * factor, device=latents.device)
    shift = vae.config.get("shift_factor") or 0.0
    scale = float(vae.config.scaling_factor)
    chunks = []
    for start in range(0, n, max(1, batch_size)):
        z = latents[start:start + batch_size].to(_device(vae), _dtype(vae)) / scale + shift
        chunks.append(vae.decode(z).sample.float().clamp(-1.0, 1.0).to(latents.device))
    return torch.cat(chunks)


# -- cache -----------------------------------------------------------------------------------
class LatentCache:
    """Latents of images already encoded by one VAE, on disk in the VAE folder: encoding every
    image with a conv net is the slowest part of preparing a run on a CPU, and runs that share a
    VAE share the work. Keyed by image content; the file name carries the weights digest
    (:func:`weights_digest`), so new weights start afresh. Stored as safetensors: loading it
    runs no pickle."""

    def __init__(self, folder: Path, digest: str):
        self.file = Path(folder) / f"latents-{digest}.safetensors"
        self.latents: dict[str, torch.Tensor] = {}
        if self.file.is_file():
            try:
                self.latents = dict(load_file(str(self.file)))
            except Exception:  # an unreadable cache is only lost work: rebuild it
                self.latents = {}

    @staticmethod
    def key(image: torch.Tensor) -> str:
        """blake2b of the image's float32 bytes and shape (the same bytes as another shape is another image)."""
        image = image.detach().float().contiguous().cpu()
        hasher = hashlib.blake2b(str(tuple(image.shape)).encode(), digest_size=16)
        hasher.update(image.numpy().tobytes())
        return hasher.hexdigest()

    def __contains__(self, key: str) -> bool:
        return key in self.latents

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.latents[key]

    def __setitem__(self, key: str, latents: torch.Tensor) -> None:
        # A clone: a view into a batch would keep the whole batch alive and cannot be saved alone.
        self.latents[key] = latents.detach().to("cpu", torch.float32).contiguous().clone()

    def __len__(self) -> int:
        return len(self.latents)

    def save(self) -> None:
        if not self.file.parent.is_dir():
            return
        tmp = self.file.with_suffix(f".tmp{os.getpid()}")
        try:
            save_file(self.latents, str(tmp))
            os.replace(tmp, self.file)
        except (OSError, RuntimeError, SafetensorError):  # a read-only or full VAE folder: the cache only saves time
            tmp.unlink(missing_ok=True)


def _jsonable(value: Any) -> Any:
    """Tuples as lists, recursively: saved configs come back from JSON with lists."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
