"""The text modality: a byte-level BPE tokenizer trained with HF ``tokenizers`` on the run's
training text, or a given one (a tokenizer.json, or the folder of a local Hugging Face
checkpoint), saved with the run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mot_core.errors import MotError
from mot_core.plugin_api import HFCodec, Modality, PluginOptions

END_OF_TEXT = "<|endoftext|>"
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TextOptions(PluginOptions):
    vocab_size: int = Field(4096, ge=300, description="BPE vocabulary including 256 bytes and specials "
                            "(fitting only: a given tokenizer brings its own)")
    min_frequency: int = Field(2, ge=1)
    tokenizer_path: str | None = Field(
        None, description="use this tokenizer.json, or the folder of a local Hugging Face checkpoint "
        "(its tokenizer.json, tokenizer_config.json and config.json), instead of training one")
    end_of_text: str | None = Field(
        None, description="token ending each document and free generation; default: a checkpoint "
        f"folder's eos_token, else {END_OF_TEXT}")


class Text(Modality):
    name = "text"
    Options = TextOptions
    default_loss = "autoregressive"
    default_evaluators = ("text_lm",)

    def __init__(self, options: TextOptions, state_dir: Path):
        super().__init__(options, state_dir)
        self.tokenizer: Tokenizer | None = None
        self._vocab_size = 0
        self._tokenizer_size = 0  # one past the tokenizer's largest id; ids from there on are padding
        self._adds_eot = False  # the tokenizer's post-processor already ends a document with eot

    @property
    def _file(self) -> Path:
        return self.state_dir / "tokenizer.json"

    @property
    def _source_file(self) -> Path:
        """What the tokenizer file alone does not hold: the vocab_size and end-of-text token."""
        return self.state_dir / "tokenizer_source.json"

    def prepare(self, train_payloads: Iterable[str]) -> None:
        opts: TextOptions = self.options
        meta_file = self.state_dir / "tokenizer_meta.json"
        wanted = opts.model_dump()
        if self._file.is_file():
            saved = json.loads(meta_file.read_text()) if meta_file.is_file() else None
            # Options added since a run was saved compare at their defaults, so older runs resume.
            defaults = {name: field.default for name, field in TextOptions.model_fields.items()}
            if saved is None or {**defaults, **saved} != wanted:
                raise MotError(
                    f"the text tokenizer saved in {self.state_dir} was made with options {saved}, "
                    f"but the config asks for {wanted}; use a new run.dir or the same options"
                )
            # The run's own copy: the original tokenizer_path is never read again, and the copy is
            # never rewritten (a run folder may be read-only).
            tokenizer, origin = _load_tokenizer(self._file), self._file
            source = _read_json(self._source_file) if self._source_file.is_file() else {}
            vocab_size = source.get("vocab_size")
            eot_token = source.get("end_of_text") or opts.end_of_text or END_OF_TEXT
            fresh = False
        elif opts.tokenizer_path:
            path = Path(opts.tokenizer_path)
            if path.is_dir():
                tokenizer, vocab_size, eot_token = _load_checkpoint(path, opts.end_of_text)
                origin = path / "tokenizer.json"
            elif path.is_file():
                tokenizer, vocab_size, eot_token = _load_tokenizer(path), None, opts.end_of_text or END_OF_TEXT
                origin = path
            else:
                raise MotError(f"text tokenizer_path not found: {path}")
            fresh = True
        else:
            eot_token = opts.end_of_text or END_OF_TEXT
            tokenizer, vocab_size, origin = self._train(train_payloads, eot_token), None, "fitted on this run's text"
            reached = tokenizer.get_vocab_size()
            if reached < opts.vocab_size:
                floor = type(opts).model_fields["vocab_size"].metadata[0].ge  # the option's own minimum
                fix = (f"set mixture.modalities.text.options.vocab_size={reached} or lower min_frequency, or add text"
                       if reached >= floor else
                       f"lower min_frequency or add text (vocab_size cannot go below {floor})")
                raise MotError(
                    f"the text BPE reached only {reached} of vocab_size={opts.vocab_size} ids on this data "
                    f"(min_frequency={opts.min_frequency}); {fix}")
            fresh = True
        eot = tokenizer.token_to_id(eot_token)
        if eot is None:
            raise MotError(f"the text end-of-text token {eot_token!r} is not in the tokenizer {origin}; "
                           "set mixture.modalities.text.options.end_of_text to one of its tokens")
        size = _tokenizer_size(tokenizer)
        if vocab_size is None:
            vocab_size = size
        elif not isinstance(vocab_size, int) or vocab_size < size:
            raise MotError(f"{self._source_file} says vocab_size={vocab_size!r} for a tokenizer of {size:,} tokens; "
                           "use a new run.dir")
        if fresh:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._source_file.write_text(json.dumps({"vocab_size": vocab_size, "end_of_text": eot_token}))
            tokenizer.save(str(self._file))
            meta_file.write_text(json.dumps(wanted))
        self.tokenizer, self.eot, self._vocab_size, self._tokenizer_size = tokenizer, eot, vocab_size, size
        probe, plain = tokenizer.encode("a").ids, tokenizer.encode("a", add_special_tokens=False).ids
        self._adds_eot = len(probe) > len(plain) and probe[-1] == eot

    def _train(self, texts: Iterable[str], eot_token: str) -> Tokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.options.vocab_size,
            min_frequency=self.options.min_frequency,
            special_tokens=[eot_token],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return tok

    @property
    def vocab_size(self) -> int:
        """Ids this modality owns: the tokenizer's, or a checkpoint's padded embedding size
        (config.json); ids past the tokenizer are never produced by ``encode``."""
        self._require()
        return self._vocab_size

    def _require(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("Text.prepare() must run before the tokenizer is used")
        return self.tokenizer

    def _document(self, ids: list[int]) -> torch.Tensor:
        """The ids of ``Tokenizer.encode`` (post-processor specials included) -> (L,) ids
        ending with one end-of-text."""
        if not self._adds_eot:
            ids = [*ids, self.eot]
        return torch.tensor(ids, dtype=torch.long)

    def encode(self, payload: str) -> torch.Tensor:
        """A document's text -> (L,) ids as the tokenizer's checkpoint was trained on (with its
        post-processor's tokens, e.g. a BOS), ending with end-of-text."""
        if not isinstance(payload, str):
            raise MotError(f"text segments must be strings, got {type(payload).__name__}")
        return self._document(self._require().encode(payload).ids)

    def encode_batch(self, payloads: list[str]) -> list[torch.Tensor]:
        """B texts -> B (L_i,) ids, each equal to ``encode`` of that text."""
        for payload in payloads:
            if not isinstance(payload, str):
                raise MotError(f"text segments must be strings, got {type(payload).__name__}")
        return [self._document(e.ids) for e in self._require().encode_batch(payloads)]

    def encode_prompt(self, payload: str) -> torch.Tensor:
        """A prompt -> (L - 1,) ``encode`` ids without end-of-text (a BOS the tokenizer adds
        stays). Byte-level BPE has no unknown tokens (any byte is a token), so the tokens a
        prompt must not hold are the special ones its own text spells out."""
        if not payload:
            raise MotError("empty text prompt")
        tok = self._require()
        ids = self.encode(payload)[:-1]
        own = set(tok.encode(payload, add_special_tokens=False).ids)
        special = [t.content for i, t in tok.get_added_tokens_decoder().items() if t.special and i in own]
        if special:
            raise MotError(f"prompt {payload!r} contains the special token {special[0]!r}")
        return ids

    @property
    def stop_token(self) -> int:
        return self.eot

    def export_hf(self, folder: Path) -> HFCodec:
        """The tokenizer file and what the exported processor needs to encode as training did."""
        folder.mkdir(parents=True, exist_ok=True)
        self._require().save(str(folder / "tokenizer.json"))
        return HFCodec(code=(Path(__file__).with_name("hf_codec.py"),), class_name="hf_codec.TextCodec",
                       settings={"end_of_text": int(self.eot), "adds_end_of_text": bool(self._adds_eot),
                                 "tokenizer_size": int(self._tokenizer_size)})

    def decode(self, ids: torch.Tensor) -> str:
        """(L,) ids -> text without special tokens (padding ids past the tokenizer have no text)."""
        tok = self._require()
        return tok.decode([int(i) for i in ids if int(i) < self._tokenizer_size], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) number of UTF-8 bytes each token stands for (0 for special tokens and
        for padding ids past the tokenizer).

        Byte-level BPE spells each byte as one character; SentencePiece-style tokenizers spell
        a space as ``▁`` (so the space a Metaspace prepends to a document counts as one byte)
        and unknown bytes as ``<0xNN>`` tokens; other tokenizers are counted as their token text."""
        tok = self._require()
        spec = json.loads(tok.to_str())
        byte_level, space = _token_style(spec)
        byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        added = tok.get_added_tokens_decoder()
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for token, index in tok.get_vocab().items():
            if index in added:
                # Added tokens are matched in the raw text, so they stand for their own content.
                counts[index] = 0 if added[index].special else len(added[index].content.encode("utf-8"))
            elif byte_fallback and _BYTE_FALLBACK.fullmatch(token):
                counts[index] = 1
            elif byte_level:
                counts[index] = sum(1 for ch in token if ch in byte_of)
            else:
                counts[index] = len((token.replace(space, " ") if space else token).encode("utf-8"))
        return counts


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line MotError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MotError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise MotError(f"cannot read {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust loader raises a bare Exception for any bad file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise MotError(f"cannot read the text tokenizer {path}: {first}") from None


def _load_checkpoint(folder: Path, end_of_text: str | None) -> tuple[Tokenizer, int | None, str]:
    """A Hugging Face checkpoint folder -> (tokenizer, config.json's vocab_size or None,
    end-of-text token: ``end_of_text``, else tokenizer_config.json's eos_token, else <|endoftext|>)."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise MotError(f"the text tokenizer_path folder {folder} has no tokenizer.json "
                       "(a Hugging Face checkpoint folder holds tokenizer.json and tokenizer_config.json)")
    tokenizer = _load_tokenizer(file)
    eot_token = end_of_text
    config_file = folder / "tokenizer_config.json"
    if eot_token is None and config_file.is_file():
        eos = _read_json(config_file).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos is not None and not isinstance(eos, str):
            raise MotError(f"the eos_token in {config_file} is neither a string nor {{\"content\": ...}}: {eos!r}")
        eot_token = eos
    vocab_size = None
    model_file = folder / "config.json"
    if model_file.is_file():
        model = _read_json(model_file)
        # Multimodal checkpoints keep the language model's settings under text_config.
        vocab_size = model.get("vocab_size", (model.get("text_config") or {}).get("vocab_size"))
        if vocab_size is not None and (type(vocab_size) is not int or vocab_size < 1):
            raise MotError(f"the vocab_size in {model_file} is not a positive integer: {vocab_size!r}")
        size = _tokenizer_size(tokenizer)
        if vocab_size is not None and vocab_size < size:
            raise MotError(f"the tokenizer in {folder} has {size:,} tokens but its config.json says "
                           f"vocab_size={vocab_size:,}")
    return tokenizer, vocab_size, eot_token or END_OF_TEXT


def _tokenizer_size(tokenizer: Tokenizer) -> int:
    """One past the largest id the tokenizer produces (its size, unless its ids have gaps)."""
    return max(tokenizer.get_vocab_size(), max(tokenizer.get_vocab().values(), default=-1) + 1)


def _components(node: Any) -> Iterator[dict]:
    """A tokenizer.json normalizer/pre_tokenizer/decoder and the steps of its Sequences."""
    if isinstance(node, dict):
        yield node
        for key in ("normalizers", "pretokenizers", "decoders"):
            for child in node.get(key) or []:
                yield from _components(child)


def _token_style(spec: dict) -> tuple[bool, str | None]:
    """tokenizer.json -> (byte-level BPE?, the character that spells a space, as
    SentencePiece's ``▁``, or None)."""
    steps = [c for key in ("normalizer", "pre_tokenizer", "decoder") for c in _components(spec.get(key))]
    if any(c.get("type") == "ByteLevel" for c in steps):
        return True, None
    for c in steps:
        if c.get("type") == "Metaspace":
            return False, c.get("replacement", "▁")
    for c in _components(spec.get("decoder")):
        # Older SentencePiece conversions (Llama 2): Replace("▁" -> " ") instead of Metaspace.
        pattern = c.get("pattern")
        if c.get("type") == "Replace" and c.get("content") == " " and isinstance(pattern, dict):
            if pattern.get("String"):
                return False, pattern["String"]
    return False, None


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
