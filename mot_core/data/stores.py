"""Where packing reads tokenized documents from, and in which order.

A ``DocumentStore`` is random access to the tokenized documents of one source and split:
``len``, ``store[i]`` -> ``TokenDocument``, ``lengths()`` and ``block_sizes``. The documents
sit in memory (``DocumentList``: small held-out sets, tests, the conformance check) or in
memory-mapped shards on disk or in an object store (``shards.ShardedDocuments``), read one
document at a time: memory does not grow with the corpus.

``EpochOrder`` is the order a source is read in: a permutation of its documents per epoch up to
2^24 documents (64 MB), and above that a two-level shuffle of chunks of consecutive documents
and of the documents of each chunk, whose table holds at most 2^20 chunks (a permutation of 10^9
documents would take 4 GB per worker). It is a function of (seed, source, epoch, position), so a
stream's position is two integers.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, Sequence

import numpy as np

from mot_core.data.vocabulary import TokenDocument


class DocumentStore(Protocol):
    block_sizes: Sequence[int]  # documents per block (shard), in stored order
    chunk_docs: int | None  # the shuffle's chunk (None: whole blocks, for stores read a block at a time)
    random_access: bool  # False: reading a document fetches its chunk; shuffle chunks, never all documents

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
        self.random_access = True

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

    A source of up to ``FULL_PERMUTATION`` documents (2^24: 64 MB as int32) is read in one
    random permutation per epoch, as an in-memory dataset would be. A larger one visits chunks
    in a random order and the documents of each chunk in a random order: a chunk is a run of at
    least ``chunk_docs`` consecutive documents of one block (shard), and the chunk table holds at
    most ``MAX_CHUNKS`` entries (chunks grow with the corpus), so memory is bounded whatever the
    corpus. (Documents stored in order, such as digits by class, then stay together within a
    chunk: shuffle a very large corpus when writing it, as its sources usually are.) A store
    without random access (an object store, read a record batch at a time) is always read chunk
    by chunk, whatever its size; ``chunk_docs=None`` keeps whole blocks (shards read whole).
    ``shuffle=False`` reads the documents in stored order.

    Lanes cross an epoch boundary at different steps, so the packer asks for two epochs in turn
    for a while: the orders of the two newest epochs are kept (``EPOCHS_KEPT``), and each is
    built once. A large source's next order (a permutation of 2^24 documents takes about a second
    here) is built in a background thread once a lane is three quarters through the epoch, so no
    step waits for it (numpy releases the GIL while it shuffles)."""

    MAX_CHUNKS = 1 << 20
    FULL_PERMUTATION = 1 << 24  # up to this many documents: one permutation of all of them (int32, 64 MB)
    EPOCHS_KEPT = 2  # the epochs lanes are in at once: every lane is in epoch e or e + 1
    PREFETCH_FROM = 1 << 16  # documents from which the next epoch's order is built ahead, in the background

    def __init__(self, block_sizes: Sequence[int], seed: int, source: int, shuffle: bool = True,
                 chunk_docs: int | None = 64, cached_chunks: int = 64, random_access: bool = True):
        sizes = np.asarray(block_sizes, dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(sizes)])[:-1]
        self.count = int(sizes.sum())
        self.full = random_access and chunk_docs is not None and self.count <= self.FULL_PERMUTATION
        self.rebuilt = 0  # epoch orders built (a measure of thrashing at epoch boundaries)
        if self.full:
            self.first = self.sizes = None  # no chunk table: every document is its own chunk
        elif chunk_docs is not None and self.count:
            chunk = max(chunk_docs, -(-self.count // self.MAX_CHUNKS))
            per_block = -(-sizes // chunk)
            starts = np.repeat(first, per_block) + chunk * (np.arange(int(per_block.sum())) -
                                                            np.repeat(np.cumsum(per_block) - per_block, per_block))
            ends = np.minimum(starts + chunk, np.repeat(first + sizes, per_block))
            self.first, self.sizes = starts, ends - starts
        else:
            self.first, self.sizes = first, sizes
        self.seed, self.source, self.shuffle = seed, source, shuffle
        # epoch -> its document permutation, or (chunk order, its cumulative sizes)
        self._epochs: OrderedDict[int, tuple] = OrderedDict()
        self._next: tuple[int, Future] | None = None  # the next epoch's order, being built in the background
        self._rows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = cached_chunks

    def __len__(self) -> int:
        return self.count

    def document(self, epoch: int, position: int) -> int:
        if not self.shuffle:
            return position
        if self.full:
            return int(self._order(epoch, position)[0][position])
        chunks, ends = self._order(epoch, position)
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

    def _order(self, epoch: int, position: int) -> tuple:
        found = self._epochs.get(epoch)
        if found is not None:
            self._epochs.move_to_end(epoch)
        else:
            ahead = self._next
            found = ahead[1].result() if ahead is not None and ahead[0] == epoch else self._build(epoch)
            self._epochs[epoch] = found
            if len(self._epochs) > self.EPOCHS_KEPT:
                self._epochs.popitem(last=False)
        following = epoch + 1
        if (self.count >= self.PREFETCH_FROM and 4 * position >= 3 * self.count and following not in self._epochs
                and (self._next is None or self._next[0] < following)):
            self._next = (following, _background().submit(self._build, following))
        return found

    def _build(self, epoch: int) -> tuple:
        """Epoch ``epoch``'s document permutation, or its chunk order and cumulative sizes."""
        self.rebuilt += 1
        rng = np.random.default_rng([self.seed, self.source, epoch])
        if self.full:
            return (rng.permutation(self.count).astype(np.int32),)
        chunks = rng.permutation(len(self.sizes))
        return chunks, np.cumsum(self.sizes[chunks])


_BUILDER: ThreadPoolExecutor | None = None


def _background() -> ThreadPoolExecutor:
    """One thread that builds epoch orders ahead, shared by every source of the process."""
    global _BUILDER
    if _BUILDER is None:
        _BUILDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-order")
    return _BUILDER
