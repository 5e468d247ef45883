"""The image modality of the Chameleon setting: VQ codes between begin/end-of-image markers.

Local vocabulary: codes 0..n_embed-1, then begin-of-image (n_embed) and end-of-image
(n_embed + 1). An image is ``[boi, c_0, ..., c_{g*g-1}, eoi]`` in raster order, all tagged
with this modality, so the image tower predicts every code and the end marker.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from mot_core.errors import MotError
from mot_core.plugin_api import SpanGrammar
from mot_core.plugin_api import HFCodec, Modality, PluginOptions, RawDocument, fingerprint_files
from plugins.common.images import images_with_captions, load_image_file, save_image_grid
from plugins.image_vq.tokenizer_io import (
    DEFAULT_FIT_BATCH_SIZE,
    DEFAULT_FIT_LR,
    DEFAULT_FIT_STEPS,
    META_FILE,
    WEIGHTS_FILE,
    fit_vq_tokenizer,
    load_taming_checkpoint,
    load_vq_tokenizer,
)
from plugins.image_vq.vqgan import VQGAN, VQGANConfig


class VQFitOptions(PluginOptions):
    steps: int = Field(DEFAULT_FIT_STEPS, ge=1)
    batch_size: int = Field(DEFAULT_FIT_BATCH_SIZE, ge=1)
    lr: float = Field(DEFAULT_FIT_LR, gt=0)
    seed: int = 0
    feature_net_steps: int = Field(150, ge=0, description="FID feature network; 0 skips it")


class ImageVQOptions(PluginOptions):
    tokenizer_dir: str = Field("data/tokenizers/image_vq", description="written by `mot tokenizer fit`")
    architecture: dict[str, Any] = Field(default_factory=dict, description="VQGANConfig fields (defaults: small local tokenizer)")
    fit: VQFitOptions = VQFitOptions()
    taming_config: str | None = Field(None, description="published taming/Chameleon VQGAN YAML")
    taming_checkpoint: str | None = Field(None, description="its Lightning .ckpt; replaces the local tokenizer")
    encode_batch_size: int = Field(256, ge=1)
    inception_weights: str | None = Field(None, description="torch-fidelity Inception weights: real FID instead of fid_local")

    @model_validator(mode="after")
    def _check(self) -> "ImageVQOptions":
        try:
            VQGANConfig.from_dict(self.architecture)
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        if (self.taming_config is None) != (self.taming_checkpoint is None):
            raise ValueError("taming_config and taming_checkpoint go together")
        return self

    @property
    def vq_config(self) -> VQGANConfig:
        return VQGANConfig.from_dict(self.architecture)


class ImageVQ(Modality):
    name = "image"
    default_sample_file = "samples.png"  # a grid of the generated images
    Options = ImageVQOptions
    default_loss = "autoregressive"
    default_evaluators = ("image_vq",)

    def __init__(self, options: ImageVQOptions, state_dir: Path):
        super().__init__(options, state_dir)
        self.tokenizer: VQGAN | None = None
        self._code_cache: CodeCache | None = None

    # -- tokenizer lifecycle ---------------------------------------------------------------
    def fit(self, train_docs: list[RawDocument], val_docs: list[RawDocument], progress: bool = True,
            force: bool = False) -> dict[str, float]:
        from plugins.common.fid import FEATURE_FILE, fit_feature_net

        opts: ImageVQOptions = self.options
        if opts.taming_checkpoint:
            raise MotError("the image tokenizer is a published checkpoint (taming_checkpoint); there is nothing to fit")
        out = Path(opts.tokenizer_dir)
        if not force and (out / "vqgan.json").is_file():
            saved = json.loads((out / "vqgan.json").read_text())
            features_ready = not opts.fit.feature_net_steps or (out / FEATURE_FILE).is_file()
            if saved.get("config") == opts.vq_config.to_dict() and features_ready:
                print(f"image tokenizer in {out} matches the config; keeping it (--force to refit)")
                return {"kept": 1.0, **{k: float(v) for k, v in saved.get("report", {}).items() if isinstance(v, (int, float))}}
        train, train_captions = images_with_captions(train_docs, self.name)
        val, _ = images_with_captions(val_docs, self.name)
        report = fit_vq_tokenizer(
            train, val, opts.vq_config, steps=opts.fit.steps, batch_size=opts.fit.batch_size,
            lr=opts.fit.lr, seed=opts.fit.seed, out_dir=out, progress=progress,
        )
        if opts.fit.feature_net_steps:
            report.update(fit_feature_net(train, train_captions, out, steps=opts.fit.feature_net_steps, seed=opts.fit.seed,
                                          progress=progress))
        return report

    def tokenizer_folder(self) -> Path | None:
        """``tokenizer_dir``, shared between runs (the engine records the data it was fitted on)."""
        opts = self.options
        return None if opts.taming_checkpoint else Path(opts.tokenizer_dir)

    def prepare(self, train_payloads) -> None:
        opts: ImageVQOptions = self.options
        if opts.taming_checkpoint:
            self.tokenizer = load_taming_checkpoint(Path(opts.taming_config), Path(opts.taming_checkpoint))
        else:
            self.tokenizer, _ = load_vq_tokenizer(Path(opts.tokenizer_dir))
            saved = self.tokenizer.config.to_dict()
            wanted = opts.vq_config.to_dict()
            if saved != wanted:
                diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
                raise MotError(
                    f"image tokenizer in {opts.tokenizer_dir} does not match the config "
                    f"(saved vs configured: {diff}); run `mot tokenizer fit` again or fix mixture.modalities.image.options"
                )
        self.tokenizer.eval().requires_grad_(False)
        weights = Path(opts.taming_checkpoint) if opts.taming_checkpoint else Path(opts.tokenizer_dir) / "vqgan.safetensors"
        self._code_cache = CodeCache(Path(opts.tokenizer_dir), weights)
        record = json.dumps({
            "source": opts.taming_checkpoint or opts.tokenizer_dir, "config": self.tokenizer.config.to_dict(),
        }, indent=2)
        file = self.state_dir / "tokenizer.json"
        if not file.is_file() or file.read_text() != record:  # a reopened run folder may be read-only
            self.state_dir.mkdir(parents=True, exist_ok=True)
            file.write_text(record)

    def fingerprint(self) -> str:
        """The default (options, vocabulary, ``state_dir``) and the tokenizer's bytes: the
        published taming config and checkpoint, or the local ``vqgan.safetensors`` and
        ``vqgan.json``. Not the rest of ``tokenizer_dir``: its code cache grows as images are
        encoded, and the FID feature network does not change the codes."""
        opts: ImageVQOptions = self.options
        if opts.taming_checkpoint:
            files = [Path(opts.taming_config), Path(opts.taming_checkpoint)]
        else:
            files = [Path(opts.tokenizer_dir) / WEIGHTS_FILE, Path(opts.tokenizer_dir) / META_FILE]
        return fingerprint_files(files, extra=super().fingerprint())

    def _require(self) -> VQGAN:
        if self.tokenizer is None:
            raise RuntimeError("ImageVQ.prepare() must run before the tokenizer is used")
        return self.tokenizer

    # -- vocabulary --------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self._require().config.n_embed

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 2

    @property
    def begin_of_image(self) -> int:
        return self.codebook_size

    @property
    def end_of_image(self) -> int:
        return self.codebook_size + 1

    def span_grammar(self) -> SpanGrammar:
        return SpanGrammar(
            begin=self.begin_of_image, end=self.end_of_image, body_lo=0, body_hi=self.codebook_size,
            length=self._require().config.tokens_per_image,
        )

    # -- encode / decode -------------------------------------------------------------------
    def encode(self, payload: torch.Tensor) -> torch.Tensor:
        return self.encode_batch([payload])[0]

    @torch.no_grad()
    def encode_batch(self, payloads: list[torch.Tensor]) -> list[torch.Tensor]:
        """(3, H, W) images in [-1, 1] -> [boi, codes in raster order, eoi] each."""
        vq = self._require()
        size = vq.config.resolution
        for image in payloads:
            if not isinstance(image, torch.Tensor) or tuple(image.shape) != (3, size, size):
                shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise MotError(f"image segments must be (3, {size}, {size}) tensors for this tokenizer, got {shape}")
        # A document source shares one payload object between an image's documents (one per
        # direction): encode each distinct object once.
        index_of: dict[int, int] = {}
        distinct: list[torch.Tensor] = []
        for payload in payloads:
            if id(payload) not in index_of:
                index_of[id(payload)] = len(distinct)
                distinct.append(payload)
        cache = self._code_cache
        keys = [cache.key(image) for image in distinct]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        step = self.options.encode_batch_size
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            codes = vq.encode(torch.stack([distinct[i] for i in chunk]).float())  # (b, g, g)
            for i, row in zip(chunk, codes.flatten(1)):
                cache[keys[i]] = row
        if missing:
            cache.save()
        markers = torch.tensor([self.begin_of_image, self.end_of_image])
        encoded = [torch.cat([markers[:1], cache[key].long(), markers[1:]]) for key in keys]
        return [encoded[index_of[id(p)]] for p in payloads]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Local ids of one image span (markers optional) -> (3, H, W) image in [-1, 1]."""
        return self.decode_batch(ids[None])[0]

    @torch.no_grad()
    def decode_batch(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) local ids (markers optional) -> (B, 3, H, W), decoded in one pass."""
        vq = self._require()
        grid = vq.config.grid_size
        if ids.shape[1] == grid * grid + 2:
            ids = ids[:, 1:-1]
        if ids.shape[1] != grid * grid or bool((ids >= self.codebook_size).any()) or bool((ids < 0).any()):
            raise MotError(f"an image span needs {grid * grid} codes in [0, {self.codebook_size})")
        return vq.decode_codes(ids.view(-1, grid, grid))


    def export_hf(self, folder: Path) -> HFCodec:
        """The tokenizer's network (config and weights, a published checkpoint's included) and
        its code, for the exported processor."""
        from safetensors.torch import save_file

        vq = self._require()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vqgan.json").write_text(json.dumps({"config": vq.config.to_dict()}, indent=2))
        save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(folder / "vqgan.safetensors"))
        (folder / "vqgan.safetensors").chmod(0o644)  # safetensors writes 0600: the folder is meant to be shared
        here = Path(__file__).parent
        return HFCodec(code=(here / "hf_codec.py", here / "vqgan.py"), class_name="hf_codec.VQImageCodec")

    def read_payload(self, path: Path) -> torch.Tensor:
        return load_image_file(Path(path), self._require().config.resolution)

    def write_payloads(self, payloads: list[torch.Tensor], path: Path, captions: list[str] | None = None) -> Path:
        images = torch.stack(list(payloads))
        save_image_grid(images, Path(path), nrow=min(8, len(images)), captions=captions)
        return Path(path)


class CodeCache:
    """Codes of images already encoded by one tokenizer, on disk next to it: encoding every
    image with a conv net is the slowest part of preparing a run on a CPU, and runs that share
    a tokenizer (a dense baseline and its MoT twin) share the work. Keyed by image content;
    the file name carries a checksum of the tokenizer weights, so new weights start afresh."""

    def __init__(self, folder: Path, weights: Path):
        digest = hashlib.blake2b(weights.read_bytes(), digest_size=8).hexdigest() if weights.is_file() else "none"
        self.file = folder / f"codes-{digest}.pt"
        self.codes: dict[str, torch.Tensor] = {}
        if self.file.is_file():
            try:
                self.codes = torch.load(self.file, weights_only=True)
            except Exception:  # an unreadable cache is only lost work: rebuild it
                self.codes = {}

    @staticmethod
    def key(image: torch.Tensor) -> str:
        return hashlib.blake2b(image.float().contiguous().numpy().tobytes(), digest_size=16).hexdigest()

    def __contains__(self, key: str) -> bool:
        return key in self.codes

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.codes[key]

    def __setitem__(self, key: str, codes: torch.Tensor) -> None:
        self.codes[key] = codes.to(torch.int32)

    def save(self) -> None:
        if not self.file.parent.is_dir():
            return
        tmp = self.file.with_suffix(f".tmp{os.getpid()}")
        try:
            torch.save(self.codes, tmp)
            os.replace(tmp, self.file)
        except (OSError, RuntimeError):  # a read-only or full tokenizer folder: the cache only saves time
            tmp.unlink(missing_ok=True)
