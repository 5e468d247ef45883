"""Where packing reads tokenized documents from, and in which order.

A ``DocumentStore`` is random access to the tokenized documents of one source and split:
``len``, ``store[i]`` -> ``TokenDocument``, ``lengths()`` and ``block_sizes``. The documents
sit in memory (``DocumentList``: small held-out sets, tests, the conformance check) or in
memory-mapped shards on disk or in an object store (``shards.ShardedDocuments``), read one
document at a time: memory does not grow with the corpus.

``EpochOrder`` is the order a source is read in, a two-level shuffle: each epoch visits the
blocks (shards) in a random order and the documents of each block in a random order. It needs
memory for one permutation of the blocks and of the few blocks being read, not of the corpus
(a global permutation of 10^9 documents would take 8 GB per worker), and it is a function of
(seed, source, epoch, position), so a stream's position is two integers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol, Sequence

import numpy as np

from mot_core.data.vocabulary import TokenDocument


class DocumentStore(Protocol):
    block_sizes: Sequence[int]

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

    ``shuffle=False`` reads the documents in stored order."""

    def __init__(self, block_sizes: Sequence[int], seed: int, source: int, shuffle: bool = True, cached_blocks: int = 8):
        self.sizes = np.asarray(block_sizes, dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.sizes)])  # first document of each stored block
        self.count = int(self.first[-1])
        self.seed, self.source, self.shuffle = seed, source, shuffle
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # epoch, block order, its cumulative sizes
        self._rows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_blocks = cached_blocks

    def __len__(self) -> int:
        return self.count

    def document(self, epoch: int, position: int) -> int:
        if not self.shuffle:
            return position
        if self._epoch is None or self._epoch[0] != epoch:
            blocks = np.random.default_rng([self.seed, self.source, epoch]).permutation(len(self.sizes))
            self._epoch = (epoch, blocks, np.cumsum(self.sizes[blocks]))
        _, blocks, ends = self._epoch
        rank = int(np.searchsorted(ends, position, side="right"))
        block = int(blocks[rank])
        row = position - int(ends[rank] - self.sizes[block])
        key = (epoch, block)
        rows = self._rows.get(key)
        if rows is None:
            rows = np.random.default_rng([self.seed, self.source, epoch, block]).permutation(int(self.sizes[block]))
            self._rows[key] = rows
            if len(self._rows) > self._cached_blocks:
                self._rows.popitem(last=False)
        else:
            self._rows.move_to_end(key)
        return int(self.first[block]) + int(rows[row])
