"""From tokenized documents to packed batches.

Documents, tokenized once by their modalities into the global vocabulary (and read from shards
or memory through a ``DocumentStore``), are packed into fixed-length rows: a document cut at
the end of a row continues in the next row of its lane. Segments of modalities that keep them whole (an image denoised as one) are never cut: a
document holding one starts a fresh row when it does not fit in what is left of the row (if it
fits in a row at all), a longer one is cut only between such segments, and the rest of the
row is padding (its own document, no loss anywhere). Each row carries, per token: global id, modality id, RoPE position (restarting
per document chunk), document id (attention never crosses documents), bidirectional span id
(-1 = causal), segment id, whether it carries a continuous value, and the next-token target
(-100 where the document ends or the next position carries a value). Continuous values travel
per modality, in batch order, next to the ids; losses may add per-position extras (noise,
timesteps) drawn from each lane's generator when the batch is built.

``PackedStream`` is deterministic given its seed and its ``state_dict`` fully describes its
position, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from mot_core.data.stores import DocumentStore, EpochOrder, as_store
from mot_core.data.vocabulary import TokenDocument, Vocabulary
from mot_core.errors import MotError
from mot_core.model.attention import AttentionLayout
from mot_core.model.memory import available_bytes, gigabytes
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

    def scored_mask(self) -> torch.Tensor:
        """(B, S) bool: positions some loss scores (a next-token target, a continuous value to
        denoise, or a next value to predict)."""
        scored = self.targets != IGNORE
        for extra in (self.is_value, self.has_next_value):
            if extra is not None:
                scored = scored | extra
        return scored

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
            next_values, has_next_value = self.next_values.get(index), None
            if index in self.next_values:
                has_next_value = has_next[start:end]
            elif vocab.modalities[name].input_dim is not None:
                # a continuous modality's markers without any of its values in the batch (a row
                # cut after a span): no position has a next value, and its loss still runs
                width = vocab.modalities[name].input_dim
                next_values = torch.zeros(end - start, width, device=targets.device)
                has_next_value = torch.zeros(end - start, dtype=torch.bool, device=targets.device)
            piece = ModalitySlice(
                index, vocab.offsets[name], targets[start:end],
                segment=None if segment is None else segment[start:end],
                num_values=plan.num_values(index),
                values=self.values.get(index),
                next_values=next_values,
                has_next_value=has_next_value,
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


# What one lane costs the packer: its position and generator (about 3.3 KB measured, rounded up)
# and, each step, its row's fields (int64 and bool arrays of seq_len) twice: built and collated.
LANE_BYTES = 4096
ROW_BYTES_PER_POSITION = 2 * (7 * 8 + 3)


def check_lanes_fit(lanes: int, seq_len: int) -> None:
    """A one-line MotError, before a lane is made, when ``lanes`` rows of ``seq_len`` positions
    (a batch: train.batch_size rows) cannot fit in this machine's free memory."""
    need = lanes * (LANE_BYTES + ROW_BYTES_PER_POSITION * seq_len)
    free = available_bytes(torch.device("cpu"))
    if free is not None and need > free:
        raise MotError(f"a batch of {lanes:,} rows of {seq_len:,} positions needs about {gigabytes(need)} for the data "
                       f"packer alone (its lanes and rows) and this machine has {gigabytes(free)} free; lower "
                       "train.batch_size or train.seq_len")


class PackedStream:
    """Endless, deterministic, resumable stream of packed batches from weighted sources.

    The stream runs in ``lanes`` (one per row of the global batch): row r of every batch is
    the next row of lane r, and lane r reads only the documents at positions r, r + lanes,
    r + 2 lanes, ... of each source's ``EpochOrder``. Lanes share nothing, so a data-parallel
    worker builds only the lanes of its rows (``owned``), reading only its share of the data,
    and the global batch is the same whatever the number of workers. Loss extras (noise,
    timesteps) are drawn per row from the lane's own generator for the same reason.

    ``weight_unit`` says what a weight is a share of:
      - ``tokens`` (the convention of data mixtures): each lane keeps one open document per
        source, and each stretch of a row is taken from the source furthest below its share
        of the tokens the lane has read. Realized shares stay within about a row of their
        targets, every batch mixes sources, and a long document is still read to its end;
      - ``documents``: the next document's source is drawn at random by weight, and a lane's
        rows continue one document after another.

    The position is a few integers per lane and source (documents taken, the open document
    and its offset) and each lane's generator state: ``state_dict`` is small whatever the
    corpus, and a resumed run sees exactly the batches of the uninterrupted run.
    """

    def __init__(
        self, sources: list[DocumentStore | list[TokenDocument]], weights: list[float], seq_len: int, seed: int,
        lanes: int = 1, owned: range | None = None, shuffle: bool = True, extras: ExtrasSampler | None = None,
        weight_unit: str = "documents",
    ):
        """``owned``: the lanes this process builds (default all); ``extras``: fills
        ``Batch.extras`` of one row's batch from the lane's generator."""
        self.sources = [as_store(s) for s in sources]
        for store in self.sources:
            if not len(store):
                raise MotError("a training source has no documents")
        if weight_unit not in ("tokens", "documents"):
            raise ValueError(f"weight_unit must be 'tokens' or 'documents', got {weight_unit!r}")
        self.seq_len, self.seed, self.shuffle, self.lanes = seq_len, seed, shuffle, lanes
        self.owned = range(lanes) if owned is None else owned
        check_lanes_fit(len(self.owned), seq_len)
        self.extras = extras
        self.target_shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.mean_lengths = np.array([s.total_tokens() / len(s) for s in self.sources], dtype=np.float64)
        self.weights = torch.tensor(self.target_shares, dtype=torch.float64)
        self.weight_unit = weight_unit
        self.orders = [EpochOrder(s.block_sizes, seed, i, shuffle, s.chunk_docs, random_access=s.random_access)
                       for i, s in enumerate(self.sources)]
        self._lanes = {lane: _Lane.start(lane, seed, len(self.sources)) for lane in self.owned}
        self._open: OrderedDict[tuple[int, int], TokenDocument] = OrderedDict()

    def _document(self, lane: "_Lane", source: int, taken: int) -> tuple[int, TokenDocument]:
        """The lane's ``taken``-th document of ``source``: (document index, document)."""
        epoch, position = divmod(lane.index + taken * self.lanes, len(self.orders[source]))
        index = self.orders[source].document(epoch, position)
        key = (source, index)
        doc = self._open.get(key)
        if doc is None:
            doc = self.sources[source][index]
            self._open[key] = doc
            if len(self._open) > len(self._lanes) * len(self.sources) + 4:  # the documents the lanes have open
                self._open.popitem(last=False)
        return index, doc

    def _next_row(self, lane: "_Lane") -> dict[str, np.ndarray]:
        row = _RowBuilder(self.seq_len)
        while not row.full:
            if self.weight_unit == "tokens":
                # the source furthest below its token share (ties: the first declared)
                source = int(np.argmin((np.asarray(lane.tokens_by_source) + 1.0) / self.target_shares))
                if lane.open[source] is None:
                    lane.open[source] = (lane.taken[source], 0)
                    lane.taken[source] += 1
                taken, offset = lane.open[source]
            else:
                if lane.current is None:
                    source = int(torch.multinomial(self.weights, 1, generator=lane.rng)) if len(self.sources) > 1 else 0
                    lane.current = (source, lane.taken[source], 0)
                    lane.taken[source] += 1
                source, taken, offset = lane.current
            _, doc = self._document(lane, source, taken)
            count = row.add(doc, offset)
            if not count:  # a whole segment does not fit in what is left of the row
                row.pad()
                continue
            lane.tokens_by_source[source] += count
            for m, n in zip(*np.unique(doc.modality[offset : offset + count], return_counts=True)):
                lane.tokens_by_modality[int(m)] = lane.tokens_by_modality.get(int(m), 0) + int(n)
            rest = None if offset + count >= len(doc) else (taken, offset + count)
            if self.weight_unit == "tokens":
                lane.open[source] = rest
            else:
                lane.current = None if rest is None else (source, *rest)
        return row.arrays()

    def realized_shares(self) -> tuple[np.ndarray, dict[int, float]]:
        """Shares of the tokens this process's lanes read so far (padding excluded): per
        source, per modality index."""
        by_source, by_modality = self.token_counts()
        total = max(1, int(by_source.sum()))
        return by_source / total, {m: n / total for m, n in sorted(by_modality.items())}

    def token_counts(self) -> tuple[np.ndarray, dict[int, int]]:
        """Tokens read so far by this process's lanes: per source, per modality index."""
        by_source = np.zeros(len(self.sources), dtype=np.float64)
        by_modality: dict[int, int] = {}
        for lane in self._lanes.values():
            by_source += lane.tokens_by_source
            for m, n in lane.tokens_by_modality.items():
                by_modality[m] = by_modality.get(m, 0) + n
        return by_source, by_modality

    def next_row(self) -> dict[str, np.ndarray]:
        """The next row of a stream that builds one lane."""
        if len(self.owned) != 1:
            raise ValueError(f"next_row() reads a one-lane stream; this one builds {len(self.owned)} lanes")
        return self._next_row(self._lanes[self.owned[0]])

    def next_batch(self, num_modalities: int) -> Batch:
        """The next rows of this process's lanes, as one batch."""
        lanes = [self._lanes[i] for i in self.owned]
        rows = [self._next_row(lane) for lane in lanes]
        batch = collate(rows, num_modalities)
        if self.extras is not None:
            drawn = []
            for lane, row in zip(lanes, rows):
                single = collate([row], num_modalities)
                self.extras(single, lane.rng)
                drawn.append(single)
            batch.extras = merge_row_extras(batch, drawn)
        return batch

    def state_dict(self) -> dict:
        """Each owned lane's position, keyed by lane index (workers' dicts merge by update)."""
        return {"format": "lanes/1", "lanes": {lane.index: lane.state() for lane in self._lanes.values()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != "lanes/1":
            raise MotError(
                "this checkpoint's data-stream position was saved by an earlier version of the packer (all "
                "documents in memory); continue it with that version, or start a new run.dir (model.warm_start "
                "can copy its weights)"
            )
        missing = [i for i in self._lanes if i not in state["lanes"] and str(i) not in state["lanes"]]
        if missing:
            raise MotError(f"the checkpoint's data-stream position has no lane {missing[0]}; it was saved by a run "
                           f"with another train.batch_size")
        for index, lane in self._lanes.items():
            lane.load(state["lanes"].get(index, state["lanes"].get(str(index))))

    def preview_shares(self, rows_per_lane: int) -> tuple[np.ndarray, dict[int, float]]:
        """The token shares (per source, per modality index) of this process's next
        ``rows_per_lane`` rows of every lane, read from a copy: this stream does not move."""
        probe = PackedStream(self.sources, list(self.target_shares), self.seq_len, self.seed, self.lanes, self.owned,
                             self.shuffle, None, self.weight_unit)
        probe.load_state_dict(self.state_dict())
        for lane in probe._lanes.values():
            lane.tokens_by_source = [0] * len(self.sources)
            lane.tokens_by_modality = {}
            for _ in range(rows_per_lane):
                probe._next_row(lane)
        return probe.realized_shares()


@dataclass
class _Lane:
    """One lane's position: documents taken per source, the open document of each source
    (``tokens``: (taken index, offset)) or the current one (``documents``: (source, taken
    index, offset)), token counts, and the generator of its draws."""

    index: int
    rng: torch.Generator
    taken: list[int]
    open: list[tuple[int, int] | None]
    current: tuple[int, int, int] | None
    tokens_by_source: list[int]
    tokens_by_modality: dict[int, int]

    @staticmethod
    def start(index: int, seed: int, num_sources: int) -> "_Lane":
        lane_seed = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)
        return _Lane(index, torch.Generator().manual_seed(lane_seed), [0] * num_sources, [None] * num_sources, None,
                     [0] * num_sources, {})

    def state(self) -> dict:
        return {
            "rng": self.rng.get_state(), "taken": list(self.taken),
            "open": [None if o is None else list(o) for o in self.open],
            "current": None if self.current is None else list(self.current),
            "tokens_by_source": list(self.tokens_by_source), "tokens_by_modality": dict(self.tokens_by_modality),
        }

    def load(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.taken = list(state["taken"])
        self.open = [None if o is None else tuple(o) for o in state["open"]]
        self.current = None if state["current"] is None else tuple(state["current"])
        self.tokens_by_source = list(state["tokens_by_source"])
        self.tokens_by_modality = {int(k): int(v) for k, v in state["tokens_by_modality"].items()}


def merge_row_extras(batch: Batch, rows: list[Batch]) -> dict[int, dict[str, torch.Tensor]]:
    """Loss extras drawn for each one-row batch -> the extras of the batch of those rows, in
    its modality-sorted slice order (each row's slice lists its token positions before its
    value positions, as the batch's does over all rows: a scatter, not a concatenation)."""
    seq = batch.tokens.shape[1]
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for m in range(batch.plan.num_modalities):
        start, end = batch.plan.bounds(m)
        parts = [(r, row.extras[m]) for r, row in enumerate(rows) if m in row.extras]
        if start == end or not parts:
            continue
        rank = torch.empty(batch.tokens.numel(), dtype=torch.long)
        rank[batch.plan.order[start:end]] = torch.arange(end - start)
        out: dict[str, torch.Tensor] = {}
        for r, extras in parts:
            row_start, row_end = rows[r].plan.bounds(m)
            where = rank[rows[r].plan.order[row_start:row_end] + r * seq]
            for key, value in extras.items():
                if key not in out:
                    out[key] = value.new_zeros((end - start, *value.shape[1:]))
                out[key][where] = value
        merged[m] = out
    return merged


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


class ValidationBatches(list):
    """The validation batches (a list of ``Batch``) and what they cover.

    ``source_tokens``: per source (in the order given) (held-out positions its documents
    hold, positions the rows read; a position read twice counts twice, up to the total). ``modality_positions``: per modality
    index, the positions scored (with a target)."""

    source_tokens: list[tuple[int, int]]
    modality_positions: dict[int, int]


def fixed_batches(sources: list[DocumentStore | list[TokenDocument]] | list[TokenDocument], batch_size: int, seq_len: int,
                  max_batches: int | None, num_modalities: int, extras: ExtrasSampler | None = None,
                  sampling: str = "per_source") -> ValidationBatches:
    """Validation batches, the same every time, spread over the WHOLE held-out set of every
    source.

    ``sampling``:
      - ``mixed``: the documents of all sources are put in one fixed-seed random order and read
        as one stream; the rows of the budget (``max_batches`` x ``batch_size``) start at evenly
        spaced tokens of that stream. Each source is scored in proportion to its held-out size,
        so a small source next to a large one gets few rows.
      - ``per_source``: the budget's rows are shared out equally between the sources (a source
        with fewer held-out tokens than its share reads all of them, and the rest goes to the
        others), and each source's rows are spread over its own stream in the same way. Every
        source, and so every modality, is scored on a fixed sample of its own held-out data,
        whatever the other sources' sizes.

    Either way a budget smaller than a stream samples every part of it, long documents
    included. Only the documents the rows read are loaded. A document with whole segments
    (images) is read from its start, so its row may repeat the end of the row before.

    ``max_batches`` None: every held-out position, once (``mot eval --full``): each stream's
    documents are packed one after the other as training packs them (a whole segment that does
    not fit what is left of a row starts the next one), however the documents fill the rows."""
    if sampling not in ("mixed", "per_source"):
        raise MotError(f"validation sampling {sampling!r}: use mixed or per_source")
    if sources and isinstance(sources[0], TokenDocument):  # the documents of one source
        sources = [sources]
    stores = [as_store(s) for s in sources]
    if not sum(len(s) for s in stores):
        raise MotError("the validation split has no documents")
    streams = [list(range(len(stores)))] if sampling == "mixed" else [[i] for i in range(len(stores)) if len(stores[i])]
    held = [store.total_tokens() for store in stores]
    totals = [sum(held[i] for i in stream) for stream in streams]
    rows: list = []
    read = np.zeros(len(stores), dtype=np.int64)
    if max_batches is None:
        for stream in streams:
            rows.extend(_every_row([stores[i] for i in stream], seq_len, read, stream))
    else:
        shares = _share_rows(max_batches * batch_size, [max(1, total // seq_len) for total in totals], batch_size)
        for stream, n_rows in zip(streams, shares):
            rows.extend(_stream_rows([stores[i] for i in stream], n_rows, seq_len, read, stream))
    rows_per_batch = min(batch_size, len(rows))
    generator = torch.Generator().manual_seed(0)
    batches = ValidationBatches()
    for start in range(0, len(rows), rows_per_batch):
        batch = collate(rows[start : start + rows_per_batch], num_modalities)
        if extras is not None:
            extras(batch, generator)
        batches.append(batch)
    # a row may re-read the end of the row before (whole segments, --full): at most all of it
    batches.source_tokens = [(held[i], int(min(read[i], held[i]))) for i in range(len(stores))]
    batches.modality_positions = scored_positions(batches, num_modalities)
    return batches


def _share_rows(budget: int, available: list[int], batch_size: int) -> list[int]:
    """Rows per stream: with one stream, whole batches of its available rows (as many as the
    budget allows, at least one batch's worth or all it has); with several, equal shares of
    the budget, each capped at what its stream holds, the rest shared among the others."""
    if len(available) == 1:
        rows = available[0]
        per_batch = min(batch_size, rows)
        return [max(1, min(budget // per_batch, rows // per_batch)) * per_batch]
    shares = [0] * len(available)
    open_streams = list(range(len(available)))
    left = budget
    while left > 0 and open_streams:
        each = max(1, left // len(open_streams))
        for i in list(open_streams):
            give = min(each, available[i] - shares[i], left)
            shares[i] += give
            left -= give
            if shares[i] >= available[i]:
                open_streams.remove(i)
            if left == 0:
                break
    return [max(1, share) for share in shares]


def _every_row(stores: list[DocumentStore], seq_len: int, read: np.ndarray, indices: list[int]) -> list:
    """Every document of the stores (in turn, in their order) packed into rows of ``seq_len``:
    each position read once; a row ends with padding only where the next whole segment does
    not fit. Adds what each store's documents gave to ``read[indices[k]]``."""
    rows = []
    row = _RowBuilder(seq_len)
    for k, store in enumerate(stores):
        for index in range(len(store)):
            doc, offset = store[index], 0
            while offset < len(doc):
                count = row.add(doc, offset)
                if count:
                    read[indices[k]] += count
                    offset += count
                else:
                    row.pad()
                if row.full:
                    rows.append(row.arrays())
                    row = _RowBuilder(seq_len)
    if row.filled:
        row.pad()
        rows.append(row.arrays())
    return rows


def _stream_rows(stores: list[DocumentStore], n_rows: int, seq_len: int, read: np.ndarray, indices: list[int]) -> list:
    """``n_rows`` rows of ``seq_len`` starting at evenly spaced tokens of one stream: the
    documents of ``stores`` in one fixed-seed random order. Adds what each store's documents
    gave to ``read[indices[k]]``."""
    counts = [len(s) for s in stores]
    first = np.concatenate([[0], np.cumsum(counts)])
    ordered = np.random.default_rng(0).permutation(int(first[-1]))  # index into the stores' documents, in turn
    lengths = np.concatenate([s.lengths() for s in stores])[ordered]
    store_of_rank = np.searchsorted(first, ordered, side="right") - 1

    def document(rank: int) -> TokenDocument:
        index = int(ordered[rank % len(ordered)])
        store = int(store_of_rank[rank % len(ordered)])
        return stores[store][index - int(first[store])]

    total_tokens = int(lengths.sum())
    starts = np.cumsum(np.concatenate([[0], lengths]))
    rows = []
    for row_index in range(n_rows):
        token = row_index * total_tokens // n_rows  # spacing >= seq_len within the budget: no overlap
        rank = int(np.searchsorted(starts, token, side="right") - 1)
        doc = document(rank)
        offset = 0 if doc.whole is not None else token - int(starts[rank])  # never start inside a whole segment
        row = _RowBuilder(seq_len)
        while not row.full:
            count = row.add(doc, offset)
            if not count:
                row.pad()
                continue
            read[indices[int(store_of_rank[rank % len(ordered)])]] += count
            offset += count
            if offset >= len(doc):
                rank, offset = rank + 1, 0
                doc = document(rank)
        rows.append(row.arrays())
    return rows


def scored_positions(batches: list[Batch], num_modalities: int) -> dict[int, int]:
    """Positions with a target (token or value) per modality index, over ``batches``."""
    totals = torch.zeros(num_modalities, dtype=torch.long)
    for batch in batches:
        scored = batch.scored_mask()
        totals += torch.bincount(batch.modality.reshape(-1)[scored.reshape(-1)], minlength=num_modalities)[:num_modalities]
    return {m: int(count) for m, count in enumerate(totals.tolist()) if count}
