"""Audio payloads: mono float samples with their rate, read from any file libsndfile reads
(WAV, FLAC, OGG, ...), brought to the tokenizer's rate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mot_core.errors import MotError
from plugins.common.audio import Audio  # the payload (re-exported here, where the speech plugin made it first)

__all__ = ["Audio", "load_audio_file", "save_wav", "to_rate"]

MIN_SAMPLE_RATE = 8000  # below this, speech loses the band the features use


def load_audio_file(path: Path) -> Audio:
    """Any audio file -> mono ``Audio`` at the file's own rate. Several channels are averaged
    into one; a file libsndfile cannot read is a one-line ``MotError``."""
    import soundfile

    if not path.is_file():
        raise MotError(f"audio file not found: {path}")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise MotError(f"{path} is not a readable audio file ({str(exc).splitlines()[0]})") from None
    return Audio(samples.mean(axis=1).astype(np.float32), int(rate), str(path))


def save_wav(audio: Audio, path: Path) -> None:
    """16-bit PCM WAV, written atomically."""
    import soundfile

    tmp = path.with_name(path.name + ".tmp")
    soundfile.write(str(tmp), audio.samples, audio.sample_rate, subtype="PCM_16", format="WAV")
    tmp.replace(path)


def to_rate(audio: Audio, rate: int) -> np.ndarray:
    """Samples at ``rate`` (polyphase resampling, scipy), checked: a rate below 8 kHz is
    refused (the features need the speech band), and so is an empty or non-finite clip."""
    if not isinstance(audio, Audio):
        raise MotError(f"speech segments must be plugins.speech.audio.Audio payloads, got {type(audio).__name__}")
    samples = np.asarray(audio.samples, dtype=np.float32)
    if samples.ndim != 1:
        raise MotError(f"{audio.source}: speech must be mono (L,) samples, got shape {samples.shape}")
    if samples.size == 0:
        raise MotError(f"{audio.source}: the clip is empty")
    if not np.isfinite(samples).all():
        raise MotError(f"{audio.source}: the clip holds NaN or inf samples")
    if audio.sample_rate < MIN_SAMPLE_RATE:
        raise MotError(f"{audio.source}: sample rate {audio.sample_rate} Hz is below the {MIN_SAMPLE_RATE} Hz speech needs")
    if audio.sample_rate == rate:
        return samples
    from scipy.signal import resample_poly

    common = math.gcd(int(audio.sample_rate), int(rate))
    return resample_poly(samples, rate // common, audio.sample_rate // common).astype(np.float32)
