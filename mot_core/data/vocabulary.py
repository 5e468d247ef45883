"""The run's global vocabulary, and documents tokenized into it.

Every modality owns a contiguous range of one global id space (its embedding rows and
output-head rows). ``Vocabulary.tokenize`` turns raw documents into flat ``TokenDocument``
arrays, encoding each modality's segments in one batch call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mot_core.errors import MotError, one_per_item, plugin_boundary
from mot_core.plugin_api import CONTINUOUS, IGNORE_INDEX, ContinuousSegment, Modality, RawDocument, origin


@dataclass(frozen=True)
class TokenDocument:
    """A tokenized document, flat. Arrays are (L,) unless noted.

    Attributes:
        ids: int64 global ids; a placeholder (0) at positions that carry continuous values.
        modality: int64 modality index.
        span: int64 bidirectional span id within the document, -1 = causal.
        segment: int64 index of the segment each position comes from (None: all 0).
        is_value: bool, True where the position carries a continuous value (None: none do).
        values: modality index -> (V_m, input_dim_m) float32 values of that modality's
            continuous positions, in document order.
        followed: bool, True where the position's segment is followed by another segment of
            the document (None: none is).
        whole: (K, 2) int64 [start, end) of the segments packing must not cut (None: none).
    Derived (computed once): ``next_ids`` (the next-token target of each position, IGNORE at
    the end and before a continuous position), ``value_index`` (row in ``values[modality]``,
    -1 for token positions) and ``next_value_index`` (the row of the next position's value
    when it is a continuous position of the same modality, else -1).
    """

    ids: np.ndarray
    modality: np.ndarray
    span: np.ndarray
    segment: np.ndarray | None = None
    is_value: np.ndarray | None = None
    values: dict[int, np.ndarray] = field(default_factory=dict)
    followed: np.ndarray | None = None
    whole: np.ndarray | None = None

    def __post_init__(self) -> None:
        length = len(self.ids)
        if self.segment is None:
            object.__setattr__(self, "segment", np.zeros(length, dtype=np.int64))
        next_ids = np.full(length, IGNORE_INDEX, dtype=np.int64)
        next_ids[:-1] = self.ids[1:]
        value_index = np.full(length, -1, dtype=np.int64)
        next_value_index = np.full(length, -1, dtype=np.int64)
        if self.is_value is not None and self.is_value.any():
            next_ids[:-1][self.is_value[1:]] = IGNORE_INDEX
            for m in self.values:
                positions = np.flatnonzero(self.is_value & (self.modality == m))
                value_index[positions] = np.arange(positions.size)
            follows = self.is_value[1:] & (self.modality[1:] == self.modality[:-1])
            next_value_index[:-1] = np.where(follows, value_index[1:], -1)
        object.__setattr__(self, "next_ids", next_ids)
        object.__setattr__(self, "value_index", value_index)
        object.__setattr__(self, "next_value_index", next_value_index)

    def __len__(self) -> int:
        return len(self.ids)


class DamagedDocument(MotError):
    """An ``EncodedDocument`` that no tokenizer of this vocabulary could have written (ids
    outside their segment's modality, a segment table that does not add up): the message says
    what is wrong; a reader of shards re-raises it naming the shard and the fix."""


@dataclass(frozen=True)
class EncodedDocument:
    """A document as the shards store it: everything else is derived from the vocabulary.

    Attributes:
        ids: (L,) int32 global ids; -1 where the position carries a continuous value.
        seg_modality: (K,) int16 modality index (vocabulary order) of each segment.
        seg_length: (K,) int32 positions of each segment (0 for a segment encoded empty).
        values: (sum of V_k * input_dim_k,) float32, the continuous values of every segment,
            flattened in document order.
    """

    ids: np.ndarray
    seg_modality: np.ndarray
    seg_length: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class Vocabulary:
    """The run's modalities in mixture order and the global id range each owns."""

    def __init__(self, modalities: dict[str, Modality]):
        self.modalities = modalities
        self.names = list(modalities)
        self.marker_host = self._marker_hosts()
        self.offsets: dict[str, int] = {}
        total = 0
        for name, modality in modalities.items():
            self.offsets[name] = total
            total += _checked_vocab_size(name, modality)
        self.size = total
        # per modality index, for ``check_encoded``: (first id, end of its ids, values per
        # continuous position: 0 for a modality without any)
        self._ranges = [(self.offsets[n], self.offsets[n] + int(modalities[n].vocab_size),
                         int(modalities[n].input_dim or 0)) for n in self.names]

    def _marker_hosts(self) -> dict[str, int]:
        """name -> index of the modality that processes its token ids (itself unless it names
        a ``marker_modality``, which must be a discrete modality of the mixture)."""
        hosts = {}
        for index, (name, modality) in enumerate(self.modalities.items()):
            host = modality.marker_modality
            if host is None:
                hosts[name] = index
                continue
            if host not in self.modalities:
                raise MotError(
                    f"modality '{name}' hands its markers to modality '{host}', which the mixture does not declare "
                    f"(declared: {', '.join(self.names)})"
                )
            if self.modalities[host].input_dim is not None or self.modalities[host].marker_modality is not None:
                raise MotError(f"modality '{name}' hands its markers to '{host}', which must be a discrete modality")
            hosts[name] = self.names.index(host)
        return hosts

    def index(self, name: str) -> int:
        return self.names.index(name)

    def token_modality(self) -> torch.Tensor:
        """(size,) long: the modality index that processes each global id (a marker's host)."""
        table = torch.empty(self.size, dtype=torch.long)
        for name in self.names:
            table[self.offsets[name] : self.offsets[name] + self.modalities[name].vocab_size] = self.marker_host[name]
        return table

    def tokenize(self, docs: list[RawDocument], source: str) -> list[TokenDocument]:
        """Encode every segment (batched per modality); ids and continuous values are checked
        against the modality's vocabulary and ``input_dim``. Documents that encode to nothing
        are left out."""
        return [self.expand(doc) for doc in self.encode_documents(docs, source)]

    def encode_documents(self, docs: list[RawDocument], source: str) -> list[EncodedDocument]:
        """Documents in the compact form the shards store (``EncodedDocument``); documents that
        encode to nothing are left out."""
        encoded = self._encode_all(docs, source)
        out = []
        for doc_index, doc in enumerate(docs):
            ids, seg_modality, seg_length, values = [], [], [], []
            for seg_index, segment in enumerate(doc.segments):
                local, seg_values = encoded[doc_index, seg_index]
                ids.append(np.where(local == CONTINUOUS, -1, local + self.offsets[segment.modality]))
                seg_modality.append(self.index(segment.modality))
                seg_length.append(local.size)
                if seg_values is not None and seg_values.shape[0]:
                    values.append(seg_values.reshape(-1))
            if sum(seg_length):
                out.append(EncodedDocument(
                    np.concatenate(ids).astype(np.int32), np.asarray(seg_modality, dtype=np.int16),
                    np.asarray(seg_length, dtype=np.int32),
                    np.concatenate(values) if values else np.zeros(0, dtype=np.float32),
                ))
        return out

    def check_encoded(self, doc: EncodedDocument) -> np.ndarray:
        """(L,) int64 ids of ``doc``; raises ``DamagedDocument`` unless ``doc`` is what
        ``encode_documents`` of this vocabulary writes: one modality per segment (a known
        index), non-negative segment lengths that add up to the ids (L,), every id inside its
        segment's modality's range ``[offset, offset + vocab_size)`` or -1 where that modality
        is continuous, and as many values as its continuous positions take (V * input_dim).
        Vectorised: a few passes over the ids (per-segment minimum and maximum), then a look
        at continuous segments only; no Python loop over positions."""
        ids = doc.ids
        if ids.ndim != 1 or doc.seg_modality.ndim != 1 or doc.seg_length.ndim != 1 or doc.values.ndim != 1:
            raise DamagedDocument("its columns are not flat arrays")
        # the segment table is a handful of entries: Python lists beat numpy calls on them
        modalities, lengths = doc.seg_modality.tolist(), doc.seg_length.tolist()
        if len(modalities) != len(lengths):
            raise DamagedDocument(f"its segment table holds {len(modalities)} modalities for {len(lengths)} lengths")
        for index in modalities:
            if not 0 <= index < len(self.names):
                raise DamagedDocument(f"a segment names modality {index}; the vocabulary has {len(self.names)}")
        if lengths and min(lengths) < 0:
            raise DamagedDocument(f"a segment has length {min(lengths)}")
        if sum(lengths) != ids.size:
            raise DamagedDocument(f"its segment lengths add up to {sum(lengths)} positions but it holds {ids.size} "
                                  "ids")
        ids = ids.astype(np.int64)
        starts, sizes, segments, position = [], [], [], 0  # of the segments that hold positions
        for index, size in zip(modalities, lengths):
            if size:
                starts.append(position)
                sizes.append(size)
                segments.append(index)
            position += size
        # each segment's lowest and highest id (one pass over the ids each, whatever the
        # segments): a discrete segment inside its range needs nothing more; continuous
        # segments (-1 at their value positions) and any outside are looked at position by position
        if len(starts) == 1:
            low, high = [int(ids.min())], [int(ids.max())]
        else:
            low = np.minimum.reduceat(ids, starts).tolist() if starts else []
            high = np.maximum.reduceat(ids, starts).tolist() if starts else []
        values = 0
        for k, index in enumerate(segments):
            first, end, width = self._ranges[index]
            if not width and first <= low[k] and high[k] < end:
                continue
            here = ids[starts[k]:starts[k] + sizes[k]]
            continuous = here == CONTINUOUS if width else np.zeros(here.size, dtype=bool)
            outside = ((here < first) | (here >= end)) & ~continuous
            if outside.any():
                at = int(np.argmax(outside))
                raise DamagedDocument(f"id {int(here[at])} at position {starts[k] + at} lies outside modality "
                                      f"'{self.names[index]}' ids [{first}, {end})")
            values += int(continuous.sum()) * width
        if values != doc.values.size:
            raise DamagedDocument(f"its continuous positions take {values} values but it holds {doc.values.size}")
        return ids

    def expand(self, doc: EncodedDocument) -> TokenDocument:
        """The compact form -> the flat per-position arrays packing reads (vectorized per
        segment: a document holds a handful of segments). The document is checked first
        (``check_encoded``): a damaged one raises ``DamagedDocument``, never trains on ids
        of another modality or indexes past an embedding."""
        ids = self.check_encoded(doc)
        length = ids.size
        value_mask = ids < 0
        has_values = bool(value_mask.any())
        seg_of = np.repeat(np.arange(doc.seg_length.size, dtype=np.int64), doc.seg_length)
        modality = np.empty(length, dtype=np.int64)
        span = np.full(length, -1, dtype=np.int64)
        values: dict[int, list[np.ndarray]] = {}
        whole, start, value_start = [], 0, 0
        for seg_index, (index, size) in enumerate(zip(doc.seg_modality.tolist(), doc.seg_length.tolist())):
            name = self.names[index]
            module = self.modalities[name]
            here = slice(start, start + size)
            mask = value_mask[here]
            modality[here] = np.where(mask, index, self.marker_host[name])
            if module.bidirectional:
                # markers of a modality read by another one are causal, as in generation
                span[here] = np.where(mask | (module.marker_modality is None), seg_index, -1)
            count = int(mask.sum())
            if count:
                width = module.input_dim
                values.setdefault(index, []).append(
                    doc.values[value_start : value_start + count * width].reshape(count, width))
                value_start += count * width
            if module.keep_segments_whole and size:
                whole.append((start, start + size))
            start += size
        last_segment = doc.seg_length.size - 1
        return TokenDocument(
            np.where(value_mask, 0, ids), modality, span, seg_of,
            value_mask if has_values else None,
            {m: np.concatenate(v) for m, v in values.items()},
            followed=seg_of < last_segment if last_segment > 0 else None,
            whole=np.array(whole, dtype=np.int64) if whole else None,
        )

    def _encode_all(self, docs: list[RawDocument], source: str) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]]:
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
            modality = self.modalities[name]
            where = f"{origin(modality)}: modality '{name}', encode (dataset '{source}')"
            with plugin_boundary(where):
                results = modality.encode_batch(payloads)
            results = one_per_item(results, len(payloads), f"{where}: encode_batch", "results", "payloads",
                                   "expected one per payload")
            for key, result in zip(keys, results):
                encoded[key] = _checked_encoding(result, modality, where)
        return encoded


def _checked_vocab_size(name: str, modality: Modality) -> int:
    where = f"{origin(modality)}: modality '{name}', vocab_size"
    with plugin_boundary(where):
        size = modality.vocab_size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise MotError(f"{where} is {size!r} ({type(size).__name__}); expected an integer >= 1 (its number of token ids)")
    return int(size)


def _checked_encoding(result, modality: Modality, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One ``encode`` result -> (local ids (L,) int64, values (V, input_dim) float32 or None),
    or a one-line ``MotError`` saying what is wrong with it."""
    input_dim = modality.input_dim
    values = None
    if isinstance(result, ContinuousSegment):
        if input_dim is None:
            raise MotError(f"{where} returned continuous values but declares no input_dim")
        ids, values = result.ids, result.values
    else:
        ids = result
    if not isinstance(ids, torch.Tensor):
        shown = "None" if ids is None else type(ids).__name__
        raise MotError(f"{where} returned {shown}; expected a 1-D integer torch tensor of token ids "
                       "(or a ContinuousSegment)")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise MotError(f"{where}: encode returned ids of dtype {ids.dtype}; token ids must be an integer tensor")
    if ids.dim() != 1:
        raise MotError(f"{where}: encode returned ids of shape {tuple(ids.shape)}; expected a 1-D tensor")
    if not ids.numel() and not modality.may_encode_empty:
        raise MotError(f"{where}: encode returned no ids for a segment; a segment must encode to at least one "
                       "token (set may_encode_empty = True on the modality if an empty segment is meant)")
    ids = ids.detach().cpu().numpy().astype(np.int64)
    n_values = int((ids == CONTINUOUS).sum())
    tokens = ids[ids != CONTINUOUS]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= modality.vocab_size):
        bad = int(tokens.max() if tokens.max() >= modality.vocab_size else tokens.min())
        raise MotError(f"{where} produced token id {bad}, outside its vocabulary of {modality.vocab_size}")
    if values is None:
        if n_values and input_dim is None:  # a discrete modality: -1 is just an id below 0
            raise MotError(f"{where} produced token id {CONTINUOUS}, outside its vocabulary of {modality.vocab_size} "
                           f"(ids are 0..{modality.vocab_size - 1}; {CONTINUOUS} marks a continuous position, "
                           "which only a modality with input_dim returns, in a ContinuousSegment)")
        if n_values:
            raise MotError(f"{where} marked {n_values} positions continuous but returned no values "
                           "(return a ContinuousSegment(ids, values))")
        return ids, None
    if not isinstance(values, torch.Tensor):
        raise MotError(f"{where}: continuous values must be a torch tensor, got {type(values).__name__}")
    if not values.is_floating_point():
        raise MotError(f"{where}: continuous values must be a floating-point tensor, got dtype {values.dtype}")
    if values.dim() != 2 or values.shape != (n_values, input_dim):
        raise MotError(
            f"{where}: continuous values have shape {tuple(values.shape)}, expected ({n_values}, input_dim={input_dim}) "
            f"(one row per continuous position)"
        )
    values = values.detach().to(torch.float32).cpu().numpy()
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        raise MotError(f"{where}: continuous value row {row} holds NaN or inf")
    return ids, values
