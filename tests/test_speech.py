"""The speech plugin: features at the unit rate, k-means units, audio input checks, the spoken
sentences data source (synthesised and a user's own folder), and a tiny text + speech run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml

from mot_core.cli import main
from mot_core.errors import MotError
from mot_core.plugin_api import RawDocument, RawSegment
from plugins.speech.audio import Audio, load_audio_file, to_rate
from plugins.speech.data import SpokenSentences, SpokenSentencesOptions, SynthesisOptions, VoiceSpec
from plugins.speech.modality import Speech, SpeechOptions
from plugins.speech.units import FeatureConfig, UnitTokenizer, features, fit_units

SENTENCES = [
    "handwritten digit seven", "a red heart next to a grinning face", "the quick brown fox jumps",
    "speech units are learned by k means", "mixture of transformers unties every weight",
    "handwritten digit three", "sun with face", "global attention runs over the whole sequence",
]


@pytest.fixture(scope="module")
def clips() -> list[Audio]:
    """Real synthesised speech: every sentence in two voices, at espeak's own 22.05 kHz."""
    from plugins.speech.synth import Voice, synthesize

    out = []
    for index, text in enumerate(SENTENCES):
        for voice in (Voice("en-us", None, 160), Voice("en-us", None, 210)):
            samples, rate = synthesize(text, voice)
            out.append(Audio(samples, rate, f"{text} ({index})"))
    return out


@pytest.fixture(scope="module")
def speech(clips, tmp_path_factory) -> Speech:
    folder = tmp_path_factory.mktemp("units")
    modality = Speech(SpeechOptions(tokenizer_dir=str(folder), n_units=32), folder / "state")
    docs = [RawDocument((RawSegment("speech", clip),)) for clip in clips]
    report = modality.fit(docs[:-4], docs[-4:], progress=False)
    assert report["units_used"] > 16 and report["unit_perplexity"] > 8, report
    modality.prepare([])
    return modality


def test_features_give_exactly_frame_rate_frames_per_second(clips):
    config = FeatureConfig()
    for clip in clips[:4]:
        samples = to_rate(clip, config.sample_rate)
        frames = features(samples, config)
        assert frames.shape == (math.ceil(len(samples) / config.hop), 39)
        assert abs(frames.shape[0] / clip.seconds - config.frame_rate) < 1.0
        assert torch.isfinite(frames).all()


def test_units_per_second_determinism_and_markers(speech, clips):
    clip = clips[1]
    ids = speech.encode(clip)
    assert ids[0] == speech.begin_of_speech and ids[-1] == speech.end_of_speech
    units = ids[1:-1]
    assert units.min() >= 0 and units.max() < 32
    assert abs(len(units) / clip.seconds - 25) < 1.0  # 25 units per second
    assert torch.equal(speech.encode(clip), ids)  # the same audio always gives the same units
    # Resampled input (44.1 kHz) gives the same number of frames for the same duration.
    from scipy.signal import resample_poly

    faster = Audio(resample_poly(clip.samples, 2, 1).astype(np.float32), clip.sample_rate * 2, "44k")
    assert abs(len(speech.encode(faster)) - len(ids)) <= 1


def test_deduplication_shortens_and_has_no_repeats(speech, clips):
    dedup = Speech(speech.options.model_copy(update={"deduplicate": True}), speech.state_dir)
    dedup.prepare([])
    units = dedup.encode(clips[0])[1:-1]
    assert len(units) < len(speech.encode(clips[0])) - 2
    assert bool((units[1:] != units[:-1]).all())


def test_tokenizer_round_trips_and_refuses_a_mismatched_config(speech, tmp_path):
    loaded = UnitTokenizer.load(Path(speech.options.tokenizer_dir))
    assert torch.equal(loaded.centroids, speech.tokenizer.centroids)
    other = Speech(speech.options.model_copy(update={"n_units": 64}), tmp_path)
    with pytest.raises(MotError, match="has 32 units .* config asks for 64"):
        other.prepare([])
    with pytest.raises(MotError, match="no speech unit tokenizer"):
        Speech(SpeechOptions(tokenizer_dir=str(tmp_path / "none")), tmp_path).prepare([])


@pytest.mark.parametrize("make, message", [
    (lambda: Audio(np.zeros(16000, np.float32), 16000, "quiet.wav"), "quiet.wav: the clip is silent"),
    (lambda: Audio(np.zeros(0, np.float32), 16000, "empty.wav"), "empty.wav: the clip is empty"),
    (lambda: Audio(np.full(8000, np.nan, np.float32), 16000, "nan.wav"), "NaN or inf"),
    (lambda: Audio(np.random.default_rng(0).normal(0, 0.1, 4000).astype(np.float32), 4000, "low.wav"),
     "sample rate 4000 Hz is below the 8000 Hz"),
    (lambda: Audio(np.random.default_rng(0).normal(0, 0.1, 16000 * 21).astype(np.float32), 16000, "long.wav"),
     r"clip of 21.0 s is longer than max_seconds=20.0"),
    (lambda: np.zeros(100), "must be plugins.speech.audio.Audio payloads"),
])
def test_bad_audio_is_a_one_line_error(speech, make, message):
    with pytest.raises(MotError, match=message):
        speech.encode(make())


def test_audio_files_any_format_channels_and_rate(tmp_path, clips):
    clip = clips[0]
    stereo = np.stack([clip.samples, clip.samples * 0.5], axis=1)
    soundfile.write(tmp_path / "stereo.flac", stereo, clip.sample_rate)
    loaded = load_audio_file(tmp_path / "stereo.flac")
    assert loaded.sample_rate == clip.sample_rate and loaded.samples.ndim == 1
    np.testing.assert_allclose(loaded.samples, clip.samples * 0.75, atol=2e-4)  # averaged channels
    (tmp_path / "notes.txt").write_text("not audio")
    with pytest.raises(MotError, match="notes.txt is not a readable audio file"):
        load_audio_file(tmp_path / "notes.txt")
    with pytest.raises(MotError, match="audio file not found"):
        load_audio_file(tmp_path / "missing.wav")


def test_a_folder_of_own_recordings_splits_by_hash(tmp_path, clips):
    lines = []
    for index, clip in enumerate(clips):
        name = f"rec{index:02d}.flac"
        soundfile.write(tmp_path / name, clip.samples, clip.sample_rate)
        lines.append(json.dumps({"file": name, "text": SENTENCES[index // 2]}))
    (tmp_path / "transcripts.jsonl").write_text("\n".join(lines) + "\n")
    options = SpokenSentencesOptions(root=str(tmp_path), synthesis=None, val_fraction=0.2)
    source = SpokenSentences(options)
    assert source.prepare() == {}
    train, val = list(source.documents("train")), list(source.documents("val"))
    assert len(train) + len(val) == 2 * len(clips) and val
    first = train[0]
    assert [s.modality for s in first.segments] == ["text", "speech"]
    assert [s.modality for s in train[1].segments] == ["speech", "text"]
    (tmp_path / "transcripts.jsonl").write_text('{"file": "rec00.flac"}\n')
    with pytest.raises(MotError, match="line 1 is not a JSON object with 'file' and 'text'"):
        list(SpokenSentences(options).documents("train"))


def test_text_and_speech_train_and_evaluate_end_to_end(tmp_path, capsys):
    """`mot data prepare` synthesises a tiny corpus, `mot tokenizer fit` fits the units,
    `mot train` trains text + speech, `mot eval` reports the unit statistics."""
    synthesis = SynthesisOptions(wikipedia_sentences=0, caption_sentences=40,
                                 voices=[VoiceSpec(name="en-us", speed=170), VoiceSpec(name="en-us", speed=210)],
                                 val_fraction=0.2)
    config = {
        "run": {"dir": str(tmp_path / "run"), "device": "cpu"},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 128, "norm_placement": "post"},
        "train": {"steps": 4, "batch_size": 2, "seq_len": 128, "warmup_steps": 1, "eval_batches": 2, "progress": False},
        "mixture": {
            "modalities": {"text": {"options": {"vocab_size": 300}},
                           "speech": {"options": {"tokenizer_dir": str(tmp_path / "units"), "n_units": 24}}},
            "datasets": {"spoken_sentences": {"options": {"root": str(tmp_path / "spoken"),
                                                          "synthesis": synthesis.model_dump()}}},
        },
    }
    path = tmp_path / "speech.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["data", "prepare", str(path)]) == 0
    out = capsys.readouterr().out
    assert '"clips": 40' in out
    assert main(["tokenizer", "fit", str(path)]) == 0
    report = capsys.readouterr().out
    assert "units_per_second" in report
    assert main(["train", str(path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert math.isfinite(final["loss/speech"]) and math.isfinite(final["val/speech/loss"])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["val/speech/loss"] == pytest.approx(final["val/speech/loss"], rel=1e-5)
    assert scored["val/speech/units_per_second"] == pytest.approx(25, abs=1.0)
    assert 1 < scored["val/speech/unit_perplexity"] <= 24


def _tiny_hubert(folder: Path) -> int:
    """A HuBERT of the published format (transformers), tiny and random: 50 Hz frames."""
    from transformers import HubertConfig, HubertModel

    config = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    HubertModel(config).save_pretrained(folder)
    return config.hidden_size


@pytest.mark.parametrize("kmeans_format", ["npy", "joblib"])
def test_published_hubert_and_kmeans_load_from_local_files(tmp_path, clips, kmeans_format):
    import joblib
    from sklearn.cluster import KMeans

    hidden = _tiny_hubert(tmp_path / "hubert")
    centroids = np.random.default_rng(0).normal(size=(12, hidden)).astype(np.float32)
    if kmeans_format == "npy":
        kmeans = tmp_path / "km.npy"
        np.save(kmeans, centroids)
    else:
        kmeans = tmp_path / "km.bin"
        model = KMeans(n_clusters=12, n_init=1, random_state=0).fit(np.random.default_rng(1).normal(size=(200, hidden)))
        joblib.dump(model, kmeans)
    options = SpeechOptions(encoder="hubert", hubert_dir=str(tmp_path / "hubert"), kmeans_path=str(kmeans),
                            hubert_layer=2, n_units=12, frame_rate=50)
    speech = Speech(options, tmp_path / "state")
    speech.prepare([])
    ids = speech.encode(clips[0])
    units = ids[1:-1]
    assert ids[0] == 12 and ids[-1] == 13 and units.min() >= 0 and units.max() < 12
    assert abs(len(units) / clips[0].seconds - 50) < 2  # HuBERT's 50 Hz
    assert torch.equal(speech.encode(clips[0]), ids)
    with pytest.raises(MotError, match="published encoder"):
        speech.fit([], [], progress=False)
    wrong_rate = Speech(options.model_copy(update={"frame_rate": 25}), tmp_path / "state")
    with pytest.raises(MotError, match="frame_rate=50"):
        wrong_rate.prepare([])


def test_hubert_options_and_files_are_checked(tmp_path):
    from mot_core.config import validate_section

    with pytest.raises(MotError, match="encoder 'hubert' needs hubert_dir and kmeans_path"):
        validate_section(SpeechOptions, {"encoder": "hubert"}, "mixture.modalities.speech.options")
    hidden = _tiny_hubert(tmp_path / "hubert")
    np.save(tmp_path / "bad.npy", np.zeros((4, hidden + 1), np.float32))
    options = SpeechOptions(encoder="hubert", hubert_dir=str(tmp_path / "hubert"), kmeans_path=str(tmp_path / "bad.npy"),
                            hubert_layer=2, n_units=4, frame_rate=50)
    with pytest.raises(MotError, match=f"dimension {hidden + 1}, but HuBERT's hidden size is {hidden}"):
        Speech(options, tmp_path).prepare([])
    with pytest.raises(MotError, match="no HuBERT model in"):
        Speech(options.model_copy(update={"hubert_dir": str(tmp_path)}), tmp_path).prepare([])
