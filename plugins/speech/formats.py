"""``librispeech``: speech sets in LibriSpeech's layout, local or in an object store.

    LibriSpeech/dev-clean/84/121123/84-121123.trans.txt    "84-121123-0000 GO DO YOU HEAR"
    LibriSpeech/dev-clean/84/121123/84-121123-0000.flac

``paths`` names the transcript files (``**`` at any depth: ``LibriSpeech/dev-clean/**/*.trans.txt``);
each line is an utterance id and its transcript, the audio beside it as ``<id>.<audio_extension>``.
One part per transcript file (a chapter). Each utterance becomes a speech-text document in each
of ``directions``; its split is a stable hash of its id. The clip is read at its own rate; the
speech modality brings it to its tokenizer's rate (polyphase resampling, scipy). A clip that
libsndfile cannot read (another format under the name, a file cut short), a missing clip and an
empty transcript are ``BadRecord``s: ``data.on_bad_record`` decides.
"""

from __future__ import annotations

from typing import Iterator

from pydantic import Field

from mot_core.errors import MotError
from mot_core.plugin_api import BadRecord, PluginOptions, RawDocument, RawSegment, Split, storage_path
from plugins.common.messages import one_line
from plugins.common.stored_files import StoredFile, StoredFilesSource, in_val_split
from plugins.common.audio import Audio, decode_audio_bytes
from plugins.speech.data import Direction


class LibriSpeechOptions(PluginOptions):
    paths: list[str] = Field(min_length=1, description="the transcript files (*.trans.txt): paths, globs, "
                             "s3:// or gs:// URIs (**/ for any depth)")
    audio_extension: str = Field("flac", min_length=1, description="the clips' extension (flac, wav, ogg)")
    lowercase: bool = Field(True, description="lowercase the transcripts (LibriSpeech's are upper case)")
    directions: list[Direction] = Field(default_factory=lambda: ["transcript_to_speech", "speech_to_transcript"],
                                        min_length=1)
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of utterances held out (a stable hash of each id)")
    speech_modality: str = Field("speech", description="modality that receives the clips")
    text_modality: str = Field("text", description="modality that receives the transcripts")


class LibriSpeech(StoredFilesSource):
    """Utterances of LibriSpeech-style folders: a clip and its transcript each. A part is a
    transcript file; the fingerprint lists the transcript files (a chapter's clips change with
    its transcript)."""

    name = "librispeech"
    Options = LibriSpeechOptions
    modalities = ("speech", "text")

    def __init__(self, options: LibriSpeechOptions):
        super().__init__(options)
        self.modalities = (options.speech_modality, options.text_modality)

    def _read(self, file: StoredFile, part: None, split: Split) -> Iterator[RawDocument | BadRecord]:
        opts: LibriSpeechOptions = self.options
        try:
            with file.open_stream() as stream:
                lines = stream.read().decode("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            if split == "train":
                yield BadRecord(file.name, "unreadable transcript file", one_line(exc))
            return
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            utterance, _, transcript = line.strip().partition(" ")
            if in_val_split(utterance, opts.val_fraction) != (split == "val"):
                continue
            where = f"{file.name}: line {number} ({utterance})"
            transcript = transcript.strip()
            if not transcript:
                yield BadRecord(where, "missing transcript")
                continue
            audio = self._clip(file, utterance, where)
            if isinstance(audio, BadRecord):
                yield audio
                continue
            words = RawSegment(opts.text_modality, transcript.lower() if opts.lowercase else transcript)
            speech = RawSegment(opts.speech_modality, audio)
            for direction in opts.directions:
                yield RawDocument((words, speech) if direction == "transcript_to_speech" else (speech, words))

    def _clip(self, file: StoredFile, utterance: str, where: str) -> Audio | BadRecord:
        path = f"{file.folder}/{utterance}.{self.options.audio_extension}"
        try:
            fs, resolved = storage_path(path, f"dataset '{self.name}' paths")
            with fs.open_input_stream(resolved) as handle:
                data = handle.read()
        except (OSError, MotError) as exc:
            return BadRecord(where, "missing audio", f"{path}: {one_line(exc)}")
        try:
            return decode_audio_bytes(data, path)
        except ValueError as exc:
            return BadRecord(f"{where}: {path}", "unreadable audio", str(exc))
