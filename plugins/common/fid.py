"""FID-style scores with torchmetrics through a swappable feature network.

Published FID uses Inception-v3 features; its weights are not available offline here, so the
default feature network is a small CNN trained on *our* images to predict the words of their
captions (a multi-label classifier). Its Frechet distance is reported as ``fid_local``: useful to
compare runs of this framework on the same data, NOT comparable with published FID numbers.
With Inception weights on disk (``inception_weights``) the real FID is computed instead.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mot_core.errors import MotError
from mot_core.plugin_api import progress as progress_display

FEATURE_FILE, FEATURE_META = "feature_net.safetensors", "feature_net.json"


class CaptionFeatureNet(nn.Module):
    """(N, 3, H, W) images in [0, 1] -> (N, feature_dim) features (torchmetrics' contract).

    Trained with a caption-word head on top; FID reads the pooled features before the head."""

    def __init__(self, n_words: int, feature_dim: int = 128, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU(), nn.AvgPool2d(2)]
            channels = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, feature_dim))
        self.head = nn.Linear(feature_dim, n_words)
        self.num_features = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() * 2 - 1)


def caption_words(captions: list[str], max_words: int = 256) -> list[str]:
    counts = Counter(w for c in captions for w in set(re.findall(r"[a-z]+", c.lower())))
    return [w for w, n in counts.most_common(max_words) if n >= 2]


def fit_feature_net(images: torch.Tensor, captions: list[str], out_dir: Path, steps: int, seed: int,
                    batch_size: int = 64, progress: bool = True) -> dict[str, float]:
    """images: (N, 3, H, W) in [-1, 1]. Trains the caption-word classifier and saves it,
    showing its progress (a few minutes on a CPU)."""
    words = caption_words(captions)
    if not words:
        raise MotError("the FID feature network needs captioned images (no caption words found)")
    index = {w: i for i, w in enumerate(words)}
    targets = torch.zeros(len(captions), len(words))
    for row, caption in enumerate(captions):
        for word in set(re.findall(r"[a-z]+", caption.lower())):
            if word in index:
                targets[row, index[word]] = 1
    torch.manual_seed(seed)
    net = CaptionFeatureNet(len(words))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    pixels = (images + 1) / 2
    generator = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    bar = progress_display(total=steps, desc="FID feature network", unit="step", disable=not progress)
    for step in range(steps):
        batch = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        logits = net.head(net(pixels[batch]))
        loss = F.binary_cross_entropy_with_logits(logits, targets[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(1)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(bce=f"{float(loss.detach()):.4f}")
    bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(out_dir / FEATURE_FILE))
    final = float(loss.detach())
    (out_dir / FEATURE_META).write_text(json.dumps({"words": words, "final_bce": final}))
    return {"feature_net_bce": final, "feature_net_words": float(len(words))}


def load_feature_net(tokenizer_dir: Path) -> CaptionFeatureNet:
    meta, weights = tokenizer_dir / FEATURE_META, tokenizer_dir / FEATURE_FILE
    if not meta.is_file() or not weights.is_file():
        raise MotError(f"no FID feature network in {tokenizer_dir}; run `mot tokenizer fit` (fit.feature_net_steps > 0)")
    net = CaptionFeatureNet(len(json.loads(meta.read_text())["words"]))
    net.load_state_dict(load_file(str(weights)))
    return net.eval()


def inception_feature_net(weights: Path) -> nn.Module:
    """torchmetrics' Inception-v3 (torch-fidelity port) from a local weights file."""
    if not weights.is_file():
        raise MotError(f"Inception weights not found: {weights}")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as exc:
        raise MotError(f"Inception FID needs torch-fidelity installed ({exc})") from None
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights))


@torch.no_grad()
def frechet_distance(real: torch.Tensor, fake: torch.Tensor, net: nn.Module) -> float:
    """real, fake: (N, 3, H, W) in [-1, 1]. Frechet distance between feature Gaussians.

    The local network takes float images in [0, 1]; torch-fidelity's Inception takes uint8
    (and resizes to 299 itself)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    local = isinstance(net, CaptionFeatureNet)
    metric = FrechetInceptionDistance(feature=net, normalize=local)
    for images, is_real in ((real, True), (fake, False)):
        unit = (images.clamp(-1, 1) + 1) / 2
        metric.update(unit.float() if local else (unit * 255).round().to(torch.uint8), real=is_real)
    return float(metric.compute())
