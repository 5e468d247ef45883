"""Units from a published self-supervised speech encoder: HuBERT features + a k-means model.

This is the standard recipe for speech units (GSLM, SpeechGPT, SpiritLM): a HuBERT layer's
features, assigned to the nearest of K centroids. Both come from local files the user has:
- ``hubert_dir``: a Hugging Face ``transformers`` HuBERT folder (``config.json`` and weights),
  loaded with ``local_files_only`` (nothing is downloaded);
- ``kmeans_path``: the centroids, as a ``.npy`` array (K, hidden) or a scikit-learn k-means
  model saved with joblib (how fairseq's HuBERT k-means models are distributed; a joblib file
  is a pickle: load only files you trust).

The unit rate is the encoder's frame rate (16 kHz / 320 = 50 Hz for every published HuBERT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mot_core.errors import MotError

HUBERT_SAMPLE_RATE = 16000


@dataclass(frozen=True)
class HubertFeatureConfig:
    """What ``Speech`` compares with its options: the rate audio is resampled to, and the unit rate."""

    sample_rate: int
    frame_rate: int


class HubertUnits:
    """``units(samples)``: (L,) samples at 16 kHz -> (T,) long units, like ``UnitTokenizer``."""

    def __init__(self, model, layer: int, centroids: torch.Tensor, report: dict):
        self.model = model.eval().requires_grad_(False)
        self.layer = layer
        self.centroids = centroids
        stride = math.prod(model.config.conv_stride)
        if HUBERT_SAMPLE_RATE % stride:
            raise MotError(f"HuBERT conv strides multiply to {stride}, which does not divide {HUBERT_SAMPLE_RATE} Hz")
        self.config = HubertFeatureConfig(HUBERT_SAMPLE_RATE, HUBERT_SAMPLE_RATE // stride)
        self.report = report

    @property
    def n_units(self) -> int:
        return self.centroids.shape[0]

    @staticmethod
    def load(hubert_dir: Path, kmeans_path: Path, layer: int) -> "HubertUnits":
        try:
            from transformers import HubertModel
        except ImportError:
            raise MotError("encoder 'hubert' needs the transformers package: pip install 'mot-framework[hubert]'") from None
        if not (hubert_dir / "config.json").is_file():
            raise MotError(f"no HuBERT model in {hubert_dir} (config.json missing)")
        try:
            model = HubertModel.from_pretrained(str(hubert_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MotError(f"cannot load the HuBERT model in {hubert_dir}: {str(exc).splitlines()[0]}") from None
        if not 1 <= layer <= model.config.num_hidden_layers:
            raise MotError(f"hubert_layer={layer} is outside 1..{model.config.num_hidden_layers} for {hubert_dir}")
        centroids = load_centroids(kmeans_path)
        if centroids.shape[1] != model.config.hidden_size:
            raise MotError(
                f"k-means centroids in {kmeans_path} have dimension {centroids.shape[1]}, but HuBERT's hidden size "
                f"is {model.config.hidden_size}"
            )
        return HubertUnits(model, layer, centroids, {"source": str(hubert_dir), "kmeans": str(kmeans_path)})

    @torch.no_grad()
    def units(self, samples: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        x = (x - x.mean()) / (x.std() + 1e-7)  # what HuBERT's feature extractor does
        hidden = self.model(x[None], output_hidden_states=True).hidden_states[self.layer][0]
        return torch.cdist(hidden.float(), self.centroids).argmin(dim=1)


def load_centroids(path: Path) -> torch.Tensor:
    """(K, D) float32 centroids from a ``.npy`` array or a joblib-saved scikit-learn k-means."""
    if not path.is_file():
        raise MotError(f"k-means file not found: {path}")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise MotError(f"{path} is not a .npy array of centroids ({exc})") from None
    else:
        import joblib

        try:
            model = joblib.load(path)
        except Exception as exc:  # a damaged or foreign pickle: say so in one line
            raise MotError(f"cannot read the k-means model {path}: {type(exc).__name__}: {exc}") from None
        if not hasattr(model, "cluster_centers_"):
            raise MotError(f"{path} holds a {type(model).__name__}, not a fitted scikit-learn k-means")
        array = model.cluster_centers_
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] < 2:
        raise MotError(f"k-means centroids in {path} must be (K >= 2, D), got {array.shape}")
    return torch.from_numpy(array)
