"""The text codec of an exported model (``mot export RUN --format hf``): copied next to the
model as ``codec_text.py`` and loaded by its processor. Self-contained: needs only the
``tokenizers`` library. Encodes exactly as the text plugin does in training."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class TextCodec:
    """Text <-> the text modality's local ids.

    ``settings``: ``end_of_text`` (the id ending each text segment), ``adds_end_of_text`` (the
    tokenizer's post-processor already ends a document with it), ``tokenizer_size`` (ids from
    there on are padding rows of the embedding: they have no text)."""

    def __init__(self, folder: str | Path, settings: dict):
        self.tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self.end_of_text = int(settings["end_of_text"])
        self.adds_end_of_text = bool(settings["adds_end_of_text"])
        self.tokenizer_size = int(settings["tokenizer_size"])

    def encode(self, text: str) -> list[int]:
        """A text segment of a document: the tokenizer's ids (with its post-processor's
        tokens, e.g. a BOS), ending with end-of-text."""
        if not isinstance(text, str):
            raise TypeError(f"a text segment is a str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text).ids
        return ids if self.adds_end_of_text else [*ids, self.end_of_text]

    def encode_prompt(self, text: str) -> list[int]:
        """The start of a generation: ``encode`` without its end-of-text."""
        return self.encode(text)[:-1]

    def decode(self, ids: list[int]) -> str:
        """Local ids -> text, special tokens left out."""
        return self.tokenizer.decode([int(i) for i in ids if int(i) < self.tokenizer_size], skip_special_tokens=True)
