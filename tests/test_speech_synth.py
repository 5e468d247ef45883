"""espeak-ng synthesis through the library bundled in espeakng-loader (plugins/speech/synth.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from mot_core.errors import MotError
from plugins.speech.synth import Voice, available_voices, synthesize

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "The quick brown fox jumps today."  # six words
VOICES = [Voice("en-us"), Voice("en-gb", "f3"), Voice("en-us", "m3", 220)]


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    out = {}
    for voice in VOICES:
        audio, rate = synthesize(SENTENCE, voice)
        assert rate == 22050
        out[voice.label] = audio
    return out


def test_voice_label():
    assert Voice().label == "en-us@160"
    assert Voice("en-us", "f3").label == "en-us+f3@160"
    assert Voice("en-gb", "m3", 220).label == "en-gb+m3@220"


@pytest.mark.parametrize("voice", VOICES, ids=lambda v: v.label)
def test_audio_is_plausible_speech(clips, voice):
    audio = clips[voice.label]
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.abs(audio).max() <= 1.0
    assert float(np.sqrt(np.mean(audio**2))) > 0.01  # not silent
    assert 0.5 < audio.size / 22050 < 10.0


def test_faster_speed_gives_a_shorter_clip(clips):
    slow, _ = synthesize(SENTENCE, Voice("en-us", "m3", 160))
    fast = clips[Voice("en-us", "m3", 220).label]
    assert fast.size < 0.85 * slow.size


def test_deterministic_whatever_came_before(clips):
    # The same call again, after other voices have been used, gives the identical array.
    for voice in reversed(VOICES):
        again, _ = synthesize(SENTENCE, voice)
        np.testing.assert_array_equal(again, clips[voice.label])
    again, _ = synthesize(SENTENCE, VOICES[1])
    np.testing.assert_array_equal(again, clips[VOICES[1].label])


def test_deterministic_across_processes(clips):
    code = (
        "import sys, numpy as np; from plugins.speech.synth import Voice, synthesize; "
        f"a, _ = synthesize({SENTENCE!r}, Voice('en-gb', 'f3')); sys.stdout.buffer.write(a.tobytes())"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, check=True, timeout=60)
    np.testing.assert_array_equal(np.frombuffer(done.stdout, dtype=np.float32), clips["en-gb+f3@160"])


def test_thread_safe(clips):
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(synthesize(SENTENCE, VOICES[0])[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for audio in results:
        np.testing.assert_array_equal(audio, clips[VOICES[0].label])


def test_different_voices_give_different_audio(clips):
    a, b, c = (clips[v.label] for v in VOICES)
    for x, y in [(a, b), (a, c), (b, c)]:
        assert x.size != y.size or not np.array_equal(x, y)
    # Same length cut: the waveforms themselves differ, not just their lengths.
    n = min(a.size, b.size)
    assert not np.allclose(a[:n], b[:n], atol=1e-3)


def test_unknown_voice_raises():
    with pytest.raises(MotError, match="unknown espeak-ng voice 'xx-nope'"):
        synthesize(SENTENCE, Voice("xx-nope"))
    with pytest.raises(MotError, match="variant 'nosuch'"):
        synthesize(SENTENCE, Voice("en-us", "nosuch"))


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text_raises(text):
    with pytest.raises(MotError, match="empty"):
        synthesize(text)


def test_invalid_speed_raises():
    with pytest.raises(MotError, match="speed"):
        synthesize(SENTENCE, Voice("en-us", None, 0))


def test_available_voices():
    voices = available_voices()
    assert {"en-us", "en-gb", "fr"} <= set(voices)
