"""From raw documents to packed batches.

Documents are tokenized once by their modalities, shifted into the global vocabulary, and
packed into fixed-length rows (no padding): a document cut at the end of a row continues in
the next row. Each row carries, per token: global id, modality id, RoPE position (restarting
per document chunk), document id (attention never crosses documents), bidirectional span id
(-1 = causal) and the next-token target (-100 where the document ends).

``PackedStream`` is deterministic given its seed and its ``state_dict`` fully describes its
position, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mot_core.attention import AttentionLayout
from mot_core.errors import MotError
from mot_core.plugin_api import Modality, ModalitySlice, RawDocument
from mot_core.routing import RoutingPlan, build_routing

IGNORE = -100


@dataclass(frozen=True)
class TokenDocument:
    """A tokenized document, flat. All arrays (L,)."""

    ids: np.ndarray  # int64 global ids
    modality: np.ndarray  # int64 modality index
    span: np.ndarray  # int64 bidirectional span id within the document, -1 = causal

    def __len__(self) -> int:
        return len(self.ids)


class Vocabulary:
    """The run's modalities in mixture order and the global id range each owns."""

    def __init__(self, modalities: dict[str, Modality]):
        self.modalities = modalities
        self.names = list(modalities)
        self.offsets: dict[str, int] = {}
        total = 0
        for name, modality in modalities.items():
            self.offsets[name] = total
            total += modality.vocab_size
        self.size = total

    def index(self, name: str) -> int:
        return self.names.index(name)

    def token_modality(self) -> torch.Tensor:
        """(size,) long: the modality index owning each global id."""
        table = torch.empty(self.size, dtype=torch.long)
        for index, name in enumerate(self.names):
            table[self.offsets[name] : self.offsets[name] + self.modalities[name].vocab_size] = index
        return table

    def tokenize(self, docs: list[RawDocument], source: str) -> list[TokenDocument]:
        """Encode every segment (batched per modality); ids are checked against the
        modality's vocabulary."""
        encoded = self._encode_all(docs, source)
        out = []
        for doc_index, doc in enumerate(docs):
            ids, mods, spans = [], [], []
            for seg_index, segment in enumerate(doc.segments):
                modality = self.modalities[segment.modality]
                local = encoded[doc_index, seg_index]
                if local.size and (local.min() < 0 or local.max() >= modality.vocab_size):
                    bad = int(local.max() if local.max() >= modality.vocab_size else local.min())
                    raise MotError(
                        f"dataset '{source}': modality '{segment.modality}' produced token id {bad}, "
                        f"outside its vocabulary of {modality.vocab_size}"
                    )
                ids.append(local + self.offsets[segment.modality])
                mods.append(np.full(local.size, self.index(segment.modality), dtype=np.int64))
                spans.append(np.full(local.size, seg_index if modality.bidirectional else -1, dtype=np.int64))
            if ids and sum(a.size for a in ids):
                out.append(TokenDocument(np.concatenate(ids), np.concatenate(mods), np.concatenate(spans)))
        return out

    def _encode_all(self, docs: list[RawDocument], source: str) -> dict[tuple[int, int], np.ndarray]:
        by_modality: dict[str, list[tuple[int, int]]] = {}
        for doc_index, doc in enumerate(docs):
            for seg_index, segment in enumerate(doc.segments):
                if segment.modality not in self.modalities:
                    raise MotError(
                        f"dataset '{source}' has a '{segment.modality}' segment but the mixture "
                        f"declares only: {', '.join(self.names)}"
                    )
                by_modality.setdefault(segment.modality, []).append((doc_index, seg_index))
        encoded = {}
        for name, keys in by_modality.items():
            payloads = [docs[d].segments[s].payload for d, s in keys]
            for key, ids in zip(keys, self.modalities[name].encode_batch(payloads)):
                encoded[key] = torch.as_tensor(ids).reshape(-1).numpy().astype(np.int64)
        return encoded


@dataclass
class Batch:
    """A packed batch. All tensors (B, S) except as noted."""

    tokens: torch.Tensor
    modality: torch.Tensor
    positions: torch.Tensor
    document: torch.Tensor
    span: torch.Tensor
    targets: torch.Tensor
    plan: RoutingPlan
    layout: AttentionLayout

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.tokens), move(self.modality), move(self.positions), move(self.document),
            move(self.span), move(self.targets), self.plan.to(device), self.layout.to(device),
        )

    def modality_slices(self, vocab: Vocabulary) -> dict[str, tuple[int, int, ModalitySlice]]:
        """name -> (start, end, slice) of each modality present, in modality-sorted order."""
        targets = self.plan.sort(self.targets.reshape(-1))
        slices = {}
        for index, name in enumerate(vocab.names):
            start, end = self.plan.bounds(index)
            if end > start:
                slices[name] = (start, end, ModalitySlice(index, vocab.offsets[name], targets[start:end]))
        return slices


def collate(rows: list[dict[str, np.ndarray]], num_modalities: int) -> Batch:
    """Stack rows and compute, once and on the host, the routing plan and attention layout."""
    stacked = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
    plan = build_routing(stacked["modality"], num_modalities)
    layout = AttentionLayout.build(stacked["document"], stacked["span"])
    return Batch(plan=plan, layout=layout, **stacked)


class PackedStream:
    """Endless, deterministic, resumable stream of packed rows from weighted sources.

    Each source is read in a per-epoch random permutation; the next document's source is drawn
    with probability proportional to its weight.
    """

    def __init__(
        self, sources: list[list[TokenDocument]], weights: list[float], seq_len: int, seed: int, shuffle: bool = True
    ):
        for docs in sources:
            if not docs:
                raise MotError("a training source has no documents")
        self.sources, self.seq_len, self.seed, self.shuffle = sources, seq_len, seed, shuffle
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.rng = torch.Generator().manual_seed(seed)
        self.epochs = [0] * len(sources)
        self.cursors = [0] * len(sources)
        self.current: tuple[int, int, int] | None = None  # (source, doc index, token offset)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            if not self.shuffle:
                return np.arange(len(self.sources[source]))
            self._perms = {k: v for k, v in self._perms.items() if k[0] != source}
            rng = np.random.default_rng([self.seed, source, epoch])
            self._perms[key] = rng.permutation(len(self.sources[source]))
        return self._perms[key]

    def _next_document(self) -> tuple[int, int]:
        source = int(torch.multinomial(self.weights, 1, generator=self.rng)) if len(self.sources) > 1 else 0
        perm = self._perm(source, self.epochs[source])
        doc = int(perm[self.cursors[source]])
        self.cursors[source] += 1
        if self.cursors[source] == len(perm):
            self.epochs[source], self.cursors[source] = self.epochs[source] + 1, 0
        return source, doc

    def next_row(self) -> dict[str, np.ndarray]:
        row = _RowBuilder(self.seq_len)
        while not row.full:
            if self.current is None:
                self.current = (*self._next_document(), 0)
            source, doc_index, offset = self.current
            doc = self.sources[source][doc_index]
            taken = row.add(doc, offset)
            self.current = None if offset + taken >= len(doc) else (source, doc_index, offset + taken)
        return row.arrays()

    def next_batch(self, batch_size: int, num_modalities: int) -> Batch:
        return collate([self.next_row() for _ in range(batch_size)], num_modalities)

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.get_state(),
            "epochs": list(self.epochs),
            "cursors": list(self.cursors),
            "current": None if self.current is None else list(self.current),
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.epochs, self.cursors = list(state["epochs"]), list(state["cursors"])
        self.current = None if state["current"] is None else tuple(state["current"])


class _RowBuilder:
    def __init__(self, seq_len: int):
        self.seq_len, self.filled, self.chunks = seq_len, 0, 0
        self.fields = {k: np.empty(seq_len, dtype=np.int64) for k in ("tokens", "modality", "positions", "document", "span", "targets")}

    @property
    def full(self) -> bool:
        return self.filled == self.seq_len

    def add(self, doc: TokenDocument, offset: int) -> int:
        """Copy doc[offset:] into the row as far as it fits; returns tokens taken."""
        n = min(len(doc) - offset, self.seq_len - self.filled)
        dst = slice(self.filled, self.filled + n)
        src = slice(offset, offset + n)
        f = self.fields
        f["tokens"][dst] = doc.ids[src]
        f["modality"][dst] = doc.modality[src]
        f["positions"][dst] = np.arange(n)
        f["document"][dst] = self.chunks
        f["span"][dst] = doc.span[src]
        targets = doc.ids[offset + 1 : offset + n + 1]
        f["targets"][dst][: len(targets)] = targets
        f["targets"][dst][len(targets) :] = IGNORE  # the document ends inside this row
        self.filled += n
        self.chunks += 1
        return n

    def arrays(self) -> dict[str, np.ndarray]:
        return self.fields


def fixed_batches(docs: list[TokenDocument], batch_size: int, seq_len: int, max_batches: int, num_modalities: int) -> list[Batch]:
    """Validation batches, the same every time: the documents in one fixed-seed random order,
    so a budget smaller than the split is still a uniform sample of it (sources often store
    their documents grouped by kind)."""
    if not docs:
        raise MotError("the validation split has no documents")
    stream = PackedStream([docs], [1.0], seq_len, seed=0, shuffle=True)
    total_tokens = sum(len(d) for d in docs)
    rows_available = max(1, total_tokens // seq_len)
    n_batches = max(1, min(max_batches, rows_available // batch_size))
    rows_per_batch = min(batch_size, rows_available)
    return [stream.next_batch(rows_per_batch, num_modalities) for _ in range(n_batches)]
