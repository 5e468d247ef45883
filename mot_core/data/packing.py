"""From raw documents to packed batches.

Documents are tokenized once by their modalities, shifted into the global vocabulary, and
packed into fixed-length rows: a document cut at the end of a row continues in the next row.
Segments of modalities that keep them whole (an image denoised as one) are never cut: a
document holding one starts a fresh row when it does not fit in what is left of the row (if it
fits in a row at all), a longer one is cut only between such segments, and the rest of the
row is padding (its own document, no loss anywhere). Each row carries, per token: global id, modality id, RoPE position (restarting
per document chunk), document id (attention never crosses documents), bidirectional span id
(-1 = causal), segment id, whether it carries a continuous value, and the next-token target
(-100 where the document ends or the next position carries a value). Continuous values travel
per modality, in batch order, next to the ids; losses may add per-position extras (noise,
timesteps) drawn from the stream's generator when the batch is built.

``PackedStream`` is deterministic given its seed and its ``state_dict`` fully describes its
position, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from mot_core.data.vocabulary import TokenDocument, Vocabulary
from mot_core.errors import MotError
from mot_core.model.attention import AttentionLayout
from mot_core.model.routing import RoutingPlan, build_routing
from mot_core.plugin_api import IGNORE_INDEX as IGNORE
from mot_core.plugin_api import ModalitySlice


ExtrasSampler = Callable[["Batch", torch.Generator], None]


@dataclass
class Batch:
    """A packed batch. Tensors are (B, S) unless noted.

    Attributes:
        segment: segment id of each position, unique within the batch.
        is_value: bool, True where the position carries a continuous value.
        values: modality index -> (V_m, input_dim) values of its continuous positions, in batch
            order (which is their order in the modality's sorted slice: the sort is stable).
        next_values: modality index -> (n_m, input_dim) value of the next position where that is
            a continuous position of the same modality (zeros elsewhere), in slice order.
        has_next_value: bool, True where ``next_values`` holds a target.
        followed: bool, True where the position's segment is followed by another segment of
            its document.
        extras: modality index -> name -> (n_m, ...) per-position tensors from the modality's
            loss (``Loss.sample_extras``), in slice order.
    """

    tokens: torch.Tensor
    modality: torch.Tensor
    positions: torch.Tensor
    document: torch.Tensor
    span: torch.Tensor
    targets: torch.Tensor
    plan: RoutingPlan
    layout: AttentionLayout
    segment: torch.Tensor | None = None
    is_value: torch.Tensor | None = None
    has_next_value: torch.Tensor | None = None
    followed: torch.Tensor | None = None
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    next_values: dict[int, torch.Tensor] = field(default_factory=dict)
    extras: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.tokens), move(self.modality), move(self.positions), move(self.document),
            move(self.span), move(self.targets), self.plan.to(device), self.layout.to(device),
            move(self.segment), move(self.is_value), move(self.has_next_value), move(self.followed),
            {m: move(v) for m, v in self.values.items()},
            {m: move(v) for m, v in self.next_values.items()},
            {m: {k: move(v) for k, v in e.items()} for m, e in self.extras.items()},
        )

    def select_rows(self, first: int, end: int) -> "Batch":
        """Rows ``[first, end)`` as a batch of their own: what ``collate`` builds from those rows,
        with the values, next-value targets and loss extras drawn for the whole batch kept for
        the positions in those rows (one data-parallel worker's shard of a global batch)."""
        seq = self.tokens.shape[1]
        rows = slice(first, end)
        cut = lambda t: None if t is None else t[rows]  # noqa: E731
        modality, is_value = self.modality[rows], cut(self.is_value)
        num_modalities = self.plan.num_modalities
        plan = build_routing(modality, num_modalities, is_value)
        layout = AttentionLayout.build(self.document[rows], self.span[rows])
        flat_modality = self.modality.reshape(-1)
        inside = lambda flat_index: (flat_index >= first * seq) & (flat_index < end * seq)  # noqa: E731
        values, next_values, extras = {}, {}, {}
        for m, table in self.values.items():
            positions = torch.nonzero((flat_modality == m) & self.is_value.reshape(-1)).squeeze(1)
            keep = inside(positions)
            if bool(keep.any()):
                values[m] = table[keep]
        for m in range(num_modalities):
            start, stop = self.plan.bounds(m)
            if start == stop or plan.counts[m] == 0:
                continue
            keep = inside(self.plan.order[start:stop])  # the stable sort keeps the rows' order
            if m in values and m in self.next_values:
                next_values[m] = self.next_values[m][keep]
            if m in self.extras:
                extras[m] = {k: v[keep] for k, v in self.extras[m].items()}
        return Batch(
            self.tokens[rows], modality, self.positions[rows], self.document[rows], self.span[rows],
            self.targets[rows], plan, layout, cut(self.segment), is_value, cut(self.has_next_value),
            cut(self.followed), values, next_values, extras,
        )

    def modality_slices(self, vocab: Vocabulary) -> dict[str, tuple[int, int, ModalitySlice]]:
        """name -> (start, end, slice) of each modality present, in modality-sorted order."""
        plan = self.plan
        targets = plan.sort(self.targets.reshape(-1))
        segment = None if self.segment is None else plan.sort(self.segment.reshape(-1))
        # Next-value targets exist only for continuous modalities: sort them only then.
        has_next = plan.sort(self.has_next_value.reshape(-1)) if self.next_values else None
        followed = None if self.followed is None else plan.sort(self.followed.reshape(-1))
        slices = {}
        for index, name in enumerate(vocab.names):
            start, end = plan.bounds(index)
            if end == start:
                continue
            piece = ModalitySlice(
                index, vocab.offsets[name], targets[start:end],
                segment=None if segment is None else segment[start:end],
                num_values=plan.num_values(index),
                values=self.values.get(index),
                next_values=self.next_values.get(index),
                has_next_value=has_next[start:end] if index in self.next_values else None,
                followed=None if followed is None else followed[start:end],
                extras=dict(self.extras.get(index, {})),
            )
            slices[name] = (start, end, piece)
        return slices


def collate(rows: list[dict], num_modalities: int) -> Batch:
    """Stack rows and compute, once and on the host, the routing plan and attention layout."""
    fields = [k for k in rows[0] if k not in ("values", "next_values")]
    stacked = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in fields}
    seq = stacked["tokens"].shape[1]
    stacked["segment"] += torch.arange(len(rows))[:, None] * seq  # a row holds < seq segments
    plan = build_routing(stacked["modality"], num_modalities, stacked["is_value"])
    layout = AttentionLayout.build(stacked["document"], stacked["span"])
    values, next_values = {}, {}
    for m in sorted({m for r in rows for m in r["values"]}):
        dim = next(r["values"][m].shape[1] for r in rows if m in r["values"])
        values[m] = torch.from_numpy(np.concatenate([r["values"][m] for r in rows if m in r["values"]]))
        flat = np.concatenate([r["next_values"].get(m, np.zeros((seq, dim), np.float32)) for r in rows])
        start, end = plan.bounds(m)
        next_values[m] = torch.from_numpy(flat)[plan.order[start:end]]
    return Batch(plan=plan, layout=layout, values=values, next_values=next_values, **stacked)


class PackedStream:
    """Endless, deterministic, resumable stream of packed rows from weighted sources.

    Each source is read in a per-epoch random permutation. ``weight_unit`` says what a weight
    is a share of:
      - ``tokens`` (the convention of data mixtures): each source keeps its own current
        document, and each stretch of a row is taken from the source furthest below its share
        of the tokens read so far. Realized shares then stay within about a row of their
        targets at any step, whatever the seed and the document lengths, and consecutive rows
        (so every batch) mix sources, while a long document is still read to its end;
      - ``documents``: the next document's source is drawn at random by weight, and rows
        continue one document after another.
    """

    def __init__(
        self, sources: list[list[TokenDocument]], weights: list[float], seq_len: int, seed: int, shuffle: bool = True,
        extras: ExtrasSampler | None = None, weight_unit: str = "documents",
    ):
        """``extras``: fills ``Batch.extras`` from the stream's generator when a batch is built."""
        for docs in sources:
            if not docs:
                raise MotError("a training source has no documents")
        if weight_unit not in ("tokens", "documents"):
            raise ValueError(f"weight_unit must be 'tokens' or 'documents', got {weight_unit!r}")
        self.sources, self.seq_len, self.seed, self.shuffle = sources, seq_len, seed, shuffle
        self.extras = extras
        self.target_shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.mean_lengths = np.array([np.mean([len(d) for d in docs]) for docs in sources], dtype=np.float64)
        self.weights = torch.tensor(self.target_shares, dtype=torch.float64)
        self.weight_unit = weight_unit
        self.rng = torch.Generator().manual_seed(seed)
        self.epochs = [0] * len(sources)
        self.cursors = [0] * len(sources)
        self.current: tuple[int, int, int] | None = None  # documents: (source, doc index, token offset)
        self.open_documents: list[tuple[int, int] | None] = [None] * len(sources)  # tokens: (doc, offset) per source
        self.tokens_by_source = [0] * len(sources)
        self.tokens_by_modality: dict[int, int] = {}
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

    def _next_document(self, source: int | None = None) -> tuple[int, int]:
        if source is None:
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
            if self.weight_unit == "tokens":
                # the source furthest below its token share (ties: the first declared)
                source = int(np.argmin((np.asarray(self.tokens_by_source) + 1.0) / self.target_shares))
                if self.open_documents[source] is None:
                    self.open_documents[source] = (self._next_document(source)[1], 0)
                doc_index, offset = self.open_documents[source]
            else:
                if self.current is None:
                    self.current = (*self._next_document(), 0)
                source, doc_index, offset = self.current
            doc = self.sources[source][doc_index]
            taken = row.add(doc, offset)
            if not taken:  # a whole segment does not fit in what is left of the row
                row.pad()
                continue
            self.tokens_by_source[source] += taken
            for m, n in zip(*np.unique(doc.modality[offset : offset + taken], return_counts=True)):
                self.tokens_by_modality[int(m)] = self.tokens_by_modality.get(int(m), 0) + int(n)
            rest = None if offset + taken >= len(doc) else (doc_index, offset + taken)
            if self.weight_unit == "tokens":
                self.open_documents[source] = rest
            else:
                self.current = None if rest is None else (source, *rest)
        return row.arrays()

    def realized_shares(self) -> tuple[np.ndarray, dict[int, float]]:
        """Shares of the tokens read so far (padding excluded): per source, per modality index."""
        total = max(1, sum(self.tokens_by_source))
        by_source = np.asarray(self.tokens_by_source, dtype=np.float64) / total
        return by_source, {m: n / total for m, n in sorted(self.tokens_by_modality.items())}

    def next_batch(self, batch_size: int, num_modalities: int) -> Batch:
        batch = collate([self.next_row() for _ in range(batch_size)], num_modalities)
        if self.extras is not None:
            self.extras(batch, self.rng)
        return batch

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.get_state(),
            "epochs": list(self.epochs),
            "cursors": list(self.cursors),
            "current": None if self.current is None else list(self.current),
            "open_documents": [None if d is None else list(d) for d in self.open_documents],
            "tokens_by_source": list(self.tokens_by_source),
            "tokens_by_modality": dict(self.tokens_by_modality),
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.epochs, self.cursors = list(state["epochs"]), list(state["cursors"])
        self.current = None if state["current"] is None else tuple(state["current"])
        # saved before token shares existed: the document being read continues from its source
        opened = state.get("open_documents") or [None] * len(self.sources)
        if "open_documents" not in state and self.current is not None and self.weight_unit == "tokens":
            opened[self.current[0]] = self.current[1:]
        self.open_documents = [None if d is None else tuple(d) for d in opened]
        self.tokens_by_source = list(state.get("tokens_by_source", [0] * len(self.sources)))
        self.tokens_by_modality = {int(k): v for k, v in state.get("tokens_by_modality", {}).items()}


class _RowBuilder:
    def __init__(self, seq_len: int):
        self.seq_len, self.filled, self.chunks, self.segments = seq_len, 0, 0, 0
        self.fields = {k: np.empty(seq_len, dtype=np.int64)
                       for k in ("tokens", "modality", "positions", "document", "span", "targets", "segment")}
        self.fields["is_value"] = np.zeros(seq_len, dtype=bool)
        self.fields["has_next_value"] = np.zeros(seq_len, dtype=bool)
        self.fields["followed"] = np.zeros(seq_len, dtype=bool)
        self.values: dict[int, list[np.ndarray]] = {}
        self.next_values: dict[int, np.ndarray] = {}

    @property
    def full(self) -> bool:
        return self.filled == self.seq_len

    def _fits(self, doc: TokenDocument, offset: int) -> int:
        """How many tokens of doc[offset:] go into this row: as many as fit, except that a
        document with whole segments is not split if it fits in an empty row, and a cut never
        falls inside a whole segment (0: pad this row and start again in the next)."""
        space = self.seq_len - self.filled
        n = min(len(doc) - offset, space)
        if doc.whole is None or offset + n == len(doc):
            return n
        if offset == 0 and len(doc) <= self.seq_len:
            return 0
        inside = (doc.whole[:, 0] < offset + n) & (offset + n < doc.whole[:, 1])
        if inside.any():
            start, end = (int(v) for v in doc.whole[np.flatnonzero(inside)[0]])
            if end - start > self.seq_len:
                raise MotError(
                    f"a segment of {end - start} tokens must be packed whole but train.seq_len is {self.seq_len}; "
                    "raise train.seq_len (and model.max_seq_len) or make the segments shorter"
                )
            n = max(start - offset, 0)
        return n

    def pad(self) -> None:
        """Fill the rest of the row with padding: its own document, no targets, no values."""
        dst = slice(self.filled, self.seq_len)
        f = self.fields
        f["tokens"][dst] = 0
        f["modality"][dst] = 0
        f["positions"][dst] = np.arange(dst.stop - dst.start)
        f["document"][dst] = self.chunks
        f["span"][dst] = -1
        f["targets"][dst] = IGNORE
        f["segment"][dst] = self.segments
        self.segments += 1
        self.chunks += 1
        self.filled = self.seq_len

    def add(self, doc: TokenDocument, offset: int) -> int:
        """Copy doc[offset:] into the row as far as it may go; returns tokens taken."""
        n = self._fits(doc, offset)
        if not n:
            if not self.filled:  # an empty row: cannot happen unless a whole segment is too long
                raise MotError(f"a document cannot be packed into rows of {self.seq_len} tokens")
            return 0
        dst = slice(self.filled, self.filled + n)
        src = slice(offset, offset + n)
        f = self.fields
        f["tokens"][dst] = doc.ids[src]
        f["modality"][dst] = doc.modality[src]
        f["positions"][dst] = np.arange(n)
        f["document"][dst] = self.chunks
        f["span"][dst] = doc.span[src]
        f["targets"][dst] = doc.next_ids[src]  # the last one may be in the next row: still a target
        segment = doc.segment[src]
        f["segment"][dst] = self.segments + segment - segment[0]
        self.segments += int(segment[-1] - segment[0]) + 1
        if doc.followed is not None:
            f["followed"][dst] = doc.followed[src]
        if doc.values:
            self._add_values(doc, src, dst)
        self.filled += n
        self.chunks += 1
        return n

    def _add_values(self, doc: TokenDocument, src: slice, dst: slice) -> None:
        """Continuous values of doc[src] (contiguous rows of each modality's value array) and
        the next-value targets of its positions."""
        self.fields["is_value"][dst] = doc.is_value[src]
        rows, next_rows, modality = doc.value_index[src], doc.next_value_index[src], doc.modality[src]
        self.fields["has_next_value"][dst] = next_rows >= 0
        for m, table in doc.values.items():
            mine = rows[(modality == m) & (rows >= 0)]
            if mine.size:
                self.values.setdefault(m, []).append(table[mine[0] : mine[-1] + 1])
            targets = np.flatnonzero((modality == m) & (next_rows >= 0))
            if targets.size:
                buffer = self.next_values.setdefault(m, np.zeros((self.seq_len, table.shape[1]), np.float32))
                buffer[dst.start + targets] = table[next_rows[targets]]

    def arrays(self) -> dict:
        """(S,) arrays per field, plus ``values`` (modality -> (V, input_dim)) and
        ``next_values`` (modality -> (S, input_dim))."""
        return {
            **self.fields,
            "values": {m: np.concatenate(chunks) for m, chunks in self.values.items()},
            "next_values": self.next_values,
        }


def fixed_batches(docs: list[TokenDocument], batch_size: int, seq_len: int, max_batches: int, num_modalities: int,
                  extras: ExtrasSampler | None = None) -> list[Batch]:
    """Validation batches, the same every time, spread over the WHOLE held-out set.

    The documents are put in one fixed-seed random order (sources often store them grouped by
    kind) and read as one stream; the rows of the budget (``max_batches`` x ``batch_size``)
    start at evenly spaced tokens of that stream. So a budget smaller than the split samples
    every part of it, long documents included (not just the first rows of the first ones),
    and a budget as large as the split reads all of it once. A document with whole segments
    (images) is read from its start, so its row may repeat the end of the row before."""
    if not docs:
        raise MotError("the validation split has no documents")
    ordered = [docs[i] for i in np.random.default_rng(0).permutation(len(docs))]
    lengths = np.array([len(d) for d in ordered], dtype=np.int64)
    total_tokens = int(lengths.sum())
    rows_available = max(1, total_tokens // seq_len)
    n_batches = max(1, min(max_batches, rows_available // batch_size))
    rows_per_batch = min(batch_size, rows_available)
    n_rows = n_batches * rows_per_batch
    starts = np.cumsum(np.concatenate([[0], lengths]))
    stream = PackedStream([ordered], [1.0], seq_len, seed=0, shuffle=False, extras=extras)
    rows = []
    for row in range(n_rows):
        token = row * total_tokens // n_rows  # spacing >= seq_len: rows never overlap
        doc = int(np.searchsorted(starts, token, side="right") - 1)
        offset = token - int(starts[doc])
        if ordered[doc].whole is not None:
            offset = 0  # never start inside a whole segment: read the document from its start
        stream.current = (0, doc, offset)
        stream.epochs[0], stream.cursors[0] = divmod(doc + 1, len(ordered))
        rows.append(stream.next_row())
    batches = []
    for first in range(0, n_rows, rows_per_batch):
        batch = collate(rows[first : first + rows_per_batch], num_modalities)
        if extras is not None:
            extras(batch, stream.rng)
        batches.append(batch)
    return batches
