"""Shards in an object store (a real S3 server, SeaweedFS on loopback): opening a split reads
one listing, a shard's footer is read when the shard is first used, and a document costs one
range read of its record batch; the documents are those of the same shards on disk; a shard
deleted mid-run is one line naming it."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from mot_core import filesystems
from mot_core.data import PackedStream
from mot_core.data.shards import ShardedDocuments, ShardWriter, Fingerprints, write_index
from mot_core.errors import MotError
from test_continuous_modality import ramp_documents, ramp_vocab


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for variable, value in s3_server.env().items():
        monkeypatch.setenv(variable, value)
    filesystems.configure(None, None)
    yield s3_server
    filesystems.configure(None, None)


def _write(root: str, documents: int, shard_tokens: int):
    vocab = ramp_vocab()
    raw = (ramp_documents(10) * (documents // 10 + 1))[:documents]
    prints = Fingerprints("v", {}, "s")
    writer = ShardWriter(root, "ramp", "train", 0, prints, shard_tokens=shard_tokens)
    for first in range(0, len(raw), 50):
        writer.add(vocab.encode_documents(raw[first:first + 50], "ramp"), len(raw[first:first + 50]))
    shards = writer.finish()
    return vocab, write_index(root, "ramp", "train", prints, 1, shards, vocab.names)


def test_remote_shards_are_read_a_record_batch_at_a_time(s3_env, tmp_path):
    root = f"s3://{s3_env.bucket}/shards-{uuid.uuid4().hex[:8]}"
    vocab, index = _write(root, 2000, shard_tokens=6000)
    _, local_index = _write(str(tmp_path), 2000, shard_tokens=6000)
    assert len(index["shards"]) >= 3
    remote = ShardedDocuments(root, "ramp", "train", index, vocab.expand)
    local = ShardedDocuments(str(tmp_path), "ramp", "train", local_index, vocab.expand)
    assert not remote.local and not remote.random_access and remote.chunk_docs == 64
    assert (remote.reads.bytes, remote.reads.requests) == (0, 1)  # one listing: sizes checked, nothing read

    for i in (0, 1999, 1000, 63, 64):
        assert np.array_equal(remote.encoded(i).ids, local.encoded(i).ids)
    # 5 documents in 4 distinct batches of 3 shards: 3 footers and 4 batches, a small part of the shards
    assert remote.reads.bytes < 0.25 * remote.shard_bytes, (remote.reads.bytes, remote.shard_bytes)
    before = remote.reads.bytes
    remote.encoded(2)  # in a batch already fetched
    assert remote.reads.bytes == before
    assert remote.lengths().tolist() == local.lengths().tolist()  # from the footers alone


def test_a_stream_over_remote_shards_reads_only_its_chunks(s3_env):
    root = f"s3://{s3_env.bucket}/stream-{uuid.uuid4().hex[:8]}"
    vocab, index = _write(root, 4000, shard_tokens=20000)
    store = ShardedDocuments(root, "ramp", "train", index, vocab.expand)
    stream = PackedStream([store], [1.0], seq_len=32, seed=0, lanes=4)
    for _ in range(3):
        stream.next_batch(len(vocab.names))
    # 4 lanes, each in one chunk (a record batch) of a shuffled order: a few batches, not the corpus
    assert store.reads.bytes < 0.1 * store.shard_bytes, (store.reads.bytes, store.shard_bytes)


def test_a_shard_deleted_mid_run_is_one_line_naming_it(s3_env):
    root = f"s3://{s3_env.bucket}/deleted-{uuid.uuid4().hex[:8]}"
    vocab, index = _write(root, 600, shard_tokens=4000)
    store = ShardedDocuments(root, "ramp", "train", index, vocab.expand)
    store.encoded(0)
    last = index["shards"][-1]["file"]
    fs, path = filesystems.resolve(f"{root}/ramp/train/{last}", "data.dir")
    fs.delete_file(path)
    with pytest.raises(MotError) as error:
        store.encoded(len(store) - 1)
    message = str(error.value)
    assert "\n" not in message and "mot data tokenize CONFIG --force" in message, message
    assert f"shard {root}/ramp/train/{last} cannot be read (it is gone: deleted or moved since the run started)" in message
    assert s3_env.secret_key not in message
