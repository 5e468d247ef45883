"""Speech -> discrete units: MFCC features at the unit rate, then k-means.

This is what HuBERT's first iteration trains on (k-means over MFCCs), and it needs no download.
The paper used 500 semantic units at 25 Hz from an in-house DinoSR-style encoder; a published
self-supervised encoder plus its k-means can replace the features (``plugins.speech.hubert``).

Features, per frame (hop = sample_rate / frame_rate, so ``frame_rate`` frames per second):
    pre-emphasis -> Hann window (2 hops long) -> |STFT|^2 -> mel filterbank (HTK) -> log
    -> DCT-II (n_mfcc coefficients) -> + deltas and delta-deltas -> mean/variance normalised
    per utterance (removes most of the speaker and channel offset)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mot_core.errors import MotError

SILENCE_RMS = 1e-4  # below this a clip holds no speech worth tokenizing


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = 16000
    frame_rate: int = 25  # units per second
    n_mels: int = 40
    n_mfcc: int = 13
    f_min: float = 20.0
    f_max: float = 7600.0

    @property
    def hop(self) -> int:
        return self.sample_rate // self.frame_rate

    @property
    def window(self) -> int:
        return 2 * self.hop

    @property
    def dim(self) -> int:
        return 3 * self.n_mfcc


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(config: FeatureConfig, n_fft: int) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular HTK mel filters."""
    bins = np.linspace(0, config.sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(config.f_min), _hz_to_mel(config.f_max), config.n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0, None)).float()


def dct_matrix(n_mfcc: int, n_mels: int) -> torch.Tensor:
    """(n_mfcc, n_mels) orthonormal DCT-II."""
    k = np.arange(n_mfcc)[:, None]
    n = np.arange(n_mels)[None]
    basis = np.cos(math.pi / n_mels * (n + 0.5) * k) * math.sqrt(2.0 / n_mels)
    basis[0] /= math.sqrt(2.0)
    return torch.from_numpy(basis).float()


def _deltas(x: torch.Tensor) -> torch.Tensor:
    """(T, D) -> (T, D) regression deltas over +-2 frames (edges repeated)."""
    padded = torch.cat([x[:1], x[:1], x, x[-1:], x[-1:]])
    return (padded[3:-1] - padded[1:-3] + 2 * (padded[4:] - padded[:-4])) / 10.0


def features(samples: np.ndarray, config: FeatureConfig) -> torch.Tensor:
    """(L,) float mono samples at ``config.sample_rate`` -> (T, 3 * n_mfcc) float32 frames,
    T = ceil(L / hop): exactly ``frame_rate`` frames per second of audio."""
    x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    x = torch.cat([x[:1], x[1:] - 0.97 * x[:-1]])
    hop, window = config.hop, config.window
    frames = math.ceil(len(samples) / hop)
    # Frame t stands for samples [t*hop, (t+1)*hop): centre its window there. torch.stft centres
    # the window inside each n_fft-long frame, so pad n_fft/2 - hop/2 before and the rest after.
    n_fft = 1 << (window - 1).bit_length()
    before = n_fft // 2 - hop // 2
    x = torch.nn.functional.pad(x, (before, (frames - 1) * hop + n_fft - before - len(x)))
    spec = torch.stft(x, n_fft, hop_length=hop, win_length=window, window=torch.hann_window(window),
                      center=False, return_complex=True)[:, :frames]
    power = spec.abs().pow(2)  # (freq, T)
    mel = mel_filterbank(config, n_fft) @ power
    mfcc = dct_matrix(config.n_mfcc, config.n_mels) @ torch.log(mel + 1e-6)  # (n_mfcc, T)
    mfcc = mfcc.T
    full = torch.cat([mfcc, _deltas(mfcc), _deltas(_deltas(mfcc))], dim=1)
    return (full - full.mean(0)) / (full.std(0, unbiased=False) + 1e-5)


@dataclass
class UnitTokenizer:
    """k-means centroids over features: ``encode`` gives one unit per frame."""

    config: FeatureConfig
    centroids: torch.Tensor  # (K, D)
    report: dict

    @property
    def n_units(self) -> int:
        return self.centroids.shape[0]

    def units(self, samples: np.ndarray) -> torch.Tensor:
        """(L,) samples at the tokenizer's rate -> (T,) long units, T = frame_rate per second."""
        feats = features(samples, self.config)
        distances = torch.cdist(feats, self.centroids)
        return distances.argmin(dim=1)

    def save(self, folder: Path) -> None:
        """Atomically: centroids as safetensors, config and report as JSON."""
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".units.tmp{os.getpid()}"
        save_file({"centroids": self.centroids.contiguous()}, str(tmp))
        os.replace(tmp, folder / "units.safetensors")
        meta = folder / f".units.json.tmp{os.getpid()}"
        meta.write_text(json.dumps({"config": asdict(self.config), "n_units": self.n_units, "report": self.report}, indent=2))
        os.replace(meta, folder / "units.json")

    @staticmethod
    def load(folder: Path) -> "UnitTokenizer":
        meta_file, weights = folder / "units.json", folder / "units.safetensors"
        if not meta_file.is_file() or not weights.is_file():
            raise MotError(f"no speech unit tokenizer in {folder}; run `mot tokenizer fit` first")
        try:
            meta = json.loads(meta_file.read_text())
            centroids = load_file(str(weights))["centroids"]
            config = FeatureConfig(**meta["config"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MotError(f"the speech unit tokenizer in {folder} is unreadable ({exc}); refit it with --force") from None
        if centroids.shape != (meta["n_units"], config.dim):
            raise MotError(f"the speech unit tokenizer in {folder} has centroids {tuple(centroids.shape)}, "
                           f"expected ({meta['n_units']}, {config.dim}); refit it with --force")
        return UnitTokenizer(config, centroids, meta.get("report", {}))


def fit_units(train_features: list[torch.Tensor], n_units: int, seed: int, max_frames: int = 200_000) -> torch.Tensor:
    """k-means (scikit-learn, k-means++ init, mini-batches) on up to ``max_frames`` training
    frames drawn evenly: (K, D) centroids."""
    from sklearn.cluster import MiniBatchKMeans

    frames = torch.cat(train_features).numpy()
    if len(frames) < n_units:
        raise MotError(f"speech: {len(frames)} training frames cannot fit {n_units} units; add audio or lower n_units")
    if len(frames) > max_frames:
        frames = frames[np.random.default_rng(seed).choice(len(frames), max_frames, replace=False)]
    kmeans = MiniBatchKMeans(n_clusters=n_units, random_state=seed, batch_size=4096, n_init=3, max_iter=100)
    kmeans.fit(frames)
    return torch.from_numpy(kmeans.cluster_centers_.astype(np.float32))


def unit_statistics(units: list[torch.Tensor], n_units: int, seconds: float) -> dict[str, float]:
    """Perplexity of the unit distribution (n_units = every unit equally used), units used,
    units per second."""
    counts = torch.bincount(torch.cat(units), minlength=n_units).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {
        "unit_perplexity": float(entropy.exp()),
        "units_used": float((counts > 0).sum()),
        "units_per_second": float(counts.sum() / seconds),
    }


def deduplicate(units: torch.Tensor) -> torch.Tensor:
    """Collapse runs of a repeated unit into one (as speech LMs over HuBERT units often do)."""
    if units.numel() == 0:
        return units
    keep = torch.ones_like(units, dtype=torch.bool)
    keep[1:] = units[1:] != units[:-1]
    return units[keep]
