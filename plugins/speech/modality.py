"""The speech modality: discrete units between begin/end-of-speech markers.

Local vocabulary: units 0..n_units-1, then begin-of-speech (n_units) and end-of-speech
(n_units + 1). A clip is ``[bos, u_0, ..., u_{T-1}, eos]`` with T = frame_rate units per second
(fewer with ``deduplicate``), all tagged with this modality, so the speech tower predicts
every unit and the end marker; the autoregressive loss trains it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from mot_core.errors import MotError
from mot_core.plugin_api import Modality, PluginOptions, RawDocument, fingerprint_files
from plugins.speech.audio import Audio, load_audio_file, to_rate
from plugins.speech.units import SILENCE_RMS, FeatureConfig, UnitTokenizer, deduplicate, features, fit_units, unit_statistics


class SpeechOptions(PluginOptions):
    tokenizer_dir: str = Field("data/tokenizers/speech_units", description="written by `mot tokenizer fit`")
    n_units: int = Field(256, ge=2, le=65536, description="k-means units (the paper: 500)")
    frame_rate: int = Field(25, ge=1, le=200, description="units per second (the paper: 25 Hz)")
    sample_rate: int = Field(16000, ge=8000, description="audio is resampled to this rate before the features")
    deduplicate: bool = Field(False, description="collapse runs of a repeated unit into one")
    max_seconds: float = Field(20.0, gt=0, description="longer clips are refused: split them first")
    seed: int = 0
    encoder: Literal["mfcc", "hubert"] = Field(
        "mfcc", description="mfcc: k-means fitted here by `mot tokenizer fit`; hubert: a published encoder + k-means"
    )
    hubert_dir: str | None = Field(None, description="a transformers HuBERT folder (encoder: hubert)")
    hubert_layer: int = Field(6, ge=1, description="the HuBERT layer whose features are clustered")
    kmeans_path: str | None = Field(None, description="centroids: .npy (K, hidden) or a joblib scikit-learn k-means")

    @model_validator(mode="after")
    def _encoder_files(self) -> "SpeechOptions":
        if self.encoder == "hubert" and (self.hubert_dir is None or self.kmeans_path is None):
            raise ValueError("encoder 'hubert' needs hubert_dir and kmeans_path")
        if self.encoder == "mfcc" and (self.hubert_dir or self.kmeans_path):
            raise ValueError("hubert_dir and kmeans_path are used only with encoder: hubert")
        return self

    @property
    def feature_config(self) -> FeatureConfig:
        return FeatureConfig(sample_rate=self.sample_rate, frame_rate=self.frame_rate)


class Speech(Modality):
    name = "speech"
    Options = SpeechOptions
    default_loss = "autoregressive"
    default_evaluators = ("speech_units",)

    def __init__(self, options: SpeechOptions, state_dir: Path):
        super().__init__(options, state_dir)
        self.tokenizer: UnitTokenizer | None = None

    # -- tokenizer lifecycle ---------------------------------------------------------------
    def fit(self, train_docs: list[RawDocument], val_docs: list[RawDocument], progress: bool = True,
            force: bool = False) -> dict[str, float]:
        """k-means units on the training clips' features; reports unit statistics on held-out clips."""
        opts: SpeechOptions = self.options
        if opts.encoder == "hubert":
            raise MotError("the speech units come from a published encoder (encoder: hubert); there is nothing to fit")
        folder = Path(opts.tokenizer_dir)
        if not force and (folder / "units.json").is_file():
            saved = UnitTokenizer.load(folder)
            if self._matches(saved):
                print(f"speech unit tokenizer in {folder} matches the config; keeping it (--force to refit)")
                return {"kept": 1.0, **{k: float(v) for k, v in saved.report.items()}}
        train = clips(train_docs, self.name)
        val = clips(val_docs, self.name)
        config = opts.feature_config
        train_features = [features(self._samples(a), config) for a in train]
        centroids = fit_units(train_features, opts.n_units, opts.seed)
        tokenizer = UnitTokenizer(config, centroids, {})
        held_out = val or train
        units = [tokenizer.units(self._samples(a)) for a in held_out]
        report = unit_statistics(units, opts.n_units, sum(a.seconds for a in held_out))
        report.update(train_clips=float(len(train)), train_seconds=float(sum(a.seconds for a in train)),
                      val_clips=float(len(val)))
        tokenizer.report = report
        tokenizer.save(folder)
        return report

    def _matches(self, tokenizer: UnitTokenizer) -> bool:
        return tokenizer.config == self.options.feature_config and tokenizer.n_units == self.options.n_units

    def payload_content(self, payload):
        """The samples and their rate: not the clip's file name (``Audio.source``)."""
        return (payload.samples, payload.sample_rate) if isinstance(payload, Audio) else payload

    def tokenizer_folder(self) -> Path | None:
        """``tokenizer_dir``, shared between runs (the engine records the data it was fitted on)."""
        opts = self.options
        return None if opts.encoder == "hubert" else Path(opts.tokenizer_dir)

    def prepare(self, train_payloads) -> None:
        opts: SpeechOptions = self.options
        if opts.encoder == "hubert":
            from plugins.speech.hubert import HubertUnits

            tokenizer = HubertUnits.load(Path(opts.hubert_dir), Path(opts.kmeans_path), opts.hubert_layer)
            rate = tokenizer.config
            if tokenizer.n_units != opts.n_units or rate.frame_rate != opts.frame_rate or rate.sample_rate != opts.sample_rate:
                raise MotError(
                    f"the HuBERT units have {tokenizer.n_units} units at {rate.frame_rate} Hz from "
                    f"{rate.sample_rate} Hz audio; set mixture.modalities.speech.options n_units={tokenizer.n_units}, "
                    f"frame_rate={rate.frame_rate}, sample_rate={rate.sample_rate}"
                )
            self.tokenizer = tokenizer
            return
        tokenizer = UnitTokenizer.load(Path(opts.tokenizer_dir))
        if not self._matches(tokenizer):
            raise MotError(
                f"speech unit tokenizer in {opts.tokenizer_dir} has {tokenizer.n_units} units at "
                f"{tokenizer.config.frame_rate} Hz / {tokenizer.config.sample_rate} Hz, but the config asks for "
                f"{opts.n_units} at {opts.frame_rate} Hz / {opts.sample_rate} Hz; run `mot tokenizer fit --force` "
                "or fix mixture.modalities.speech.options"
            )
        self.tokenizer = tokenizer

    def fingerprint(self) -> str:
        """The default (options, vocabulary, ``state_dir``) and the unit tokenizer's bytes: the
        k-means ``units.safetensors`` and ``units.json`` in ``tokenizer_dir``, or the HuBERT
        folder and its k-means file."""
        opts: SpeechOptions = self.options
        if opts.encoder == "hubert":
            files = [Path(opts.hubert_dir), Path(opts.kmeans_path)]
        else:
            files = [Path(opts.tokenizer_dir) / "units.safetensors", Path(opts.tokenizer_dir) / "units.json"]
        return fingerprint_files(files, extra=super().fingerprint())

    def _require(self):
        """The unit tokenizer: ``UnitTokenizer`` (MFCC + k-means) or ``HubertUnits``."""
        if self.tokenizer is None:
            raise RuntimeError("Speech.prepare() must run before the tokenizer is used")
        return self.tokenizer

    # -- vocabulary --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.options.n_units + 2

    @property
    def begin_of_speech(self) -> int:
        return self.options.n_units

    @property
    def end_of_speech(self) -> int:
        return self.options.n_units + 1

    # -- encode ----------------------------------------------------------------------------
    def _samples(self, audio: Audio) -> np.ndarray:
        """Checked samples at the tokenizer's rate: resampled, not silent, not too long."""
        opts: SpeechOptions = self.options
        samples = to_rate(audio, opts.sample_rate)
        seconds = len(samples) / opts.sample_rate
        if seconds > opts.max_seconds:
            raise MotError(
                f"{audio.source}: clip of {seconds:.1f} s is longer than max_seconds={opts.max_seconds}; "
                "split it or raise mixture.modalities.speech.options.max_seconds"
            )
        if float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) < SILENCE_RMS:
            raise MotError(f"{audio.source}: the clip is silent (RMS below {SILENCE_RMS}); remove it from the data")
        return samples

    def encode(self, payload: Any) -> torch.Tensor:
        """An ``Audio`` clip -> [bos, units..., eos] local ids."""
        units = self._require().units(self._samples(payload))
        if self.options.deduplicate:
            units = deduplicate(units)
        return torch.cat([torch.tensor([self.begin_of_speech]), units, torch.tensor([self.end_of_speech])])

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Local ids (markers optional) -> (T,) units; there is no vocoder."""
        ids = torch.as_tensor(ids).reshape(-1)
        ids = ids[(ids != self.begin_of_speech) & (ids != self.end_of_speech)]
        if bool((ids < 0).any()) or bool((ids >= self.options.n_units).any()):
            raise MotError(f"speech units must lie in [0, {self.options.n_units})")
        return ids

    def read_payload(self, path: Path) -> Audio:
        return load_audio_file(Path(path))


def clips(docs: list[RawDocument], modality: str) -> list[Audio]:
    """The distinct audio clips of ``modality`` in the documents (a clip shared by its two
    documents, transcript->speech and speech->transcript, is counted once)."""
    seen: dict[int, Audio] = {}
    for doc in docs:
        for segment in doc.segments:
            if segment.modality == modality:
                seen.setdefault(id(segment.payload), segment.payload)
    if not seen:
        raise MotError(f"no '{modality}' clips in the data")
    return list(seen.values())
