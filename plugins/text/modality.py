"""The text modality: a byte-level BPE tokenizer trained with HF ``tokenizers`` on the run's
training text and saved with the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mot_core.errors import MotError
from mot_core.plugin_api import Modality, PluginOptions

END_OF_TEXT = "<|endoftext|>"


class TextOptions(PluginOptions):
    vocab_size: int = Field(4096, ge=300, description="BPE vocabulary including 256 bytes and specials")
    min_frequency: int = Field(2, ge=1)
    tokenizer_path: str | None = Field(None, description="use this tokenizer.json instead of training one")


class Text(Modality):
    name = "text"
    Options = TextOptions
    default_loss = "autoregressive"
    default_evaluators = ("text_lm",)

    def __init__(self, options: TextOptions, state_dir: Path):
        super().__init__(options, state_dir)
        self.tokenizer: Tokenizer | None = None

    @property
    def _file(self) -> Path:
        return self.state_dir / "tokenizer.json"

    def prepare(self, train_payloads: Iterable[str]) -> None:
        opts: TextOptions = self.options
        meta_file = self.state_dir / "tokenizer_meta.json"
        wanted = opts.model_dump()
        if self._file.is_file():
            saved = json.loads(meta_file.read_text()) if meta_file.is_file() else None
            if saved != wanted:
                raise MotError(
                    f"the text tokenizer saved in {self.state_dir} was made with options {saved}, "
                    f"but the config asks for {wanted}; use a new run.dir or the same options"
                )
            self.tokenizer = Tokenizer.from_file(str(self._file))
            fresh = False  # the run's own tokenizer: never rewritten (a run folder may be read-only)
        elif opts.tokenizer_path:
            path = Path(opts.tokenizer_path)
            if not path.is_file():
                raise MotError(f"text tokenizer_path not found: {path}")
            self.tokenizer = Tokenizer.from_file(str(path))
            fresh = True
        else:
            self.tokenizer = self._train(train_payloads)
            reached = self.tokenizer.get_vocab_size()
            if reached < opts.vocab_size:
                raise MotError(
                    f"the text BPE reached only {reached} of vocab_size={opts.vocab_size} ids on this data "
                    f"(min_frequency={opts.min_frequency}); set mixture.modalities.text.options.vocab_size={reached} "
                    "or lower min_frequency, or add text"
                )
            fresh = True
        if self.tokenizer.token_to_id(END_OF_TEXT) is None:
            raise MotError(f"the text tokenizer has no '{END_OF_TEXT}' token")
        if fresh:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(str(self._file))
            meta_file.write_text(json.dumps(wanted))
        self.eot = self.tokenizer.token_to_id(END_OF_TEXT)

    def _train(self, texts: Iterable[str]) -> Tokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.options.vocab_size,
            min_frequency=self.options.min_frequency,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return tok

    @property
    def vocab_size(self) -> int:
        return self._require().get_vocab_size()

    def _require(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("Text.prepare() must run before the tokenizer is used")
        return self.tokenizer

    def encode(self, payload: str) -> torch.Tensor:
        """A document's text -> (L,) ids, ending with <|endoftext|>."""
        if not isinstance(payload, str):
            raise MotError(f"text segments must be strings, got {type(payload).__name__}")
        ids = self._require().encode(payload).ids
        return torch.tensor([*ids, self.eot], dtype=torch.long)

    def encode_batch(self, payloads: list[str]) -> list[torch.Tensor]:
        for payload in payloads:
            if not isinstance(payload, str):
                raise MotError(f"text segments must be strings, got {type(payload).__name__}")
        encodings = self._require().encode_batch(payloads)
        return [torch.tensor([*e.ids, self.eot], dtype=torch.long) for e in encodings]

    def encode_prompt(self, payload: str) -> torch.Tensor:
        """A prompt's ids, without end-of-text. Byte-level BPE has no unknown tokens (any byte
        is a token), so the tokens a prompt must not hold are the special ones."""
        if not payload:
            raise MotError("empty text prompt")
        ids = self.encode(payload)[:-1]
        special = [t.content for i, t in self._require().get_added_tokens_decoder().items() if i in set(ids.tolist())]
        if special:
            raise MotError(f"prompt {payload!r} contains the special token {special[0]!r}")
        return ids

    @property
    def stop_token(self) -> int:
        return self.eot

    def decode(self, ids: torch.Tensor) -> str:
        return self._require().decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """(vocab,) number of UTF-8 bytes each token stands for (0 for special tokens)."""
        byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
        tok = self._require()
        counts = np.zeros(tok.get_vocab_size(), dtype=np.int64)
        specials = {t.content for t in tok.get_added_tokens_decoder().values()}
        for token, index in tok.get_vocab().items():
            if token not in specials:
                counts[index] = sum(1 for ch in token if ch in byte_of)
        return counts


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (used by ByteLevel BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))
