"""Train, save, load and measure VQGAN image tokenizers.

Two sources of a tokenizer:

* our own small one, trained on CPU by :func:`fit_vq_tokenizer` and stored as a directory with
  ``vqgan.safetensors`` (taming-named weights) and ``vqgan.json`` (``{"config", "report"}``),
  read back by :func:`load_vq_tokenizer`;
* a published taming-transformers / Chameleon VQGAN (YAML + Lightning ``.ckpt``), read by
  :func:`load_taming_checkpoint`.

Images are float tensors (N, C, H, W) in [-1, 1] throughout; metrics map them to [0, 1].
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mot_core.errors import MotError
from mot_core.plugin_api import progress as progress_display
from plugins.common.images import psnr_from_mse
from plugins.common.tokenizer_fitting import warmup_cosine_lr, write_folder_atomically
from plugins.image_vq.vqgan import VQGAN, VQGANConfig, code_statistics

WEIGHTS_FILE = "vqgan.safetensors"
META_FILE = "vqgan.json"
# Keys of a taming checkpoint that belong to the training loss (LPIPS + PatchGAN discriminator),
# not to the tokenizer.
TAMING_LOSS_PREFIX = "loss."
MAX_KEYS_IN_ERROR = 5
# Training schedule for the default VQGANConfig on 32x32 images. Measured on 2 shared CPU cores
# with 4000 MNIST digits: 3 minutes, 28.1 dB validation PSNR, codebook perplexity 431 of 512.
DEFAULT_FIT_STEPS = 400
DEFAULT_FIT_BATCH_SIZE = 32
DEFAULT_FIT_LR = 2e-3


def _check_image_tensor(images: torch.Tensor, what: str, config: VQGANConfig) -> None:
    expected = (config.in_channels, config.resolution, config.resolution)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise MotError(f"{what} must be a float tensor of shape (N, {', '.join(map(str, expected))}), got {shape}")
    if images.shape[0] == 0:
        raise MotError(f"{what} is empty")
    if not images.is_floating_point() or images.min() < -1.001 or images.max() > 1.001:
        raise MotError(f"{what} must be floats scaled to [-1, 1] (got dtype {images.dtype}, "
                       f"range [{float(images.min()):.3g}, {float(images.max()):.3g}])")


def _learning_rate(step: int, steps: int, peak: float) -> float:
    # Warm-up of at most 20 steps (the tail of the decay is where most of the final PSNR is gained).
    return warmup_cosine_lr(step, steps, peak, max_warmup=20)


def fit_vq_tokenizer(
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    config: VQGANConfig,
    steps: int = DEFAULT_FIT_STEPS,
    batch_size: int = DEFAULT_FIT_BATCH_SIZE,
    lr: float = DEFAULT_FIT_LR,
    seed: int = 0,
    out_dir: Path = Path("vq_tokenizer"),
    progress: bool = False,
) -> dict:
    """Train a VQGAN on (N, C, H, W) images in [-1, 1] and save it to ``out_dir``.

    Adam on ``MSE(reconstruction, image) + vq_loss`` (no perceptual or adversarial terms: the
    local tokenizer has to train in minutes on a CPU). Batches are drawn as shuffled epochs from
    a generator seeded with ``seed`` and the model is initialised under the same seed, so on CPU
    the result is the same for the same inputs. The global RNG state of the caller is left as
    it was.

    ``out_dir`` is written atomically: a sibling temporary directory is filled, then renamed
    into place (replacing an earlier tokenizer there). Returns the report also saved in
    ``vqgan.json``: ``val_psnr`` (dB, images in [0, 1]), ``val_mse``, ``codebook_perplexity``,
    ``codes_used``, ``steps``, plus ``n_embed``, ``tokens_per_image``, ``train_seconds``,
    ``final_train_loss``, ``n_train``, ``n_val``.
    """
    _check_image_tensor(train_images, "train_images", config)
    _check_image_tensor(val_images, "val_images", config)
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise MotError(f"steps, batch_size and lr must be positive, got {steps}, {batch_size}, {lr}")
    out_dir = Path(out_dir)
    train_images = train_images.float().contiguous()
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Trains where the images are (CPU for the local tokenizer; determinism is promised there).
        model = VQGAN(config).to(train_images.device)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=lr, betas=(0.9, 0.99))
        batch_generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train_images), generator=batch_generator)
        cursor = 0
        recent_losses: list[float] = []
        bar = None
        if progress:
            bar = progress_display(total=steps, desc="vq tokenizer", unit="step")
        for step in range(steps):
            if cursor + batch_size > len(order):
                order = torch.randperm(len(train_images), generator=batch_generator)
                cursor = 0
            batch = train_images[order[cursor:cursor + batch_size]]
            cursor += batch_size
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps, lr)
            reconstruction, vq_loss, stats = model(batch)
            loss = F.mse_loss(reconstruction, batch) + vq_loss
            if not torch.isfinite(loss.detach()):
                raise MotError(f"VQ tokenizer training diverged at step {step} (loss {float(loss.detach())}); lower lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            recent_losses = (recent_losses + [float(loss.detach())])[-20:]
            if bar is not None:
                if step % 10 == 0 or step == steps - 1:  # before the update, which shows it
                    bar.set_postfix(loss=f"{sum(recent_losses) / len(recent_losses):.4f}",
                                    ppl=f"{stats['perplexity']:.0f}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
    model.eval()
    train_seconds = time.perf_counter() - started
    metrics = reconstruction_metrics(model, val_images.to(train_images.device), batch_size=max(batch_size, 64))
    report = {
        "val_psnr": metrics["psnr"],
        "val_mse": metrics["mse"],
        "codebook_perplexity": metrics["codebook_perplexity"],
        "codes_used": metrics["codes_used"],
        "steps": steps,
        "n_embed": config.n_embed,
        "tokens_per_image": config.tokens_per_image,
        "train_seconds": round(train_seconds, 2),
        "final_train_loss": sum(recent_losses) / len(recent_losses),
        "n_train": len(train_images),
        "n_val": len(val_images),
    }
    save_vq_tokenizer(model, report, out_dir)
    return report


def save_vq_tokenizer(model: VQGAN, report: dict, out_dir: Path) -> None:
    """Write ``vqgan.safetensors`` + ``vqgan.json`` to ``out_dir`` atomically (temp dir, rename)."""
    def write(folder: Path) -> None:
        weights = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
        save_file(weights, str(folder / WEIGHTS_FILE))
        meta = {"config": model.config.to_dict(), "report": report}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    write_folder_atomically(Path(out_dir), write)


def load_vq_tokenizer(directory: Path) -> tuple[VQGAN, dict]:
    """Load a tokenizer saved by :func:`fit_vq_tokenizer`; returns ``(model in eval mode, report)``.

    Raises :class:`MotError` when the directory or a file is missing, unreadable or inconsistent.
    """
    directory = Path(directory)
    weights_path, meta_path = directory / WEIGHTS_FILE, directory / META_FILE
    if not directory.is_dir():
        raise MotError(f"VQ tokenizer directory not found: {directory} (train one with fit_vq_tokenizer)")
    for path in (weights_path, meta_path):
        if not path.is_file():
            raise MotError(f"VQ tokenizer in {directory} is incomplete: {path.name} is missing; retrain it")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        config = VQGANConfig.from_dict(meta["config"])
        report = dict(meta.get("report") or {})
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise MotError(f"VQ tokenizer metadata {meta_path} is unreadable: {error}") from None
    try:
        weights = load_file(str(weights_path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as error:
        raise MotError(f"VQ tokenizer weights {weights_path} are unreadable: {error}") from None
    model = VQGAN(config)
    _load_strict(model, weights, str(weights_path))
    return model.eval(), report


def _load_strict(model: VQGAN, state_dict: dict, source: str) -> None:
    """Load ``state_dict`` into ``model`` requiring exactly its keys and shapes; MotError otherwise."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs expected {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:MAX_KEYS_IN_ERROR])
            more = f" (+{len(items) - MAX_KEYS_IN_ERROR} more)" if len(items) > MAX_KEYS_IN_ERROR else ""
            problems.append(f"{len(items)} {label}: {shown}{more}")
    if problems:
        raise MotError(f"{source} does not match the VQGAN architecture of its config: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def config_from_taming_yaml(config_yaml: Path) -> VQGANConfig:
    """Read ``model.params.{ddconfig, n_embed, embed_dim}`` of a taming/Chameleon VQGAN YAML."""
    config_yaml = Path(config_yaml)
    if not config_yaml.is_file():
        raise MotError(f"taming VQGAN config not found: {config_yaml}")
    try:
        document = yaml.safe_load(config_yaml.read_text(encoding="utf-8"))
        params = document["model"]["params"]
        ddconfig = dict(params["ddconfig"])
        n_embed, embed_dim = int(params["n_embed"]), int(params["embed_dim"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as error:
        raise MotError(
            f"{config_yaml} is not a taming VQGAN config (needs model.params.ddconfig, n_embed, embed_dim): {error!r}"
        ) from None
    target = str(document["model"].get("target", "taming.models.vqgan.VQModel"))
    if not target.endswith("VQModel"):
        raise MotError(f"{config_yaml}: only taming VQModel checkpoints are supported, this one is {target}")
    unsupported = []
    if ddconfig.get("double_z", False):
        unsupported.append("double_z: true")
    if not ddconfig.get("resamp_with_conv", True):
        unsupported.append("resamp_with_conv: false")
    if ddconfig.get("attn_type", "vanilla") != "vanilla" or ddconfig.get("use_linear_attn", False):
        unsupported.append(f"attn_type {ddconfig.get('attn_type')!r}")
    if ddconfig.get("tanh_out", False) or ddconfig.get("give_pre_end", False):
        unsupported.append("tanh_out/give_pre_end")
    if params.get("remap") is not None:
        unsupported.append("remap")
    if unsupported:
        raise MotError(f"{config_yaml}: unsupported VQGAN options {', '.join(unsupported)}")
    try:
        return VQGANConfig(
            resolution=int(ddconfig["resolution"]),
            in_channels=int(ddconfig["in_channels"]),
            out_ch=int(ddconfig["out_ch"]),
            ch=int(ddconfig["ch"]),
            ch_mult=tuple(ddconfig["ch_mult"]),
            num_res_blocks=int(ddconfig["num_res_blocks"]),
            attn_resolutions=tuple(ddconfig.get("attn_resolutions") or ()),
            z_channels=int(ddconfig["z_channels"]),
            embed_dim=embed_dim,
            n_embed=n_embed,
            dropout=float(ddconfig.get("dropout", 0.0)),
            # taming trains its codebook by gradient; fine-tuning a loaded one keeps doing so.
            quantizer="straight_through",
        )
    except (KeyError, TypeError, ValueError) as error:
        raise MotError(f"{config_yaml}: bad ddconfig: {error}") from None


class _InertPickledObject:
    """Stands in for any non-tensor class pickled into a Lightning checkpoint (callbacks,
    hyper-parameter containers, ...). It runs no code: it only records what it was given."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _inert_stand_in(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    stand_in = type(name, (_InertPickledObject,), {})
    # weights_only unpickling allows a global when "module.qualname" matches an allowed object.
    stand_in.__module__ = module
    stand_in.__qualname__ = name
    return stand_in


def _read_checkpoint(ckpt: Path) -> dict:
    """``torch.load`` with ``weights_only=True``; classes pickled by Lightning (e.g. its
    ``ModelCheckpoint`` callback, which old taming checkpoints carry) are replaced by inert
    stand-ins instead of being imported, so neither Lightning nor arbitrary code is needed."""
    try:
        unsafe_globals = torch.serialization.get_unsafe_globals_in_checkpoint(str(ckpt))
    except Exception:
        # Not a zip checkpoint (or unreadable): plain weights_only loading reports it below.
        unsafe_globals = []
    stand_ins = [_inert_stand_in(name) for name in unsafe_globals if "." in name]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(str(ckpt), map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MotError(f"cannot read checkpoint {ckpt}: {first_line}") from None


def load_taming_checkpoint(config_yaml: Path, ckpt: Path) -> VQGAN:
    """Load a published taming-transformers / Chameleon VQGAN as a :class:`VQGAN` (eval mode).

    ``config_yaml`` is the model's YAML (``model.params.ddconfig``, ``n_embed``, ``embed_dim``);
    ``ckpt`` a Lightning checkpoint whose ``state_dict`` holds taming ``VQModel`` weights (a bare
    state dict is accepted too). ``loss.*`` entries (discriminator, LPIPS) are dropped; every
    other key must match the architecture exactly, else :class:`MotError` names a few missing or
    unexpected keys and shape mismatches.
    """
    config = config_from_taming_yaml(config_yaml)
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise MotError(f"taming VQGAN checkpoint not found: {ckpt}")
    checkpoint = _read_checkpoint(ckpt)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        state_dict = checkpoint["state_dict"]
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict = checkpoint
    else:
        raise MotError(f"{ckpt} has no 'state_dict' of tensors; is it a taming/Lightning VQGAN checkpoint?")
    model_weights = {
        key: value for key, value in state_dict.items()
        if not key.startswith(TAMING_LOSS_PREFIX) and isinstance(value, torch.Tensor)
    }
    model = VQGAN(config)
    _load_strict(model, model_weights, str(ckpt))
    return model.eval()


@torch.no_grad()
def reconstruction_metrics(model: VQGAN, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Tokenize and detokenize (N, C, H, W) images in [-1, 1] and measure the round trip.

    Returns ``mse`` (mean over all pixels, images mapped to [0, 1]), ``psnr`` (dB, from that
    dataset-level mse), ``codebook_perplexity`` (exp of the entropy of the code frequencies over
    all N * g * g positions) and ``codes_used`` (distinct codes). The model is run in eval mode
    and restored to its previous mode afterwards.
    """
    if images.shape[0] == 0:
        raise MotError("reconstruction_metrics needs at least one image")
    was_training = model.training
    model.eval()
    squared_error = 0.0
    all_codes = []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].float()
            codes = model.encode(batch)
            reconstruction = model.decode_codes(codes)
            # Both in [-1, 1]; halving the difference maps the error to the [0, 1] scale.
            squared_error += float(((reconstruction - batch) / 2.0).pow(2).sum(dtype=torch.float64))
            all_codes.append(codes.reshape(-1))
    finally:
        model.train(was_training)
    mse = squared_error / images.numel()
    stats = code_statistics(torch.cat(all_codes), model.config.n_embed)
    return {
        "mse": mse,
        "psnr": psnr_from_mse(mse),
        "codebook_perplexity": stats["perplexity"],
        "codes_used": stats["codes_used"],
    }
