"""The speech payload shared by the built-in plugins that read or make audio: the speech
modality (``plugins.speech``, which re-exports it) and the sources that read clips."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Audio:
    """A speech clip: (L,) float32 mono samples in [-1, 1] at ``sample_rate`` Hz. ``source``
    names where it came from, for error messages."""

    samples: np.ndarray
    sample_rate: int
    source: str = "audio"

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def decode_audio_bytes(data: bytes, source: str) -> Audio:
    """An encoded clip (FLAC, WAV, OGG: what libsndfile reads) -> mono ``Audio`` at its own
    rate (channels averaged). Raises ``ValueError`` saying why it cannot be read."""
    import io

    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError, TypeError) as exc:
        raise ValueError(" ".join(str(exc).split()) or type(exc).__name__) from None
    if not len(samples):
        raise ValueError("no samples")
    return Audio(samples.mean(axis=1).astype(np.float32), int(rate), source)
