"""What a plugin contributes: base classes for modalities, losses, data sources, evaluators.

A plugin module implements hooks from ``registry.hookspecs`` that return these classes. The
engine instantiates them from the run config; plugins never see the config of other plugins.

Data flows one way:
    DataSource.documents(split) -> [RawDocument]          raw payloads tagged by modality
    Modality.encode(payload)    -> (L,) local token ids   the modality's own vocabulary
    engine packing              -> Batch                  global ids, routing, attention layout
    MoTTransformer              -> (N, dim) hidden states, modality-sorted
    Loss.per_token(slice)       -> per-token losses of one modality's contiguous slice
    Evaluator.update/compute    -> metrics of that modality
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict

from mot_core.errors import MotError

if TYPE_CHECKING:
    from mot_core.generation import SpanGrammar

Split = Literal["train", "val"]


class PluginOptions(BaseModel):
    """Base for a plugin's own options section: unknown keys are errors, like the core's."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class RawSegment:
    """One span of a document in one modality, before tokenization (text, an image, ...)."""

    modality: str
    payload: Any


@dataclass(frozen=True)
class RawDocument:
    """One training sample: segments in reading order (interleaving of any pattern)."""

    segments: tuple[RawSegment, ...]


class Modality(abc.ABC):
    """A modality: its tokenizer/encoder and the vocabulary range it owns.

    Class attributes:
        name: registry name, used as the key under ``mixture.modalities``.
        Options: pydantic model of the ``options`` section (subclass ``PluginOptions``).
        default_loss: loss used when the config names none.
        default_evaluators: evaluators run by ``mot eval`` and during training evaluation.
        bidirectional: True if a segment's tokens attend to each other in both directions.
    """

    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    default_loss: ClassVar[str] = "autoregressive"
    default_evaluators: ClassVar[tuple[str, ...]] = ()
    bidirectional: ClassVar[bool] = False

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
    def encode(self, payload: Any) -> torch.Tensor:
        """One raw payload -> (L,) long local token ids in [0, vocab_size)."""

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

    def write_payloads(self, payloads: list[Any], path: Path, captions: list[str] | None = None) -> Path:
        """Save generated payloads (an image grid PNG); returns the file written."""
        raise MotError(f"modality '{self.name}' cannot save generated samples")

    def span_grammar(self) -> "SpanGrammar | None":
        """For modalities emitted as whole spans (an image grid): its begin/body/end layout,
        which constrains decoding. None for free-running modalities."""
        return None


@dataclass
class ModalitySlice:
    """One modality's contiguous slice of a batch, in modality-sorted order.

    Attributes:
        index: modality index in the run's mixture; offset: first global id of its vocabulary.
        targets: (n,) long global id of the next token, -100 where there is none.
        extras: other per-token tensors a loss may need (continuous targets, timesteps, ...).
    """

    index: int
    offset: int
    targets: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Loss(abc.ABC):
    """A training objective for the positions of one modality."""

    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions):
        self.options = options

    @abc.abstractmethod
    def per_token(
        self, model: torch.nn.Module, hidden: torch.Tensor, batch: ModalitySlice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: (n, dim) final states of this modality's positions.
        Returns (losses (n,) float, valid (n,) bool); the engine averages over valid ones."""


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
    def documents(self, split: Split) -> list[RawDocument]:
        """All documents of a split. Raise ``MotError`` for missing or unreadable data."""

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


class Evaluator(abc.ABC):
    """Accumulates per-token results of one modality over validation batches."""

    name: ClassVar[str]

    def __init__(self, modality: Modality):
        self.modality = modality
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
