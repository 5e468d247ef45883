"""Tokenized shards: what they store, how they resume, and every way they can be wrong.

Shards round-trip every field packing reads (ids, modalities, spans, segments, continuous
values, whole segments); ``mot data tokenize`` continues after the shards an interrupted run
finished and writes the same bytes as an uninterrupted one; training refuses shards that do
not match (truncated, missing, another index, another tokenizer, a changed source) with one
line naming the shard and the fix, before anything trains.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, tiny_config_dict
from mot_core.data.shards import ShardedDocuments, ShardWriter, Fingerprints, write_index, read_index
from test_continuous_modality import ramp_documents, ramp_vocab


def test_shards_round_trip_every_field_packing_reads(tmp_path):
    vocab = ramp_vocab()
    raw = ramp_documents(7)
    expected = vocab.tokenize(raw, "ramp")
    prints = Fingerprints("v", {}, "s")
    writer = ShardWriter(str(tmp_path), "ramp", "train", 0, prints, shard_tokens=20)  # several shards
    for start in range(0, len(raw), 3):
        chunk = raw[start : start + 3]
        writer.add(vocab.encode_documents(chunk, "ramp"), len(chunk))
    shards = writer.finish()
    assert len(shards) > 1
    index = write_index(str(tmp_path), "ramp", "train", prints, 1, shards, vocab.names)
    store = ShardedDocuments(str(tmp_path), "ramp", "train", index, vocab.expand)
    assert len(store) == len(expected) and store.total_tokens() == sum(len(d) for d in expected)
    assert store.lengths().tolist() == [len(d) for d in expected]
    for got, want in zip((store[i] for i in range(len(store))), expected):
        for field in ("ids", "modality", "span", "segment", "is_value", "followed", "whole", "next_ids", "value_index",
                      "next_value_index"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None) == (b is None) and (a is None or np.array_equal(a, b)), field
        assert got.values.keys() == want.values.keys()
        assert all(np.array_equal(got.values[m], want.values[m]) for m in want.values)


def _write(tmp_path: Path, corpus: Path, name: str = "run", **data) -> Path:
    config = tiny_config_dict(corpus, tmp_path / name, steps=2, eval_every=0, checkpoint_every=0)
    config["data"] = {"shard_tokens": 2000, "encode_batch_documents": 4, **data}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _mot(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mot_core.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600, env={**os.environ, **(env or {})})


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.arrow"))}


_INTERRUPT = """
import sys
from mot_core.data import vocabulary
calls, stop_at = [0], int(sys.argv[1])
original = vocabulary.Vocabulary.encode_documents
def encode_documents(self, docs, source):
    calls[0] += 1
    if calls[0] == stop_at:
        import os
        os._exit(137)  # as kill -9 would: no cleanup
    return original(self, docs, source)
vocabulary.Vocabulary.encode_documents = encode_documents
from mot_core.cli import main
sys.exit(main(["data", "tokenize", sys.argv[2]]))
"""


def test_an_interrupted_tokenize_continues_and_writes_the_same_shards(tmp_path, text_corpus):
    """One file cut into paragraphs: one part of many documents, interrupted after a few shards."""
    book = tmp_path / "book"
    book.mkdir()
    (book / "book.txt").write_text("\n\n".join(p.read_text() for p in sorted(text_corpus.glob("*.txt"))))

    def write(name: str) -> Path:
        path = _write(tmp_path, book, name)
        data = yaml.safe_load(path.read_text())
        data["mixture"]["datasets"]["text_files"]["options"]["split_documents"] = "paragraphs"
        path.write_text(yaml.safe_dump(data))
        return path

    clean = write("clean")
    result = _mot("data", "tokenize", str(clean))
    assert result.returncode == 0, result.stderr
    assert "text_files/train:" in result.stdout and "shards in" in result.stdout
    again = _mot("data", "tokenize", str(clean))
    assert again.returncode == 0 and "already tokenized" in again.stdout

    killed = write("killed")
    script = tmp_path / "interrupt.py"
    script.write_text(_INTERRUPT)
    stopped = subprocess.run([sys.executable, str(script), "9", str(killed)], cwd=ROOT, capture_output=True, text=True)
    assert stopped.returncode == 137
    train_folder = tmp_path / "killed" / "tokens" / "text_files" / "train"
    progress = json.loads((train_folder / "part-00000.json").read_text())
    assert progress["shards"] and not progress["done"] and not (train_folder / "index.json").exists()
    kept = _shard_bytes(train_folder)
    resumed = _mot("data", "tokenize", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing after {progress['documents_read']} documents already in shards" in resumed.stdout
    clean_folder = tmp_path / "clean" / "tokens" / "text_files" / "train"
    final = _shard_bytes(train_folder)
    assert all(final[name] == data for name, data in kept.items())  # finished shards were kept as they were
    assert final == _shard_bytes(clean_folder)
    index, clean_index = (json.loads((f / "index.json").read_text()) for f in (train_folder, clean_folder))
    assert index["shards"] == clean_index["shards"]


def _damage_cases():
    def truncate(folder: Path, corpus: Path) -> None:
        shard = sorted(folder.glob("*.arrow"))[0]
        shard.write_bytes(shard.read_bytes()[:-100])

    def remove(folder: Path, corpus: Path) -> None:
        sorted(folder.glob("*.arrow"))[-1].unlink()

    def foreign_index(folder: Path, corpus: Path) -> None:
        index = json.loads((folder / "index.json").read_text())
        index["shards"][0]["documents"] += 1
        (folder / "index.json").write_text(json.dumps(index))

    def edit_source(folder: Path, corpus: Path) -> None:
        file = sorted(corpus.glob("*.txt"))[0]
        file.write_text(file.read_text() + "\nOne more line.\n")

    def not_arrow(folder: Path, corpus: Path) -> None:
        shard = sorted(folder.glob("*.arrow"))[0]
        shard.write_bytes(b"x" * shard.stat().st_size)

    return [
        ("truncated", truncate, r"shard .*part-00000-00000\.arrow has \d+ bytes where its index says \d+ \(truncated or replaced\); run `mot data tokenize CONFIG --force`"),
        ("missing", remove, r"shard .*part-\d+-\d+\.arrow is missing; run `mot data tokenize CONFIG --force` to write them again"),
        ("index", foreign_index, r"train/index\.json is damaged \(its shards hold \d+ documents where it says \d+\); "
                                 r"run `mot data tokenize CONFIG --force`"),
        ("source", edit_source, r"dataset 'text_files' has changed since it was tokenized into .*mot data tokenize CONFIG --force"),
        ("garbage", not_arrow, r"shard .*part-00000-00000\.arrow cannot be read .*; run `mot data tokenize CONFIG --force`"),
    ]


@pytest.mark.parametrize("case,damage,message", _damage_cases(), ids=[c[0] for c in _damage_cases()])
def test_shards_that_do_not_match_are_refused_in_one_line_before_training(tmp_path, text_corpus, case, damage, message):
    import re
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(text_corpus, corpus)
    config = _write(tmp_path, corpus)
    assert _mot("data", "tokenize", str(config)).returncode == 0
    damage(tmp_path / "run" / "tokens" / "text_files" / "train", corpus)
    result = _mot("train", str(config))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()
    if case in ("source", "index", "missing"):  # the fix the line names works
        assert _mot("data", "tokenize", str(config), "--force").returncode == 0
        assert _mot("train", str(config)).returncode == 0


def test_shards_of_another_tokenizer_are_refused_in_a_shared_data_dir(tmp_path, text_corpus):
    shared = tmp_path / "shared_tokens"
    first = _write(tmp_path, text_corpus, "first", dir=str(shared))
    assert _mot("train", str(first)).returncode == 0
    data = yaml.safe_load(first.read_text())
    data["run"]["dir"] = str(tmp_path / "second")
    data["mixture"]["modalities"]["text"]["options"]["vocab_size"] = 320
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump(data))
    result = _mot("train", str(second))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: the shards in {shared}/text_files/train were written by another tokenizer of modality 'text'; they "
        f"would give wrong ids. run `mot data tokenize CONFIG --force` to write them again (they are in {shared})"
    )
    assert not (tmp_path / "second" / "metrics.jsonl").exists()


def test_tokenize_as_a_ray_data_job_writes_the_same_shards(tmp_path, text_corpus):
    local = _write(tmp_path, text_corpus, "local")
    on_ray = _write(tmp_path, text_corpus, "ray")
    assert _mot("data", "tokenize", str(local)).returncode == 0
    # the same tokenizer for both: the Ray job must reproduce the local shards byte for byte
    (tmp_path / "ray" / "state").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "local" / "state" / "text", tmp_path / "ray" / "state" / "text")
    result = _mot("data", "tokenize", str(on_ray), "--address", "local")
    assert result.returncode == 0, result.stderr[-3000:]
    for split in ("train", "val"):
        a, b = (tmp_path / name / "tokens" / "text_files" / split for name in ("local", "ray"))
        assert _shard_bytes(a) == _shard_bytes(b)
        assert read_index(str(tmp_path / "ray" / "tokens"), "text_files", split)["shards"] == \
            read_index(str(tmp_path / "local" / "tokens"), "text_files", split)["shards"]


def test_shards_written_before_record_batches_read_the_same(tmp_path):
    """Shards of the first layout (one record batch, no lengths in the footer) still open and
    give the same documents: tokenized data kept from earlier versions trains as it did."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from mot_core.data import shards as layout

    vocab = ramp_vocab()
    raw = ramp_documents(7)
    prints = Fingerprints("v", {}, "s")
    writer = ShardWriter(str(tmp_path), "ramp", "train", 0, prints, shard_tokens=10_000)
    writer.add(vocab.encode_documents(raw, "ramp"), len(raw))
    shards = writer.finish()
    index = write_index(str(tmp_path), "ramp", "train", prints, 1, shards, vocab.names)
    current = ShardedDocuments(str(tmp_path), "ramp", "train", index, vocab.expand)
    expected = [current.encoded(i) for i in range(len(current))]

    path = tmp_path / "ramp" / "train" / shards[0]["file"]
    table = ipc.open_file(pa.memory_map(str(path))).read_all().combine_chunks()
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, layout.SCHEMA) as old:  # one batch, no footer metadata
        old.write_batch(table.to_batches()[0])
    path.write_bytes(sink.getvalue().to_pybytes())
    old_index = dict(index, shards=[{k: v for k, v in shards[0].items() if k not in ("batch_documents", "footer_crc32")}
                                    | {"bytes": path.stat().st_size}])
    store = ShardedDocuments(str(tmp_path), "ramp", "train", old_index, vocab.expand)
    assert store.lengths().tolist() == current.lengths().tolist()
    for got, want in zip((store.encoded(i) for i in range(len(store))), expected):
        assert all(np.array_equal(getattr(got, f), getattr(want, f)) for f in ("ids", "seg_modality", "seg_length", "values"))


def test_a_shard_of_many_documents_is_read_a_record_batch_at_a_time(tmp_path):
    """A shard holds record batches of BATCH_DOCUMENTS documents and every length in its
    footer: lengths come from the footer alone, and a document read fetches its batch only."""
    from mot_core.data.shards import BATCH_DOCUMENTS

    vocab = ramp_vocab()
    raw = (ramp_documents(10) * 15)[:150]  # words stay inside the tiny vocabulary
    prints = Fingerprints("v", {}, "s")
    writer = ShardWriter(str(tmp_path), "ramp", "train", 0, prints, shard_tokens=1 << 30)  # one shard
    writer.add(vocab.encode_documents(raw, "ramp"), len(raw))
    shards = writer.finish()
    assert len(shards) == 1 and shards[0]["batch_documents"] == BATCH_DOCUMENTS
    index = write_index(str(tmp_path), "ramp", "train", prints, 1, shards, vocab.names)
    store = ShardedDocuments(str(tmp_path), "ramp", "train", index, vocab.expand)
    expected = vocab.tokenize(raw, "ramp")
    assert store.lengths().tolist() == [len(d) for d in expected] and not store._batches  # footer only
    for i in (149, 0, 77, 128):
        assert np.array_equal(store[i].ids, expected[i].ids)
    assert sorted(store._batches) == [(0, 0), (0, 1), (0, 2)]  # 150 documents: batches of 64, 64 and 22


def _ramp_split(tmp_path: Path, documents: int = 150):
    """One shard of ramp documents (150: record batches of 64, 64 and 22) -> (vocabulary,
    index, the shard's path)."""
    vocab = ramp_vocab()
    raw = (ramp_documents(10) * 15)[:documents]
    prints = Fingerprints("v", {}, "s")
    writer = ShardWriter(str(tmp_path), "ramp", "train", 0, prints, shard_tokens=1 << 30)
    writer.add(vocab.encode_documents(raw, "ramp"), len(raw))
    shards = writer.finish()
    index = write_index(str(tmp_path), "ramp", "train", prints, 1, shards, vocab.names)
    return vocab, index, tmp_path / "ramp" / "train" / shards[0]["file"]


def _replace(path: Path, data: bytes) -> None:
    """A new file under the shard's name: stores that mapped the old one keep reading it."""
    path.with_suffix(".tmp").write_bytes(data)
    os.replace(path.with_suffix(".tmp"), path)


def _without_checksums(path: Path, index: dict) -> dict:
    """The shard rewritten as shards were before batch checksums (lengths alone in its footer);
    returns the index with its new size (and still whatever else the index records)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from mot_core.data.shards import LENGTHS_KEY

    reader = ipc.open_file(pa.memory_map(str(path)))
    batches = [reader.get_batch(b) for b in range(reader.num_record_batches)]
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, reader.schema, metadata={LENGTHS_KEY: reader.metadata[LENGTHS_KEY]}) as writer:
        for batch in batches:
            writer.write_batch(batch)
    _replace(path, sink.getvalue().to_pybytes())
    return dict(index, shards=[dict(index["shards"][0], bytes=path.stat().st_size)])


def test_a_record_batch_is_checked_the_first_time_it_is_read_and_only_it(tmp_path, monkeypatch):
    from mot_core.data import shards as layout
    from mot_core.errors import MotError
    from test_shard_damage import _buffers

    vocab, index, path = _ramp_split(tmp_path)
    assert index["shards"][0]["footer_crc32"] >= 0
    hashed = []
    real = layout.batch_checksum
    monkeypatch.setattr(layout, "batch_checksum", lambda columns: hashed.append(columns[0][0].size - 1) or real(columns))
    store = ShardedDocuments(str(tmp_path), "ramp", "train", index, vocab.expand)
    store.lengths()
    assert hashed == []  # opening reads footers: nothing hashed
    store[0], store[5], store[63]
    assert hashed == [64]  # batch 0, once
    store[149]
    assert hashed == [64, 22]
    store._batches.clear()  # evicted: a mapped batch checked by this process is not hashed again
    store[1]
    assert hashed == [64, 22]

    # batch 1's ids moved in place (the same ids, so in the vocabulary): batches 0 and 2 still read
    data = bytearray(path.read_bytes())
    _, _, at, size = _buffers(path, 0)[1]
    data[at:at + size] = np.roll(np.frombuffer(bytes(data[at:at + size]), dtype="<i4"), 1).tobytes()
    _replace(path, bytes(data))
    damaged = ShardedDocuments(str(tmp_path), "ramp", "train", index, vocab.expand)
    damaged[0], damaged[149]
    with pytest.raises(MotError) as error:
        damaged[100]
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"shard {path}: record batch 1 does not match its checksum"), message
    assert message.endswith("run `mot data tokenize CONFIG --force` to write them again")


def test_shards_written_before_checksums_read_unchecked(tmp_path):
    vocab, index, path = _ramp_split(tmp_path)
    expected = [ShardedDocuments(str(tmp_path), "ramp", "train", index, vocab.expand).encoded(i) for i in range(150)]
    old = _without_checksums(path, index)
    old["shards"][0].pop("footer_crc32")
    store = ShardedDocuments(str(tmp_path), "ramp", "train", old, vocab.expand)
    for i in (0, 70, 149):
        got = store.encoded(i)
        assert all(np.array_equal(getattr(got, f), getattr(expected[i], f)) for f in ("ids", "seg_length", "values"))
        assert np.array_equal(store[i].ids, vocab.expand(expected[i]).ids)
    assert store._shard(0).checksums is None


@pytest.mark.parametrize("case", ["footer altered", "checksums lost"])
def test_a_footer_that_does_not_match_its_index_is_refused(tmp_path, case):
    from mot_core.errors import MotError

    vocab, index, path = _ramp_split(tmp_path)
    if case == "footer altered":
        index = dict(index, shards=[dict(index["shards"][0], footer_crc32=index["shards"][0]["footer_crc32"] ^ 1)])
        expected = "has a footer that does not match its index's checksum"
    else:
        index = _without_checksums(path, index)
        expected = "has lost the checksums its index records"
    with pytest.raises(MotError, match=expected) as error:
        ShardedDocuments(str(tmp_path), "ramp", "train", index, vocab.expand)
    assert str(error.value).startswith(f"shard {path} ") and "mot data tokenize CONFIG --force" in str(error.value)


def test_documents_no_tokenizer_wrote_are_refused_when_expanded():
    from mot_core.data.vocabulary import DamagedDocument, EncodedDocument

    vocab = ramp_vocab()  # words: ids [0, 20); ramp: id 20 (its marker), and continuous positions of 3 values
    good = vocab.encode_documents(ramp_documents(1), "ramp")[0]  # words 1 2 | marker v v v | word 7
    assert good.ids.tolist() == [1, 2, 20, -1, -1, -1, 7] and good.seg_length.tolist() == [2, 4, 1]

    def doc(**changes) -> EncodedDocument:
        fields = {f: getattr(good, f).copy() for f in ("ids", "seg_modality", "seg_length", "values")}
        for name, change in changes.items():
            change(fields[name])
        return EncodedDocument(**fields)

    def put(position, value):
        def change(array):
            array[position] = value
        return change

    cases = [
        (doc(ids=put(0, 20)), r"id 20 at position 0 lies outside modality 'words' ids \[0, 20\)"),
        (doc(ids=put(2, 21)), r"id 21 at position 2 lies outside modality 'ramp' ids \[20, 21\)"),
        (doc(ids=put(6, -1)), r"id -1 at position 6 lies outside modality 'words'"),  # -1: continuous modalities only
        (doc(ids=put(2, -1)), r"its continuous positions take 12 values but it holds 9"),
        (doc(seg_length=put(2, 2)), r"its segment lengths add up to 8 positions but it holds 7 ids"),
        (doc(seg_length=put(0, -1)), r"a segment has length -1"),
        (doc(seg_modality=put(1, 2)), r"a segment names modality 2; the vocabulary has 2"),
        (EncodedDocument(good.ids, good.seg_modality[:2], good.seg_length, good.values),
         r"its segment table holds 2 modalities for 3 lengths"),
        (EncodedDocument(good.ids, good.seg_modality, good.seg_length, good.values[:-1]),
         r"its continuous positions take 9 values but it holds 8"),
    ]
    for damaged, message in cases:
        with pytest.raises(DamagedDocument, match=message):
            vocab.expand(damaged)
    assert vocab.expand(good).ids.tolist() == [1, 2, 20, 0, 0, 0, 7]


def test_damaged_index_and_progress_files_are_one_line_naming_them(tmp_path):
    from mot_core.errors import MotError

    vocab, index, _ = _ramp_split(tmp_path)
    folder = tmp_path / "ramp" / "train"
    shard = index["shards"][0]
    cases = [
        ("{not json", r"not JSON"),
        ("[]", r"a JSON list, not an object"),
        (json.dumps({k: v for k, v in index.items() if k != "shards"}), r"shards: Field required"),
        (json.dumps(dict(index, shards=[dict(shard, documents="150")])), r"shards\.0\.documents: Input should be a valid integer"),
        (json.dumps(dict(index, shards=[dict(shard, file="../other/x.arrow")])), r"shards\.0\.file: '\.\./other/x\.arrow' is not a file name"),
        (json.dumps(dict(index, shards=[dict(shard, bytes=-1)])), r"shards\.0\.bytes: Input should be greater than or equal to 0"),
        (json.dumps(dict(index, tokens=index["tokens"] + 1)), r"its shards hold \d+ tokens where it says \d+"),
    ]
    for text, message in cases:
        (folder / "index.json").write_text(text)
        with pytest.raises(MotError) as error:
            read_index(str(tmp_path), "ramp", "train")
        line = str(error.value)
        assert "\n" not in line and line.startswith(f"{folder}/index.json is damaged ("), line
        assert re.search(message, line) and line.endswith("run `mot data tokenize CONFIG --force` to write them again"), line
    (folder / "index.json").write_text(json.dumps(dict(index, format="mot-shards/9", shards="whatever")))
    assert read_index(str(tmp_path), "ramp", "train")["format"] == "mot-shards/9"  # check_index names the format

    progress = folder / "part-00000.json"
    saved = json.loads(progress.read_text())
    for value, message in [([saved], r"a JSON list, not an object"), (dict(saved, documents_read=-1), r"documents_read"),
                           ({k: v for k, v in saved.items() if k != "done"}, r"done: Field required")]:
        progress.write_text(json.dumps(value))
        with pytest.raises(MotError, match=message) as error:
            ShardWriter(str(tmp_path), "ramp", "train", 0, Fingerprints("v", {}, "s"), 100, fix="FIX")
        assert str(error.value).startswith(f"{progress} is damaged (") and str(error.value).endswith("; FIX")
