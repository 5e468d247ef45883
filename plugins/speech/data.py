"""Spoken sentences as documents: transcript then speech (speech synthesis direction) and
speech then transcript (recognition direction).

A source folder holds ``transcripts.jsonl``, one ``{"file", "text"[, "split"]}`` object a line
(``file`` relative to the folder, any format libsndfile reads: WAV, FLAC, OGG), and the clips.
``split`` is "train" or "val"; where it is missing, a stable hash of the file name decides, so
a folder of your own recordings works as it is. ``mot data prepare`` builds the default folder
by synthesising real sentences with espeak-ng in several voices, variants and speeds:
Wikipedia sentences (gensim's articles) and the captions of the image data (emoji names,
"handwritten digit seven"), so speech, text and images share words.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field, model_validator

from mot_core.errors import MotError
from mot_core.plugin_api import DataSource, PluginOptions, RawDocument, RawSegment, Split, fingerprint_files
from mot_core.plugin_api import progress as progress_display
from plugins.speech.audio import Audio, load_audio_file, save_wav, to_rate

Direction = Literal["transcript_to_speech", "speech_to_transcript"]
TRANSCRIPTS = "transcripts.jsonl"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EMOJI_BLOCKS = ((0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF))
CLIPS_PER_PART = 4096  # a split is read in parts of at most this many clips


class VoiceSpec(PluginOptions):
    name: str = "en-us"
    variant: str | None = None
    speed: int = Field(160, ge=80, le=450, description="words per minute")


def default_voices() -> list[VoiceSpec]:
    """Two accents, male and female variants, three speeds: the units must not learn one speaker."""
    return [
        VoiceSpec(name="en-us", speed=160), VoiceSpec(name="en-gb", variant="f3", speed=150),
        VoiceSpec(name="en-us", variant="m3", speed=180), VoiceSpec(name="en-gb", variant="m1", speed=140),
        VoiceSpec(name="en-us", variant="f2", speed=170), VoiceSpec(name="en-gb", variant="f4", speed=190),
    ]


class SynthesisOptions(PluginOptions):
    wikipedia_sentences: int = Field(600, ge=0, description="sentences of 4-16 words from Wikipedia")
    caption_sentences: int = Field(600, ge=0, description="image captions: emoji names and handwritten digits")
    voices: list[VoiceSpec] = Field(default_factory=default_voices, min_length=1)
    sample_rate: int = Field(16000, ge=8000, description="clips are stored at this rate")
    val_fraction: float = Field(0.05, gt=0, lt=1)


class SpokenSentencesOptions(PluginOptions):
    root: str = Field("data/spoken_sentences", description="folder with transcripts.jsonl and the clips")
    synthesis: SynthesisOptions | None = Field(
        default_factory=SynthesisOptions,
        description="how `mot data prepare` builds root; null for a folder of your own recordings",
    )
    directions: list[Direction] = Field(default_factory=lambda: ["transcript_to_speech", "speech_to_transcript"], min_length=1)
    val_fraction: float = Field(0.05, gt=0, lt=1, description="for clips whose transcript line names no split")
    text_modality: str = "text"
    speech_modality: str = "speech"
    max_clips: int | None = Field(None, ge=1, description="use only the first N clips")

    @model_validator(mode="after")
    def _distinct(self) -> "SpokenSentencesOptions":
        if self.text_modality == self.speech_modality:
            raise ValueError("text_modality and speech_modality must differ")
        if len(set(self.directions)) != len(self.directions):
            raise ValueError("directions repeat")
        return self


class SpokenSentences(DataSource):
    name = "spoken_sentences"
    Options = SpokenSentencesOptions
    modalities = ("text", "speech")

    def __init__(self, options: SpokenSentencesOptions):
        super().__init__(options)
        self.modalities = (options.text_modality, options.speech_modality)
        self._lines: tuple[tuple[int, int, int], list[tuple[str, str, str]]] | None = None

    def prepare(self, progress: bool = True) -> dict:
        opts: SpokenSentencesOptions = self.options
        if opts.synthesis is None:
            return {}
        return synthesize_folder(Path(opts.root), opts.synthesis, progress)

    def _entries(self) -> list[tuple[str, str, str]]:
        """(text, clip file relative to root, split) for every line of the transcripts file (up
        to ``max_clips``), read and checked; kept while the file is unchanged. No clip is read."""
        opts: SpokenSentencesOptions = self.options
        root = Path(opts.root)
        file = root / TRANSCRIPTS
        if not file.is_file():
            hint = "run `mot data prepare` first" if opts.synthesis is not None else f"write {TRANSCRIPTS} there"
            raise MotError(f"dataset 'spoken_sentences': no {file}; {hint}")
        stat = file.stat()
        identity = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if self._lines is not None and self._lines[0] == identity:
            return self._lines[1]
        out = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name, text = str(entry["file"]), str(entry["text"]).strip()
            except (ValueError, KeyError, TypeError):
                raise MotError(f"dataset 'spoken_sentences': {file} line {number} is not a JSON object with 'file' and 'text'") from None
            split = entry.get("split") or ("val" if _hash_fraction(name) < opts.val_fraction else "train")
            if split not in ("train", "val"):
                raise MotError(f"dataset 'spoken_sentences': {file} line {number}: split must be 'train' or 'val', got {split!r}")
            if not text:
                raise MotError(f"dataset 'spoken_sentences': {file} line {number} has an empty transcript")
            out.append((text, name, split))
            if opts.max_clips and len(out) >= opts.max_clips:
                break
        self._lines = (identity, out)
        return out

    def _chosen(self, split: Split) -> list[tuple[str, str]]:
        """(text, clip file) of the clips of ``split``; an empty split is an error."""
        opts: SpokenSentencesOptions = self.options
        chosen = [(text, name) for text, name, clip_split in self._entries() if clip_split == split]
        if not chosen:
            raise MotError(f"dataset 'spoken_sentences' has no clips in its '{split}' split ({opts.root})")
        return chosen

    def documents(self, split: Split) -> Iterator[RawDocument]:
        """The transcripts are read (and checked) when called; each clip is loaded when its
        documents are taken, so memory does not grow with the number of clips."""
        return self._documents(self._chosen(split))

    def num_parts(self, split: Split) -> int:
        """Parts of at most ``CLIPS_PER_PART`` clips of the split, in transcripts order."""
        return -(-len(self._chosen(split)) // CLIPS_PER_PART)

    def read_part(self, split: Split, part: int) -> Iterator[RawDocument]:
        chosen = self._chosen(split)
        parts = -(-len(chosen) // CLIPS_PER_PART)
        if not 0 <= part < parts:
            raise MotError(f"dataset '{self.name}' has {parts} parts in its '{split}' split, asked for part {part}")
        return self._documents(chosen[part * CLIPS_PER_PART : (part + 1) * CLIPS_PER_PART])

    def fingerprint(self) -> str:
        """Names, sizes and modification times of the transcripts file and the clips it names
        (no audio is read), and the options."""
        root = Path(self.options.root)
        try:
            clips = [root / name for _, name, _ in self._entries()]
        except MotError:  # documents() will say what is wrong
            clips = []
        return fingerprint_files([root / TRANSCRIPTS, *clips], extra=super().fingerprint(), contents=False)

    def _documents(self, chosen: list[tuple[str, str]]) -> Iterator[RawDocument]:
        opts: SpokenSentencesOptions = self.options
        root = Path(opts.root)
        for text, name in chosen:
            speech = RawSegment(opts.speech_modality, load_audio_file(root / name))
            words = RawSegment(opts.text_modality, text)
            for direction in opts.directions:
                yield RawDocument((words, speech) if direction == "transcript_to_speech" else (speech, words))


def _hash_fraction(name: str) -> float:
    return zlib.crc32(name.encode("utf-8")) % 10_000 / 10_000


def spoken_texts(options: SynthesisOptions) -> list[str]:
    """The sentences to synthesise, deterministic: captions first, then Wikipedia."""
    captions = [f"handwritten digit {d}" for d in DIGITS]
    for lo, hi in EMOJI_BLOCKS:
        for code in range(lo, hi + 1):
            name = unicodedata.name(chr(code), "")
            if name:
                captions.append(name.lower())
    captions = captions[: options.caption_sentences]
    sentences: list[str] = []
    if options.wikipedia_sentences:
        from plugins.common.wikipedia import load_wikipedia

        for _, body in load_wikipedia(None, 500):
            for sentence in re.split(r"(?<=[.!?])\s+", body):
                sentence = " ".join(sentence.split())
                words = sentence.split()
                if 4 <= len(words) <= 16 and re.fullmatch(r"[A-Za-z0-9 ,;:'()\-.!?]+", sentence):
                    sentences.append(sentence)
                    if len(sentences) == options.wikipedia_sentences:
                        break
            if len(sentences) == options.wikipedia_sentences:
                break
    return captions + sentences


def synthesize_folder(root: Path, options: SynthesisOptions, progress: bool = True) -> dict:
    """Synthesise ``spoken_texts`` into ``root`` (WAV clips + transcripts.jsonl); idempotent:
    a folder made with the same options is kept."""
    from plugins.speech.synth import Voice, synthesize

    wanted = options.model_dump(mode="json")
    meta = root / "meta.json"
    if meta.is_file() and (root / TRANSCRIPTS).is_file() and json.loads(meta.read_text()).get("synthesis") == wanted:
        return {"skipped": True, "path": str(root)}
    started = time.perf_counter()
    texts = spoken_texts(options)
    if not texts:
        raise MotError("spoken_sentences: synthesis has no sentences (wikipedia_sentences and caption_sentences are 0)")
    clips_dir = root / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    lines, seconds = [], 0.0
    for index, text in enumerate(progress_display(texts, desc="synthesise speech", disable=not progress, unit="clip")):
        spec = options.voices[index % len(options.voices)]
        samples, rate = synthesize(text, Voice(spec.name, spec.variant, spec.speed))
        clip = Audio(to_rate(Audio(samples, rate, text), options.sample_rate), options.sample_rate, text)
        name = f"clips/{index:05d}.wav"
        save_wav(clip, root / name)
        seconds += clip.seconds
        split = "val" if _hash_fraction(text) < options.val_fraction else "train"
        voice = f"{spec.name}{'+' + spec.variant if spec.variant else ''}@{spec.speed}"
        lines.append(json.dumps({"file": name, "text": text, "split": split, "voice": voice}))
    tmp = root / (TRANSCRIPTS + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(root / TRANSCRIPTS)
    meta.write_text(json.dumps({"synthesis": wanted}, indent=2))
    val = sum('"split": "val"' in line for line in lines)
    return {"clips": len(lines), "val": val, "hours": round(seconds / 3600, 3),
            "seconds": round(time.perf_counter() - started, 1), "path": str(root)}
