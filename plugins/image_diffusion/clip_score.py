"""CLIP-style image-text scores through a swappable model.

Transfusion / MoT report the CLIP score of images generated from captions: the cosine similarity of
CLIP's image and text embeddings, x 100, averaged over the evaluation set. Published CLIP weights
cannot be downloaded here, so there are two scorers behind one interface:

* ``PublishedClipScorer`` (``clip_score``): a published CLIP stored as a local folder in Hugging Face
  transformers format (``save_pretrained`` layout). transformers is an optional dependency, imported
  only when this scorer is built. Comparable with published numbers up to the resize/crop details
  noted in ``PublishedClipScorer``.
* ``LocalClipScorer`` (``clip_local``): a small CLIP-style dual encoder trained here on our own
  captioned images (``fit_contrastive_scorer``, run by ``mot tokenizer fit``). Its numbers are useful
  to compare runs of this framework on the same data and are NOT comparable with published CLIP
  scores: the model, its training data and its embedding geometry are all different.

Both report the plain mean of 100 * cosine. torchmetrics' ``CLIPScore`` clamps each pair at 0 first;
for a published CLIP the cosines of real pairs are positive, so the two agree in practice.
"""

from __future__ import annotations

import abc
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mot_core.errors import MotError
from mot_core.plugin_api import progress as progress_display

CLIP_FILE, CLIP_META = "clip_local.safetensors", "clip_local.json"
# CLIP's preprocessing constants (OpenAI), used when the folder has no image processor config.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_WORD = re.compile(r"[a-z0-9]+")


def caption_tokens(caption: str) -> list[str]:
    """Lowercase words of a caption; everything that is not a letter or digit separates words."""
    return _WORD.findall(caption.lower())


def build_vocabulary(captions: list[str]) -> list[str]:
    """Sorted distinct words of the captions (sorted so the same captions always give the same ids)."""
    return sorted({w for c in captions for w in caption_tokens(c)})


def caption_word_ids(captions: list[str], index: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """B captions -> (ids (T,) long, offsets (B,) long) in ``nn.EmbeddingBag``'s flat layout.

    Words missing from ``index`` are dropped; a caption left without words is an empty bag (its
    embedding is the zero vector before the MLP)."""
    ids, offsets = [], []
    for caption in captions:
        offsets.append(len(ids))
        ids.extend(index[w] for w in caption_tokens(caption) if w in index)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


class ContrastiveImageText(nn.Module):
    """Small CLIP-style dual encoder: image CNN (3,H,W in [-1,1]) -> d-dim unit vector; caption -> bag of lowercase word ids
    (vocabulary of the training captions' words, unknown words dropped) -> mean of word embeddings -> MLP -> unit vector;
    learnable temperature as in CLIP (logit_scale init log(1/0.07), clamped at 100)."""

    def __init__(self, vocabulary: list[str], dim: int = 64, width: int = 16):
        super().__init__()
        if not vocabulary:
            raise MotError("the local CLIP scorer needs a non-empty caption vocabulary")
        self.vocabulary = list(vocabulary)
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.dim, self.width = dim, width
        # (H, W) of the training images, () if unknown: LocalClipScorer resizes other sizes to it.
        self.image_size: tuple[int, ...] = ()
        layers, channels = [], 3
        # Three strided conv stages (16/32/64 channels at the default width, 32 -> 16 -> 8 -> 4 pixels):
        # enough for small captioned images, and ~4x cheaper than full-resolution convs + pooling, so
        # a few hundred steps train in seconds on two CPU cores.
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(min(8, out // 2), out), nn.SiLU()]
            channels = out
        self.image_encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, dim))
        self.word_embedding = nn.EmbeddingBag(len(self.vocabulary), dim, mode="mean")
        self.text_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, dim) unit vectors."""
        return F.normalize(self.image_encoder(images.float()), dim=-1)

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """N captions -> (N, dim) unit vectors."""
        device = self.logit_scale.device
        ids, offsets = caption_word_ids(captions, self.index)
        bags = self.word_embedding(ids.to(device), offsets.to(device))
        return F.normalize(self.text_mlp(bags), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at 100 as in CLIP (stops the logits from growing without bound)."""
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(N, 3, H, W) images and N captions -> (N,) cosine similarity of each pair."""
        return (self.encode_images(images) * self.encode_captions(captions)).sum(-1)


def _caption_keys(captions: list[str], index: dict[str, int]) -> list[tuple[int, ...]]:
    """A key per caption equal for captions the bag-of-words encoder cannot tell apart (same word multiset)."""
    return [tuple(sorted(index[w] for w in caption_tokens(c) if w in index)) for c in captions]


def _group_ids(keys: list[tuple[int, ...]]) -> torch.Tensor:
    """(N,) long: one id per distinct key, in order of first appearance."""
    ids: dict[tuple[int, ...], int] = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, groups: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) with soft targets. image_emb, text_emb: (B, d) unit; groups: (B,) caption ids.

    Plain CLIP uses one-hot targets (pair i is the only positive of row i). Here many images share a
    caption (every MNIST "3" may be captioned "the digit three"), and the bag-of-words encoder maps equal
    captions to the same vector: one-hot targets would ask it to rank a vector above itself, a loss
    with a floor of log(k) and gradients that fight each other. Instead every same-caption pair is a
    positive: targets = same-caption matrix with rows normalised to sum to 1.

    Returned as KL(targets || softmax) rather than the cross-entropy: same gradients, but 0 is a
    perfect fit whatever the number of duplicates (the cross-entropy's floor is the targets' entropy)."""
    logits = scale * image_emb @ text_emb.T  # (B, B)
    same = (groups[:, None] == groups[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    # `same` is symmetric, so the same targets serve the text -> image direction on logits.T.
    image_to_text = F.kl_div(F.log_softmax(logits, dim=1), targets, reduction="batchmean")
    text_to_image = F.kl_div(F.log_softmax(logits.T, dim=1), targets, reduction="batchmean")
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def retrieval_top1(model: ContrastiveImageText, images: torch.Tensor, captions: list[str], chunk: int = 512) -> float:
    """Top-1 accuracy of retrieving each image's caption among the distinct captions.

    images: (N, 3, H, W) in [-1, 1]; captions: N strings. Captions with the same word multiset are one
    caption to the bag-of-words encoder, so they count as one candidate."""
    keys = _caption_keys(captions, model.index)
    groups = _group_ids(keys)
    distinct: dict[tuple[int, ...], str] = {}
    for key, caption in zip(keys, captions):
        distinct.setdefault(key, caption)
    text = model.encode_captions(list(distinct.values()))  # (K, d), row k = group k
    correct = 0
    for start in range(0, len(images), chunk):
        image_emb = model.encode_images(images[start:start + chunk].to(text.device))
        predicted = (image_emb @ text.T).argmax(dim=1).cpu()
        correct += int((predicted == groups[start:start + chunk]).sum())
    return correct / max(len(images), 1)


def save_contrastive_scorer(model: ContrastiveImageText, out_dir: Path, extra: dict | None = None) -> None:
    """Write ``clip_local.safetensors`` (weights) + ``clip_local.json`` (vocabulary, dims, image size, ``extra``).

    Each file goes to a temporary sibling first, then os.replace: a crash never leaves a half-written file."""
    meta = {"metric": "clip_local", "vocabulary": model.vocabulary, "dim": model.dim, "width": model.width,
            "image_size": list(model.image_size), **(extra or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{CLIP_FILE}.tmp{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out_dir / CLIP_FILE)
    tmp_meta = out_dir / f".{CLIP_META}.tmp{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, out_dir / CLIP_META)


def fit_contrastive_scorer(images: torch.Tensor, captions: list[str], out_dir: Path, *, steps: int, batch_size: int = 128,
                           lr: float = 2e-3, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Train with the symmetric InfoNCE loss (CLIP), save `out_dir/clip_local.safetensors` + `out_dir/clip_local.json`
    (vocabulary, dims, report) atomically; images with empty captions are skipped; duplicate captions within a batch
    are fine (same-caption pairs are positives, see ``contrastive_loss``). Returns {"clip_local_train_loss",
    "clip_local_top1"} (top-1 retrieval accuracy of caption given image over distinct captions on the training images).

    images: (N, 3, H, W) in [-1, 1]; captions: N strings. The train loss is the mean over the last
    (up to) 20 steps, less noisy than the final batch alone."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise MotError(f"the local CLIP scorer expects (N, 3, H, W) images, got shape {tuple(images.shape)}")
    if len(images) != len(captions):
        raise MotError(f"the local CLIP scorer got {len(images)} images but {len(captions)} captions")
    if steps < 1:
        raise MotError(f"the local CLIP scorer needs steps >= 1, got {steps}")
    # A caption without any letter or digit carries no words for the text encoder: skip it like an empty one.
    keep = [i for i, c in enumerate(captions) if caption_tokens(c)]
    if not keep:
        raise MotError("the local CLIP scorer needs captioned images (every caption is empty)")
    images = images[keep].float().cpu()
    captions = [captions[i] for i in keep]
    torch.manual_seed(seed)
    model = ContrastiveImageText(build_vocabulary(captions))
    groups = _group_ids(_caption_keys(captions, model.index))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    batch = min(batch_size, len(images))
    recent: list[float] = []
    model.train()
    bar = progress_display(total=steps, desc="CLIP scorer", unit="step", disable=not progress)
    for _ in range(steps):
        # Without replacement inside a batch: the same image twice would be a trivial positive.
        rows = torch.randperm(len(images), generator=generator)[:batch]
        loss = contrastive_loss(model.encode_images(images[rows]), model.encode_captions([captions[i] for i in rows]),
                                groups[rows], model.scale())
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            # Clamp the parameter itself, as CLIP does, not only its use in scale(): else it could drift
            # far above the cap and need many steps to come back down.
            model.logit_scale.clamp_(max=math.log(100.0))
        recent = (recent + [float(loss.detach())])[-20:]
        bar.update(1)
    bar.close()
    model.eval()
    model.image_size = tuple(images.shape[-2:])
    report = {"clip_local_train_loss": sum(recent) / len(recent), "clip_local_top1": retrieval_top1(model, images, captions)}
    save_contrastive_scorer(model, out_dir, {"steps": steps, "batch_size": batch, "lr": lr, "seed": seed,
                                             "train_images": len(images), "distinct_captions": int(groups.max()) + 1,
                                             "report": report})
    return report


def load_contrastive_scorer(out_dir: Path) -> ContrastiveImageText:
    """The model saved by ``fit_contrastive_scorer``, in eval mode; its training image size is in ``.image_size``."""
    meta_file, weights = out_dir / CLIP_META, out_dir / CLIP_FILE
    if not meta_file.is_file() or not weights.is_file():
        raise MotError(f"no local CLIP scorer in {out_dir}; run `mot tokenizer fit` first")
    try:
        meta = json.loads(meta_file.read_text())
        model = ContrastiveImageText(meta["vocabulary"], dim=int(meta["dim"]), width=int(meta["width"]))
        model.load_state_dict(load_file(str(weights)))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MotError(f"cannot load the local CLIP scorer in {out_dir} ({first}); rerun `mot tokenizer fit`") from None
    model.image_size = tuple(meta.get("image_size") or ())
    return model.eval()


def _check_pairs(images: torch.Tensor, captions: list[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise MotError(f"CLIP scoring expects (N, 3, H, W) images, got shape {tuple(images.shape)}")
    if len(images) != len(captions):
        raise MotError(f"CLIP scoring got {len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise MotError("CLIP scoring got no images")


class ImageTextScorer(abc.ABC):
    """Scores how well images match captions. Subclasses set ``metric_name`` and implement ``similarities``."""

    metric_name: str = ""

    @abc.abstractmethod
    def similarities(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] and N captions -> (N,) cosine similarities on the CPU."""

    def score(self, images: torch.Tensor, captions: list[str]) -> float:
        """Mean of 100 * cosine over the N (image, caption) pairs. images: (N, 3, H, W) in [-1, 1]."""
        _check_pairs(images, captions)
        return float(self.similarities(images, captions).mean() * 100)


class LocalClipScorer(ImageTextScorer):
    """``clip_local``: the contrastive model trained here. NOT comparable with published CLIP scores."""

    metric_name = "clip_local"

    def __init__(self, model: ContrastiveImageText, chunk: int = 512):
        self.model, self.chunk = model.eval(), chunk

    @torch.no_grad()
    def similarities(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        _check_pairs(images, captions)
        device = self.model.logit_scale.device
        size = self.model.image_size
        out = []
        for start in range(0, len(images), self.chunk):
            batch = images[start:start + self.chunk].to(device).float().clamp(-1, 1)
            # The CNN pools globally, but its filters saw one resolution: bring other sizes to it.
            if size and tuple(batch.shape[-2:]) != size:
                batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
            out.append(self.model(batch, captions[start:start + self.chunk]).cpu())
        return torch.cat(out)


class PublishedClipScorer(ImageTextScorer):
    """``clip_score``: a published CLIP from a local Hugging Face folder (``CLIPModel`` + its tokenizer).

    Images are preprocessed by hand the way ``CLIPImageProcessor`` does it: quantised to 8 bits (as the
    PNGs published evaluations read), shortest side resized to the model's input size (bicubic,
    antialiased), centre-cropped, normalised with the folder's mean/std (CLIP's by default). torch's
    bicubic resize differs slightly from PIL's, so scores can differ from the processor's in the
    second decimal."""

    metric_name = "clip_score"

    def __init__(self, path: str | Path, *, tokenizer=None, device: str | torch.device = "cpu", chunk: int = 64):
        folder = Path(path)
        if not folder.is_dir():
            raise MotError(f"published CLIP folder not found: {folder}")
        try:
            import transformers
        except ImportError:
            raise MotError("the published CLIP score needs transformers installed (pip install transformers)") from None
        try:
            self.model = transformers.CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
            self.tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises many types (OSError, ValueError, EnvironmentError, ...)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MotError(f"cannot load a CLIP model from {folder}: {first}") from None
        self.device, self.chunk = torch.device(device), chunk
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        if (folder / "preprocessor_config.json").is_file():
            processor = json.loads((folder / "preprocessor_config.json").read_text())
            self.mean = tuple(processor.get("image_mean", CLIP_MEAN))
            self.std = tuple(processor.get("image_std", CLIP_STD))

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 3, S, S) normalised CLIP input, S = the model's image size."""
        unit = ((images.float().clamp(-1, 1) + 1) / 2 * 255).round() / 255
        h, w = unit.shape[-2:]
        ratio = self.image_size / min(h, w)
        size = (max(self.image_size, round(h * ratio)), max(self.image_size, round(w * ratio)))
        if size != (h, w):
            unit = F.interpolate(unit, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        unit = unit[..., top:top + self.image_size, left:left + self.image_size]
        mean = torch.tensor(self.mean, device=unit.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=unit.device).view(1, 3, 1, 1)
        return (unit - mean) / std

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers < 5 returns the projected features; 5.x wraps them in pooler_output.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def similarities(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        _check_pairs(images, captions)
        out = []
        for start in range(0, len(images), self.chunk):
            pixels = self.pixel_values(images[start:start + self.chunk].to(self.device))
            text = self.tokenizer(captions[start:start + self.chunk], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt")
            image_emb = self._features(self.model.get_image_features(pixel_values=pixels))
            text_emb = self._features(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                                   attention_mask=text["attention_mask"].to(self.device)))
            out.append(F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).cpu())
        return torch.cat(out)


def image_text_scorer(published_path: str | None, local_dir: Path) -> ImageTextScorer:
    """The published CLIP when ``published_path`` is given, else the local model saved in ``local_dir``."""
    if published_path:
        return PublishedClipScorer(published_path)
    return LocalClipScorer(load_contrastive_scorer(local_dir))
