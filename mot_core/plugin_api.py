"""What a plugin contributes: base classes for modalities, losses, data sources, evaluators.

A plugin module implements hooks from ``registry.hookspecs`` that return these classes. The
engine instantiates them from the run config; plugins never see the config of other plugins.

Data flows one way:
    DataSource.documents(split) -> RawDocuments           raw payloads tagged by modality (a list,
                                                          or an iterator reading them lazily)
    Modality.encode(payload)    -> (L,) local token ids   the modality's own vocabulary (once:
                                                          ``mot data tokenize`` writes shards)
                                or ContinuousSegment      ids + (V, input_dim) real-valued inputs
    engine packing              -> Batch                  global ids, continuous inputs, routing,
                                                          attention layout, segments
    Loss.sample_extras(slice)   -> per-position extras    drawn when the batch is built (noise, t)
    input adapter (plugin)      -> (V, dim)               continuous positions into the stream
    MoTTransformer              -> (N, dim) hidden states, modality-sorted
    Loss.per_token(slice)       -> per-position losses of one modality's contiguous slice
                                   (through the shared LM head or the modality's own head)
    Evaluator.update/compute    -> metrics of that modality
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict

from mot_core.errors import MotError
from mot_core.progress import progress

__all__ = [
    # what a plugin contributes
    "Modality", "Loss", "DataSource", "Evaluator", "PluginOptions",
    # data flowing through them
    "RawDocument", "RawSegment", "BadRecord", "ContinuousSegment", "ModalitySlice", "IGNORE_INDEX", "CONTINUOUS",
    # generation and evaluation
    "SamplingParams", "SpanGrammar", "ValueSpan", "SpanRunner", "EvaluationContext",
    # sharing a trained model
    "HFCodec",
    # helpers
    "fingerprint_files", "origin", "progress", "storage_path",
]

def fingerprint_files(paths: Iterable[Path | str], extra: str = "", contents: bool = True) -> str:
    """sha256 over ``extra`` and the files at ``paths`` (folders: every file below, in sorted
    order; missing paths count as missing). ``contents``: hash the bytes (for tokenizer
    files); False: only relative names, sizes and modification times (for data, cheaply)."""
    digest = hashlib.sha256(extra.encode("utf-8"))
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            name = str(file.relative_to(path)) if path.is_dir() else file.name
            if not file.is_file():
                digest.update(f"\0missing {name}".encode())
                continue
            stat = file.stat()
            digest.update(f"\0{name}\0{stat.st_size}".encode())
            if not contents:
                digest.update(f"\0{stat.st_mtime_ns}".encode())
                continue
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def storage_path(path: str, what: str):
    """A local path or an object-store URI (``s3://bucket/key``, ``gs://``, with the endpoint
    and credentials the run's ``storage`` settings and the AWS variables give, as for the
    shards) -> (``pyarrow.fs.FileSystem``, path in it). ``what`` names the option in errors.
    Raises a one-line ``MotError`` for a malformed URI or one holding credentials."""
    from mot_core import filesystems

    return filesystems.resolve(path, what)


def origin(obj: Any) -> str:
    """Who contributed a plugin class (or an instance of one), for error messages:
    "plugin 'NAME' (DISTRIBUTION VERSION, module MODULE)" once the registry has indexed it."""
    cls = obj if isinstance(obj, type) else type(obj)
    return cls.__dict__.get("__mot_origin__") or f"{cls.__name__} (module {cls.__module__})"


Split = Literal["train", "val"]
Reduction = Literal["token", "segment"]

IGNORE_INDEX = -100
"""Target id of a position with nothing to predict (the end of a document, or a next position
that carries a continuous value); losses skip it."""

CONTINUOUS = -1
"""Local id that marks a position carrying a continuous value in ``ContinuousSegment.ids``."""


class PluginOptions(BaseModel):
    """Base for a plugin's own options section: unknown keys are errors, like the core's."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    cfg_scale: float = 1.0  # 1 = no guidance
    denoising_steps: int = 0  # continuous modalities: sampler steps; 0 = the modality's default


@dataclass(frozen=True)
class SpanGrammar:
    """A span emitted whole, in the modality's local ids: begin, ``length`` body ids in
    [body_lo, body_hi), end."""

    begin: int
    end: int
    body_lo: int
    body_hi: int
    length: int


@dataclass(frozen=True)
class HFCodec:
    """How an exported model's processor encodes and decodes one modality
    (``Modality.export_hf``).

    Attributes:
        code: Python files copied next to the exported model (self-contained: they may import
            ``torch``, ``numpy``, ``PIL``, ``tokenizers``, ``safetensors`` and each other by
            file, never this package or the plugin). One of them defines ``class_name``.
        class_name: ``"module.Class"``; built as ``Class(folder, settings)`` where ``folder``
            holds what ``export_hf`` wrote. It has ``encode(payload) -> list[int]`` (a
            document's segment, as in training), ``encode_prompt(payload) -> list[int]`` and
            ``decode(ids: list[int]) -> payload``, all in the modality's local ids.
        settings: JSON-able values the class needs (an end-of-text id, an image size).
    """

    code: tuple[Path, ...]
    class_name: str
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ValueSpan:
    """Where a generated span of a continuous modality sits, in the modality's own local ids.

    Attributes:
        begin: the marker a prompt ends with before the values (as in training, where the
            modality's segments start with it). Its final hidden state is what predicts the
            first value: ``SpanRunner.prompt_output()`` for an autoregressive head.
        length: how many value positions one span holds (an image's patches), or None for an
            open-ended span whose length the caller gives (``--max-tokens``, ``max_tokens``).
        end: the marker that closes such a span in training (what ``encode`` puts after the
            values), or None. Generation returns the values; where the model reads on after a
            generated span (an evaluator's span -> text), the payload is encoded again, end
            marker included.
    """

    begin: int
    length: int | None = None
    end: int | None = None


@dataclass(frozen=True)
class ContinuousSegment:
    """What ``Modality.encode`` returns for a modality with continuous inputs.

    Attributes:
        ids: (L,) long local ids; ``CONTINUOUS`` (-1) at positions that carry a value, real ids
            of the modality's vocabulary elsewhere (e.g. a begin-of-segment marker, which is
            embedded by the shared table and predicted by the shared head like any token).
        values: (V, input_dim) float, one row per ``CONTINUOUS`` position, in order.
    """

    ids: torch.Tensor
    values: torch.Tensor

    @staticmethod
    def of_values(values: torch.Tensor, prefix: tuple[int, ...] = (), suffix: tuple[int, ...] = ()) -> "ContinuousSegment":
        """``prefix`` ids, then one continuous position per row of ``values``, then ``suffix`` ids."""
        ids = torch.tensor([*prefix, *([CONTINUOUS] * values.shape[0]), *suffix], dtype=torch.long)
        return ContinuousSegment(ids, values)


@dataclass(frozen=True)
class RawSegment:
    """One span of a document in one modality, before tokenization (text, an image, ...)."""

    modality: str
    payload: Any


@dataclass(frozen=True)
class RawDocument:
    """One training sample: segments in reading order (interleaving of any pattern)."""

    segments: tuple[RawSegment, ...]


@dataclass(frozen=True)
class BadRecord:
    """What a source yields in place of a record it cannot read, as real corpora have them: the
    engine stops with one line (``data.on_bad_record: error``) or leaves the record out and
    counts it by ``cause`` (``skip``). Never drop a record silently.

    ``where``: the file, and the member or row (``shard-00003.tar: 000123.jpg``);
    ``cause``: a short kind, counted (``truncated tar``, ``undecodable image``, ``missing
    caption``, ``wrong column type``, ``empty document``, ``unreadable audio``);
    ``detail``: what the reader said (one line)."""

    where: str
    cause: str
    detail: str = ""


@dataclass(frozen=True)
class NativeFile:
    """One file a Ray Data reader reads for a source (``NativeRead``).

    ``path``: as the read's ``filesystem`` names it (``/data/a.parquet``, ``bucket/key``);
    ``first_part``: the index of its first part among the source's parts; ``part_rows``: the
    rows of each of its parts in order (a Parquet file's row groups), or None for a file that
    is one part whatever it holds (a tar, a JSON lines file)."""

    path: str
    first_part: int
    part_rows: tuple[int, ...] | None = None

    @property
    def num_parts(self) -> int:
        return 1 if self.part_rows is None else len(self.part_rows)

    @property
    def parts(self) -> range:
        """The indexes of its parts among the source's."""
        return range(self.first_part, self.first_part + self.num_parts)


@dataclass(frozen=True)
class NativeRead:
    """Files of a source that a Ray Data reader reads on a cluster (``mot data tokenize
    --address``): ``reader`` is the ``ray.data`` function (``read_parquet``,
    ``read_webdataset``, ``read_binary_files``), ``options`` its keyword arguments (the engine
    adds ``include_paths``), ``filesystem`` a ``pyarrow.fs.FileSystem``, ``columns`` the only
    columns to read (``select_columns``, pushed into the read), or None for all. The engine puts
    the rows back in file order and hands each part's rows to ``DataSource.read_rows``."""

    reader: str
    files: tuple[NativeFile, ...]
    filesystem: Any
    options: dict = field(default_factory=dict)
    columns: tuple[str, ...] | None = None


class Modality(abc.ABC):
    """A modality: its tokenizer/encoder and the vocabulary range it owns.

    Class attributes:
        name: registry name, used as the key under ``mixture.modalities``.
        Options: pydantic model of the ``options`` section (subclass ``PluginOptions``).
        default_loss: loss used when the config names none.
        default_evaluators: evaluators run by ``mot eval`` and during training evaluation.
        bidirectional: True if a segment's tokens attend to each other in both directions
            (for a modality with ``marker_modality``: its continuous positions, not its markers).
        keep_segments_whole: True if packing must never cut a segment of this modality at a
            row end (an image denoised as a whole). A document holding one is never split when
            it fits in a row; the row is padded instead (padding is masked out of every loss).
        may_encode_empty: True if ``encode`` may return no ids for a segment (the segment then
            adds nothing); otherwise an empty result is an error, never silently dropped.

    A modality with continuous inputs (latent patches, sensor frames, audio features) returns
    ``input_dim`` > 0, makes ``encode`` return a ``ContinuousSegment``, and builds an input
    adapter (and usually an output head) with ``build_adapter`` / ``build_head``. Those modules
    are part of the model: trained, checkpointed, counted, and applied only to this modality's
    contiguous slice of the batch.
    """

    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    default_loss: ClassVar[str] = "autoregressive"
    default_evaluators: ClassVar[tuple[str, ...]] = ()
    may_encode_empty: ClassVar[bool] = False  # True: encode may return no ids for a segment
    bidirectional: ClassVar[bool] = False
    keep_segments_whole: ClassVar[bool] = False

    def __init__(self, options: PluginOptions, state_dir: Path):
        """``state_dir``: folder inside the run where the tokenizer is saved and reloaded."""
        self.options = options
        self.state_dir = state_dir

    @abc.abstractmethod
    def prepare(self, train_payloads: Iterable[Any]) -> None:
        """Load the tokenizer from ``state_dir`` if it is there, else fit it on the training
        payloads of this modality and save it there (so a run reloads exactly its tokenizer)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids this modality owns (after ``prepare``)."""

    @abc.abstractmethod
    def encode(self, payload: Any) -> "torch.Tensor | ContinuousSegment":
        """One raw payload -> (L,) long local token ids in [0, vocab_size); for a modality with
        ``input_dim``, a ``ContinuousSegment`` (ids with ``CONTINUOUS`` marks, and the values)."""

    @property
    def input_dim(self) -> int | None:
        """Size of one continuous position's input vector (after ``prepare``); None for a
        modality whose positions are all token ids."""
        return None

    @property
    def marker_modality(self) -> str | None:
        """The discrete modality whose tower and loss process this modality's token ids (its
        begin/end markers), or None for its own. Transfusion treats BOI/EOI as text tokens:
        the text tower reads them and the next-token loss predicts from them (the end-of-image
        marker predicts a caption's first word), while the modality's own tower and loss
        see only its continuous positions. The ids stay in this modality's vocabulary."""
        return None

    def value_span(self) -> ValueSpan | None:
        """How a generated span of this continuous modality is laid out (its begin marker,
        length and end marker), or None if the modality is not generated. Generating needs it,
        ``sample_values`` and ``values_to_payloads``. The default reads an older
        ``span_grammar()`` (begin, end, length) where a modality declares one."""
        grammar = self.span_grammar() if self.input_dim is not None else None
        return None if grammar is None else ValueSpan(begin=grammar.begin, length=grammar.length, end=grammar.end)

    def sample_values(self, runner: "SpanRunner", params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        """Generate ``runner.count`` continuous positions per conditional row of ``runner``,
        whose prompts end with the span's begin marker; returns (B, count, input_dim) values.
        Either style works:

        - diffusion (a whole span at once): denoise candidates with ``runner.predict``, which
          keeps nothing; the engine then appends the final values as clean inputs (an adapter
          given no extras reads clean values);
        - autoregressive (one position at a time): ``runner.prompt_output()`` is the head's
          prediction of the first value (from the begin marker); draw it, ``runner.append``
          it, which returns the prediction of the next one, and so on. Values appended this
          way are in the sequence already; return exactly them.

        A modality that cannot generate values keeps this default."""
        raise MotError(f"modality '{self.name}' cannot generate continuous values")

    def values_to_payloads(self, values: torch.Tensor) -> list[Any]:
        """(B, count, input_dim) generated values -> B payloads (latent patches -> images)."""
        raise MotError(f"modality '{self.name}' cannot turn generated values into payloads")

    def build_adapter(self, dim: int) -> torch.nn.Module | None:
        """The input adapter of a continuous modality, built from the validated options.

        Called once per model. Its ``forward(values, extras)`` maps values (V, input_dim) of
        this modality's continuous positions, and ``extras`` (name -> (V, ...) tensors, the
        loss's ``sample_extras`` rows for those positions, e.g. a timestep), to (V, dim).
        A modality with ``input_dim`` must return one; discrete modalities return None."""
        return None

    def build_head(self, dim: int) -> torch.nn.Module | None:
        """An output head of this modality's own (e.g. a linear map to a latent patch), or None
        to use only the shared LM head. Its loss reaches it as ``ModalitySlice.head``."""
        return None

    def encode_batch(self, payloads: list[Any]) -> list[torch.Tensor]:
        """Many payloads at once; override when batching is faster (e.g. a conv encoder)."""
        return [self.encode(p) for p in payloads]

    def fit(self, train_docs: list[RawDocument], val_docs: list[RawDocument], progress: bool = True,
            force: bool = False) -> dict[str, float]:
        """Train this modality's tokenizer (and any evaluation network) as a separate step,
        ``mot tokenizer fit``, and save it where ``prepare`` will find it; returns quality
        metrics. It sees whole documents, so it can learn from neighbouring segments (an
        image's caption). A matching tokenizer already saved is kept unless ``force``.
        Modalities whose tokenizer is cheap (text BPE) fit inside ``prepare`` and keep this
        default."""
        return {}

    def payload_content(self, payload: Any) -> Any:
        """What of a payload the tokenizer reads, for the record of the data a shared tokenizer
        was fitted on (``tokenizer_folder``): by default the whole payload; drop names and paths
        that do not change what the tokenizer sees (a clip's source file name), so that the same
        data under another folder or on another machine keeps its tokenizer."""
        return payload

    def tokenizer_folder(self) -> Path | None:
        """The folder ``fit`` writes its tokenizer to when that folder is shared between runs
        (an option such as ``tokenizer_dir``), or None (the default: nothing fitted, or fitted
        into this run's ``state_dir``, or a published checkpoint). The engine records there
        which data the tokenizer was fitted on (``fitted_on.json``) and refuses, in one line,
        to use it for other data."""
        return None

    def decode(self, ids: torch.Tensor) -> Any:
        """(L,) local ids -> payload (for generation and inspection)."""
        raise TypeError(f"modality '{self.name}' does not decode tokens")

    def decode_batch(self, ids: torch.Tensor) -> list[Any]:
        """(B, L) local ids -> B payloads; override when batching is faster."""
        return [self.decode(row) for row in ids]

    def encode_prompt(self, payload: Any) -> torch.Tensor:
        """A payload as the start of a generation prompt (text: without its end token)."""
        return self.encode(payload)

    @property
    def stop_token(self) -> int | None:
        """Local id that ends free generation in this modality (text: end-of-text), or None."""
        return None

    def read_payload(self, path: Path) -> Any:
        """A payload from a file, for prompts given on the command line (an image file)."""
        raise MotError(f"modality '{self.name}' cannot read prompts from files")

    default_sample_file: str | None = None
    """Where ``mot generate`` writes this modality's samples (through ``write_payloads``) when
    no ``--out`` is given: ``"samples.png"`` for an image grid. None: without ``--out`` the
    payloads are printed (text, or anything whose ``str`` reads well)."""

    def write_payloads(self, payloads: list[Any], path: Path, captions: list[str] | None = None) -> Path:
        """Save generated payloads (an image grid PNG); returns the file written."""
        raise MotError(f"modality '{self.name}' cannot save generated samples")

    def span_grammar(self) -> SpanGrammar | None:
        """For modalities emitted as whole spans (an image grid): its begin/body/end layout,
        which constrains decoding. None for free-running modalities."""
        return None

    def export_hf(self, folder: Path) -> "HFCodec | None":
        """For ``mot export RUN --format hf`` (the whole model): write what turns this
        modality's payloads into its local ids and back without this package (a tokenizer
        file, an encoder's weights) into ``folder``, and return the ``HFCodec`` that reads
        them. None (the default): the modality cannot be exported, and the whole-model export
        is refused in one line naming it (``--modality`` still exports one text tower)."""
        return None

    def fingerprint(self) -> str:
        """A digest of everything ``encode`` depends on (after ``prepare``), stored with the
        tokenized shards so that shards written by another tokenizer are refused, never read.

        The default covers the class, the options, ``vocab_size``, ``input_dim`` and every
        file under ``state_dir``. A modality whose tokenizer lives elsewhere (a shared
        ``tokenizer_dir``, a published checkpoint) adds those files:
        ``fingerprint_files([...], extra=super().fingerprint())``."""
        described = {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "options": self.options.model_dump(mode="json"),
            "vocab_size": self.vocab_size,
            "input_dim": self.input_dim,
        }
        return fingerprint_files([self.state_dir], extra=json.dumps(described, sort_keys=True, default=str))


@dataclass
class ModalitySlice:
    """One modality's contiguous slice of a batch, in modality-sorted order.

    The slice lists first this modality's token positions, then its continuous positions
    (each group in batch order), so ``values`` belong to the last ``num_values`` rows.

    Attributes:
        index: modality index in the run's mixture; offset: first global id of its vocabulary.
        targets: (n,) long global id of the next token; ``IGNORE_INDEX`` where there is none
            (document end) or the next position carries a continuous value.
        segment: (n,) long segment id, unique within the batch (a segment cut at a row end
            continues as a new segment in the next row).
        num_values: how many of the n positions carry continuous values (the last ones).
        values: (num_values, input_dim) continuous inputs, or None for a discrete modality.
        next_values: (n, input_dim) the value at the next position where that position is a
            continuous position of this modality (zeros elsewhere), or None.
        has_next_value: (n,) bool, where ``next_values`` holds a real target, or None.
        followed: (n,) bool, True where the position's segment is followed by another segment
            of its document (an image before its caption), or None.
        extras: per-position tensors (n, ...) from the loss's ``sample_extras``.
        head: this modality's own output head (``Modality.build_head``), or None.
    """

    index: int
    offset: int
    targets: torch.Tensor
    segment: torch.Tensor | None = None
    num_values: int = 0
    values: torch.Tensor | None = None
    next_values: torch.Tensor | None = None
    has_next_value: torch.Tensor | None = None
    followed: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    head: torch.nn.Module | None = None

    def __len__(self) -> int:
        return self.targets.shape[0]


class Loss(abc.ABC):
    """A training objective for the positions of one modality.

    Class attributes:
        reduction: how the engine averages ``per_token``'s losses within a batch: ``token``,
            a mean over valid positions; ``segment``, a mean per segment (over its valid
            positions) and then a mean over segments (a diffusion loss is a mean per image).
            Across modalities the engine always sums ``loss_weight[m] * mean_m``.

    Attributes:
        modality: the modality this loss scores, set by the engine once both are built (a
            diffusion loss reads its noise schedule from it), or None outside a run.
    """

    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    reduction: ClassVar[Reduction] = "token"

    def __init__(self, options: PluginOptions):
        self.options = options
        self.modality: Modality | None = None

    def sample_extras(self, piece: ModalitySlice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-position tensors (n, ...) this loss needs, drawn on the host when the batch is
        built (diffusion: a timestep per segment and noise per value). Draw only from
        ``generator``: it is the data stream's, saved in checkpoints, so a resumed run draws
        exactly what the uninterrupted run would. ``piece`` has no ``head`` yet."""
        return {}

    @abc.abstractmethod
    def per_token(
        self, model: torch.nn.Module, hidden: torch.Tensor, batch: ModalitySlice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: (n, dim) final states of this modality's positions.
        Returns (losses (n,) float, valid (n,) bool); the engine averages over valid ones as
        ``reduction`` says. ``model.head_weight`` is the shared (vocab, dim) LM head;
        ``batch.head`` is the modality's own head, if it built one."""


class SpanRunner(abc.ABC):
    """The model, primed with B prompts (in its KV cache), as a generating modality sees it.

    The next ``count`` positions of every row form one span of the generating modality
    (bidirectional inside if the modality is). Rows 0..B-1 (``rows`` = B) are the conditional
    prompts; with guidance (``guided``), rows B..2B-1 are their unconditional twins, so the
    tensors passed and returned have R = 2B rows then, R = B otherwise."""

    rows: int
    guided: bool
    count: int

    @abc.abstractmethod
    def predict(self, values: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """Diffusion: values (R, count, input_dim) candidate inputs of every row; extras:
        name -> (R, count, ...) adapter extras (e.g. the timestep) -> (R, count, out) outputs
        of the modality's own head at those positions, WITHOUT keeping them in the cache
        (each denoising step sees the prompt and the current candidates only)."""

    @abc.abstractmethod
    def prompt_output(self) -> torch.Tensor:
        """Autoregressive: (R, out) the modality's own head applied to the last prompt
        position (the begin marker, or the last value of a continued span): the prediction
        of the span's first value, as the loss saw it in training."""

    @abc.abstractmethod
    def append(self, values: torch.Tensor) -> torch.Tensor:
        """Autoregressive: values (R, k, input_dim) become the next k positions of every row,
        kept in the cache as clean inputs -> (R, k, out) the head's outputs there (the last
        one predicts the value after them). At most ``count`` positions in all."""


class DataSource(abc.ABC):
    """A dataset: real documents for the mixture, split into train and held-out val.

    ``modalities`` names the modalities its documents contain; a source whose modality names
    come from its options may set it per instance in ``__init__``.
    """

    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    modalities: ClassVar[tuple[str, ...]]

    def __init__(self, options: PluginOptions):
        self.options = options

    @abc.abstractmethod
    def documents(self, split: Split) -> Iterable[RawDocument]:
        """The documents of a split, in the same order every time: a list, or (better for a
        large corpus) an iterator that reads and yields them lazily, so that memory does not
        grow with the corpus. Raise ``MotError`` for missing or unreadable data.

        The engine reads them once, to tokenize them into shards (``mot data tokenize``), and
        to fit tokenizers on a bounded sample of the first documents of each part."""

    def num_parts(self, split: Split) -> int:
        """How many independent parts a split can be read in (files, groups of files, shards
        of the source's own). Parts are tokenized in parallel (Ray Data tasks on a cluster),
        each into shards of its own. Default 1: the whole split is one part."""
        return 1

    def read_part(self, split: Split, part: int) -> Iterable[RawDocument]:
        """The documents of part ``part`` (0 <= part < ``num_parts(split)``), same order every
        time; the parts in order give ``documents(split)``. Override with ``num_parts``."""
        if part != 0:
            raise MotError(f"dataset '{self.name}' has one part, asked for part {part}")
        return self.documents(split)

    def fingerprint(self) -> str:
        """A digest of the data as it is now (file names, sizes and modification times; a
        dump's size), stored with the tokenized shards: shards of a source that has changed
        since are refused. Keep it cheap (no reading of the data itself). Default: the
        options, which catches a changed path or split but not a file edited in place."""
        return fingerprint_files([], extra=json.dumps(self.options.model_dump(mode="json"), sort_keys=True, default=str))

    def native_reads(self, split: Split) -> list[NativeRead]:
        """The files of ``split`` that Ray Data's own readers can read on a cluster (``mot data
        tokenize --address``): one ``NativeRead`` per reader, covering some or all parts. Parts
        no read covers are read with ``read_part``. Default: none. A source that returns reads
        implements ``read_rows``, and must give there the documents ``read_part`` gives."""
        return []

    def read_rows(self, split: Split, part: int, rows: Any) -> Iterable[RawDocument]:
        """The documents of part ``part`` from ``rows``, a ``pyarrow.Table`` of what the part's
        ``NativeRead`` reader gave for it, in file order (with its ``path`` column): exactly
        what ``read_part(split, part)`` yields, ``BadRecord``s included."""
        raise MotError(f"dataset '{self.name}' lists Ray Data reads but does not implement read_rows")

    def prepare(self, progress: bool = True) -> dict[str, Any]:
        """Build the data on disk if it must be rendered or converted first (``mot data
        prepare``); idempotent. Returns what it did. Sources read as-is keep this default."""
        return {}


@dataclass
class EvaluationContext:
    """What model-level evaluations get (``mot eval``): the trained model and held-out data.

    Attributes:
        model: the MoT model (eval mode); vocab: the run's ``mot_core.data.Vocabulary``.
        val_docs: held-out raw documents of every source.
        samples: how many samples generation-based metrics may draw (0 = skip them).
    """

    model: torch.nn.Module
    vocab: Any
    val_docs: list[RawDocument]
    device: torch.device
    samples: int = 0
    seed: int = 0
    span_sampler: Callable[..., list[Any]] | None = None  # set by the engine: KV-cache generation
    text_sampler: Callable[..., list[Any]] | None = None  # set by the engine: span -> text continuation
    segment_generator: Callable[..., list[Any]] | None = None  # set by the engine: generate_segments

    def generate(self, prompts: list[list[RawSegment]], modality: str, params: SamplingParams,
                 max_tokens: int = 64) -> list[Any]:
        """One payload of ``modality`` per prompt (a list of ``RawSegment``): the same entry
        point as ``mot generate`` (``mot_core.generate.api.generate_segments``). A span
        modality gives a whole span, a continuous one is denoised, any other runs free until
        its stop token or ``max_tokens``."""
        if self.segment_generator is None:
            raise MotError("this evaluation context was built without a generator")
        return self.segment_generator(self.model, self.vocab, prompts, modality, params, max_tokens=max_tokens,
                                      seed=self.seed)

    def sample_spans(self, prompts: list[Any], prompt_modality: str, span_modality: str,
                     params: SamplingParams) -> list[Any]:
        """One whole span of ``span_modality`` per prompt payload of ``prompt_modality``,
        decoded to payloads (caption -> image), with the engine's KV-cache generation."""
        if self.span_sampler is None:
            raise MotError("this evaluation context was built without a generator")
        return self.span_sampler(self.model, self.vocab, prompts, prompt_modality, span_modality, params, seed=self.seed)

    def continue_with_text(self, payloads: list[Any], payload_modality: str, text_modality: str,
                           params: SamplingParams, max_tokens: int = 48) -> list[Any]:
        """The text the model writes after each payload of ``payload_modality`` (image ->
        caption), up to the text modality's stop token or ``max_tokens``; continuous payloads
        enter clean."""
        if self.text_sampler is None:
            raise MotError("this evaluation context was built without a generator")
        return self.text_sampler(self.model, self.vocab, payloads, payload_modality, text_modality, params,
                                 max_tokens=max_tokens, seed=self.seed)


class Evaluator(abc.ABC):
    """Accumulates per-token results of one modality over validation batches.

    Class attributes:
        name: registry name, listed under ``mixture.modalities.<m>.evaluators``.
        Options: pydantic model of ``mixture.modalities.<m>.evaluator_options.<name>`` (sample
            counts, temperatures, lengths), validated from the YAML like modality options and
            shown, filled with its defaults, by ``mot config show``. ``self.options`` holds it.
    """

    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, modality: Modality, options: PluginOptions | None = None):
        self.modality = modality
        self.options = options if options is not None else self.Options()
        self.reset()

    @abc.abstractmethod
    def reset(self) -> None:
        """Start a new evaluation."""

    @abc.abstractmethod
    def update(self, losses: torch.Tensor, valid: torch.Tensor, local_targets: torch.Tensor) -> None:
        """losses, valid: (n,) from the loss; local_targets: (n,) ids in the modality's own
        vocabulary (or -100)."""

    @abc.abstractmethod
    def compute(self) -> dict[str, float]:
        """Metrics, keyed without the modality prefix (the engine adds ``val/<modality>/``)."""

    def evaluate_model(self, context: EvaluationContext) -> dict[str, float]:
        """Metrics that need the model or raw data rather than per-token losses (tokenizer
        reconstruction, sample quality). Run by ``mot eval``, not at every training eval."""
        return {}
