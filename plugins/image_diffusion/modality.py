"""The image modality of the Transfusion setting: VAE latent patches, denoised by diffusion.

An image becomes ``[BOI] p_1 ... p_P [EOI]``: P continuous positions, one per p x p patch of
its VAE latent (raster order), between begin/end-of-image markers. The markers are ids of
this modality's two-token vocabulary but, as in Transfusion, the text tower reads them and the
next-token loss predicts them (``marker_modality``). The patches attend to each other in both
directions (``bidirectional``) and to everything before the image causally, and packing never
cuts an image (``keep_segments_whole``).

The VAE (``diffusers.AutoencoderKL``) is a small one that ``mot tokenizer fit`` trains on the
run's images, or a published SD-VAE folder on disk (``pretrained_vae``). Latents are cached
next to the VAE, keyed by image content and VAE weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from mot_core.errors import MotError
from mot_core.plugin_api import (
    ContinuousSegment, Modality, PluginOptions, RawDocument, SamplingParams, SpanGrammar, SpanRunner, fingerprint_files,
)
from plugins.common.images import images_with_captions, load_image_file, save_image_grid
from plugins.image_diffusion.modules import (
    LinearPatchAdapter, LinearPatchHead, UNetPatchAdapter, UNetPatchHead, patchify, unpatchify,
)
from plugins.image_diffusion.process import DiffusionOptions, DiffusionProcess
from plugins.image_diffusion.vae import (
    CONFIG_FILE, DEFAULT_FIT_BATCH_SIZE, DEFAULT_FIT_LR, DEFAULT_FIT_STEPS, DEFAULT_KL_WEIGHT, WEIGHTS_FILE, LatentCache,
    decode_latents, downsample_factor, encode_latents, fit_vae, load_vae, resolve_architecture, weights_digest,
)

BEGIN_OF_IMAGE, END_OF_IMAGE = 0, 1


class VAEFitOptions(PluginOptions):
    steps: int = Field(DEFAULT_FIT_STEPS, ge=1)
    batch_size: int = Field(DEFAULT_FIT_BATCH_SIZE, ge=1)
    lr: float = Field(DEFAULT_FIT_LR, gt=0)
    kl_weight: float = Field(DEFAULT_KL_WEIGHT, ge=0)
    seed: int = 0
    feature_net_steps: int = Field(150, ge=0, description="FID-style feature network; 0 skips it")
    clip_steps: int = Field(300, ge=0, description="small CLIP-style image-text model; 0 skips it")


class ImageDiffusionOptions(PluginOptions):
    tokenizer_dir: str = Field("data/tokenizers/image_diffusion", description="the VAE written by `mot tokenizer fit`")
    vae: dict[str, Any] = Field(default_factory=dict, description="AutoencoderKL fields (defaults: small local VAE)")
    pretrained_vae: str | None = Field(None, description="a published diffusers VAE folder (e.g. an SD-VAE) instead of the local one")
    fit: VAEFitOptions = VAEFitOptions()
    image_size: int = Field(32, ge=8, description="side of the square images in pixels")
    patch_size: int = Field(2, ge=1, description="latent patch side: one position per p x p patch (Transfusion: 2)")
    adapter: str = Field("linear", pattern="^(linear|unet)$", description="linear (Transfusion default) or unet (down/up blocks)")
    unet_width: int = Field(64, ge=8, description="channels of the unet adapter and head")
    diffusion: DiffusionOptions = DiffusionOptions()
    text_modality: str = Field("text", description="the discrete modality that reads the BOI/EOI markers")
    encode_batch_size: int = Field(256, ge=1)
    inception_weights: str | None = Field(None, description="torch-fidelity Inception weights: real FID instead of fid_local")
    clip_model: str | None = Field(None, description="a published CLIP folder (transformers format): clip_score instead of clip_local")

    @model_validator(mode="after")
    def _check(self) -> "ImageDiffusionOptions":
        if self.pretrained_vae is None:
            try:
                resolve_architecture(self.vae)
            except MotError as exc:
                raise ValueError(str(exc)) from None
        elif self.vae:
            raise ValueError("vae (a local architecture) and pretrained_vae exclude each other")
        return self


class ImageDiffusion(Modality):
    name = "image_diffusion"
    default_sample_file = "samples.png"  # a grid of the generated images
    Options = ImageDiffusionOptions
    default_loss = "diffusion"
    default_evaluators = ("image_diffusion",)
    bidirectional = True
    keep_segments_whole = True

    def __init__(self, options: ImageDiffusionOptions, state_dir: Path):
        super().__init__(options, state_dir)
        self.vae = None
        self._cache: LatentCache | None = None
        self.process = DiffusionProcess(options.diffusion)

    # -- VAE lifecycle -----------------------------------------------------------------------
    @property
    def vae_dir(self) -> Path:
        return Path(self.options.pretrained_vae or self.options.tokenizer_dir)

    def fit(self, train_docs: list[RawDocument], val_docs: list[RawDocument], progress: bool = True,
            force: bool = False) -> dict[str, float]:
        from plugins.common.fid import FEATURE_FILE, fit_feature_net
        from plugins.image_diffusion.clip_score import fit_contrastive_scorer

        opts: ImageDiffusionOptions = self.options
        out = Path(opts.tokenizer_dir)
        train, captions = images_with_captions(train_docs, self.name)
        val, _ = images_with_captions(val_docs, self.name)
        report: dict[str, float] = {}
        if opts.pretrained_vae is None:
            saved = out / "report.json"
            if not force and saved.is_file() and json.loads(saved.read_text()).get("architecture") == resolve_architecture(opts.vae):
                print(f"image VAE in {out} matches the config; keeping it (--force to refit)")
                report["kept"] = 1.0
            else:
                report.update(fit_vae(train, val, opts.vae, steps=opts.fit.steps, batch_size=opts.fit.batch_size,
                                      lr=opts.fit.lr, kl_weight=opts.fit.kl_weight, seed=opts.fit.seed, out_dir=out,
                                      progress=progress))
        out.mkdir(parents=True, exist_ok=True)
        if opts.fit.feature_net_steps and (force or not (out / FEATURE_FILE).is_file()):
            report.update(fit_feature_net(train, captions, out, steps=opts.fit.feature_net_steps, seed=opts.fit.seed,
                                          progress=progress))
        if opts.fit.clip_steps and (force or not (out / "clip_local.safetensors").is_file()):
            report.update(fit_contrastive_scorer(train, captions, out, steps=opts.fit.clip_steps, seed=opts.fit.seed,
                                                 progress=progress))
        return report

    def tokenizer_folder(self) -> Path | None:
        """``tokenizer_dir``, shared between runs (the engine records the data it was fitted on)."""
        opts = self.options
        return None if opts.pretrained_vae is not None else Path(opts.tokenizer_dir)

    def prepare(self, train_payloads) -> None:
        opts: ImageDiffusionOptions = self.options
        self.vae = load_vae(self.vae_dir, None if opts.pretrained_vae else opts.vae, modality=self.name)
        factor = downsample_factor(self.vae)
        if opts.image_size % factor or (opts.image_size // factor) % opts.patch_size:
            raise MotError(
                f"modality '{self.name}': image_size {opts.image_size} gives a {opts.image_size / factor:g}-wide latent "
                f"(VAE downsampling x{factor}), which patch_size {opts.patch_size} does not divide"
            )
        self._cache = LatentCache(self.vae_dir if opts.pretrained_vae is None else Path(opts.tokenizer_dir),
                                  weights_digest(self.vae_dir))
        record = json.dumps({"vae": str(self.vae_dir), "config": dict(self.vae.config)}, indent=2, default=str)
        file = self.state_dir / "tokenizer.json"
        if not file.is_file() or file.read_text() != record:  # a reopened run folder may be read-only
            self.state_dir.mkdir(parents=True, exist_ok=True)
            file.write_text(record)

    def fingerprint(self) -> str:
        """The default (options, vocabulary, ``state_dir``) and the VAE's bytes: its
        ``config.json`` and weights, in ``tokenizer_dir`` or ``pretrained_vae``. Not the rest of
        those folders: the latent cache grows as images are encoded, and the evaluation
        networks (feature net, CLIP) do not change the latents."""
        return fingerprint_files([self.vae_dir / CONFIG_FILE, self.vae_dir / WEIGHTS_FILE], extra=super().fingerprint())

    def _require(self):
        if self.vae is None:
            raise RuntimeError("ImageDiffusion.prepare() must run before the VAE is used")
        return self.vae

    # -- layout ------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self._require().config.latent_channels)

    @property
    def grid(self) -> int:
        """Patches per side of an image."""
        return self.options.image_size // downsample_factor(self._require()) // self.options.patch_size

    @property
    def patches_per_image(self) -> int:
        return self.grid * self.grid

    @property
    def vocab_size(self) -> int:
        return 2  # begin- and end-of-image markers

    @property
    def input_dim(self) -> int:
        return self.latent_channels * self.options.patch_size ** 2

    @property
    def marker_modality(self) -> str:
        return self.options.text_modality

    def span_grammar(self) -> SpanGrammar:
        return SpanGrammar(begin=BEGIN_OF_IMAGE, end=END_OF_IMAGE, body_lo=0, body_hi=0, length=self.patches_per_image)

    # -- encode / decode ---------------------------------------------------------------------
    def encode(self, payload: torch.Tensor) -> ContinuousSegment:
        return self.encode_batch([payload])[0]

    @torch.no_grad()
    def encode_batch(self, payloads: list[torch.Tensor]) -> list[ContinuousSegment]:
        """(3, H, W) images in [-1, 1] -> [BOI] + P latent patches (P, input_dim) + [EOI] each."""
        vae, size = self._require(), self.options.image_size
        for image in payloads:
            if not isinstance(image, torch.Tensor) or tuple(image.shape) != (3, size, size):
                shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise MotError(f"an image segment must be a (3, {size}, {size}) tensor (image_size {size}), got {shape}")
        cache = self._cache
        keys = [cache.key(image) for image in payloads]
        first_of_key: dict[str, int] = {}  # an image shared by several documents is encoded once
        for i, key in enumerate(keys):
            if key not in cache:
                first_of_key.setdefault(key, i)
        missing = list(first_of_key.values())
        step = self.options.encode_batch_size
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            for i, latent in zip(chunk, encode_latents(vae, torch.stack([payloads[i] for i in chunk]).float())):
                cache[keys[i]] = latent
        if missing:
            cache.save()
        patches = patchify(torch.stack([cache[k] for k in keys]), self.options.patch_size)
        return [ContinuousSegment.of_values(p, prefix=(BEGIN_OF_IMAGE,), suffix=(END_OF_IMAGE,)) for p in patches]

    def values_to_payloads(self, values: torch.Tensor) -> list[torch.Tensor]:
        """(B, P, input_dim) latent patches -> B images (3, H, W) in [-1, 1]."""
        expected = (self.patches_per_image, self.input_dim)
        if values.dim() != 3 or tuple(values.shape[1:]) != expected:
            raise MotError(f"latent patches of shape {tuple(values.shape)}; expected (B, {expected[0]}, {expected[1]})")
        latents = unpatchify(values.float().cpu(), self.latent_channels, self.grid, self.options.patch_size)
        return list(decode_latents(self._require(), latents))

    def read_payload(self, path: Path) -> torch.Tensor:
        return load_image_file(Path(path), self.options.image_size)

    def write_payloads(self, payloads: list[torch.Tensor], path: Path, captions: list[str] | None = None) -> Path:
        images = torch.stack(list(payloads))
        save_image_grid(images, Path(path), nrow=min(8, len(images)), captions=captions)
        return Path(path)

    # -- model modules and generation --------------------------------------------------------
    def build_adapter(self, dim: int) -> torch.nn.Module:
        opts: ImageDiffusionOptions = self.options
        if opts.adapter == "unet":
            return UNetPatchAdapter(self.latent_channels, self.grid, opts.patch_size, dim, opts.unet_width)
        return LinearPatchAdapter(self.input_dim, dim)

    def build_head(self, dim: int) -> torch.nn.Module:
        opts: ImageDiffusionOptions = self.options
        if opts.adapter == "unet":
            return UNetPatchHead(dim, self.latent_channels, self.grid, opts.patch_size, opts.unet_width)
        return LinearPatchHead(dim, self.input_dim)

    def sample_values(self, runner: SpanRunner, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        """Denoise one image per row from pure noise with the configured sampler; with guidance,
        the prediction is ``u + s (c - u)`` from the conditional and unconditional rows."""
        opts: ImageDiffusionOptions = self.options
        steps = params.denoising_steps or opts.diffusion.inference_steps
        scheduler = self.process.sampler(steps)
        rows, shape = runner.rows, (runner.rows, self.patches_per_image, self.input_dim)
        device = generator.device
        x = torch.randn(shape, generator=generator, device=device) * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            both = torch.cat([x, x]) if runner.guided else x
            timestep = torch.full(both.shape[:2], float(t), device=device)
            out = runner.predict(both, {"t": timestep})
            if runner.guided:
                cond, uncond = out[:rows], out[rows:]
                out = uncond + params.cfg_scale * (cond - uncond)
            x = self.process.step(scheduler, out, t, x, generator)
        return x
