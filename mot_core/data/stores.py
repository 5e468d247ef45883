"""Where packing reads tokenized documents from, and in which order.

A ``DocumentStore`` is random access to the tokenized documents of one source and split:
``len``, ``store[i]`` -> ``TokenDocument``, ``lengths()`` and ``block_sizes``. The documents
sit in memory (``DocumentList``: small held-out sets, tests, the conformance check) or in
memory-mapped shards on disk or in an object store (``shards.ShardedDocuments``), read one
document at a time: memory does not grow with the corpus.

``EpochOrder`` is the order a source is read in, a two-level shuffle: each epoch visits chunks
of consecutive documents in a random order and the documents of each chunk in a random order.
It needs memory for a table of at most 2^20 chunks and the permutations of the few chunks being
read, not a permutation of the corpus (10^9 documents would take 8 GB per worker), and it is a
function of (seed, source, epoch, position), so a stream's position is two integers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol, Sequence

import numpy as np

from mot_core.data.vocabulary import TokenDocument


class DocumentStore(Protocol):
    block_sizes: Sequence[int]  # documents per block (shard), in stored order
    chunk_docs: int | None  # the shuffle's chunk (None: whole blocks, for stores read a block at a time)

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> TokenDocument: ...

    def lengths(self) -> np.ndarray:
        """(N,) int64 positions of each document."""
        ...

    def total_tokens(self) -> int: ...


class DocumentList:
    """Tokenized documents held in memory, one block."""

    def __init__(self, docs: list[TokenDocument]):
        self.docs = list(docs)
        self.block_sizes = [len(self.docs)]
        self.chunk_docs = 1  # in memory: a full permutation

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int) -> TokenDocument:
        return self.docs[index]

    def lengths(self) -> np.ndarray:
        return np.array([len(d) for d in self.docs], dtype=np.int64)

    def total_tokens(self) -> int:
        return int(sum(len(d) for d in self.docs))


def as_store(docs: "DocumentStore | list[TokenDocument]") -> DocumentStore:
    return DocumentList(docs) if isinstance(docs, (list, tuple)) else docs


class EpochOrder:
    """Position ``i`` of epoch ``e`` -> document index, for one source.

    Each epoch visits the chunks of the source in a random order and the documents of each
    chunk in a random order. A chunk is a run of at most ``chunk_docs`` consecutive documents
    of one block (shard), so documents stored together (a source's parts: emoji, then digits)
    are spread over the whole epoch, not read one block after the other. The chunk table
    holds at most ``MAX_CHUNKS`` entries (chunks grow for larger corpora): memory is bounded
    whatever the corpus. ``chunk_docs=None`` keeps whole blocks (a store that reads a block at
    a time, as from an object store). ``shuffle=False`` reads the documents in stored order."""

    MAX_CHUNKS = 1 << 20

    def __init__(self, block_sizes: Sequence[int], seed: int, source: int, shuffle: bool = True,
                 chunk_docs: int | None = 64, cached_chunks: int = 64):
        sizes = np.asarray(block_sizes, dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(sizes)])[:-1]
        self.count = int(sizes.sum())
        if chunk_docs is not None and self.count:
            chunk = max(chunk_docs, -(-self.count // self.MAX_CHUNKS))
            per_block = -(-sizes // chunk)
            starts = np.repeat(first, per_block) + chunk * (np.arange(int(per_block.sum())) -
                                                            np.repeat(np.cumsum(per_block) - per_block, per_block))
            ends = np.minimum(starts + chunk, np.repeat(first + sizes, per_block))
            self.first, self.sizes = starts, ends - starts
        else:
            self.first, self.sizes = first, sizes
        self.seed, self.source, self.shuffle = seed, source, shuffle
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # epoch, chunk order, its cumulative sizes
        self._rows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = cached_chunks

    def __len__(self) -> int:
        return self.count

    def document(self, epoch: int, position: int) -> int:
        if not self.shuffle:
            return position
        if self._epoch is None or self._epoch[0] != epoch:
            chunks = np.random.default_rng([self.seed, self.source, epoch]).permutation(len(self.sizes))
            self._epoch = (epoch, chunks, np.cumsum(self.sizes[chunks]))
        _, chunks, ends = self._epoch
        rank = int(np.searchsorted(ends, position, side="right"))
        chunk = int(chunks[rank])
        row = position - int(ends[rank] - self.sizes[chunk])
        if self.sizes[chunk] == 1:
            return int(self.first[chunk])
        key = (epoch, chunk)
        rows = self._rows.get(key)
        if rows is None:
            rows = np.random.default_rng([self.seed, self.source, epoch, chunk]).permutation(int(self.sizes[chunk]))
            self._rows[key] = rows
            if len(self._rows) > self._cached:
                self._rows.popitem(last=False)
        else:
            self._rows.move_to_end(key)
        return int(self.first[chunk]) + int(rows[row])
