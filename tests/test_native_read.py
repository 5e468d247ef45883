"""Ray Data's own readers on a cluster (``mot_core.distributed.native_read``): how the ordered
stream of blocks is cut back into a source's parts, which parts a read covers, and what a
source lists for them. No Ray here: the runs on Ray Data are in ``test_data_formats.py``
(the formats table, bad records) and ``test_cluster_launch.py`` (two nodes, S3)."""

from __future__ import annotations

import json

import pytest

from mot_core.distributed.native_read import NativeJob, _path_runs, _Stream, plan_native
from mot_core.errors import MotError
from mot_core.experiment.tokenize import PartTask
from mot_core.plugin_api import NativeFile, NativeRead


def _job(todo=None) -> NativeJob:
    """a.parquet: row groups of 3 and 2 rows (parts 0, 1); b.tar whole (part 2); c.parquet: one
    row group of 4 rows (part 3)."""
    files = (NativeFile("a.parquet", 0, (3, 2)), NativeFile("b.tar", 2, None), NativeFile("c.parquet", 3, (4,)))
    return NativeJob("src", NativeRead("read_parquet", files, None), todo or {p: ["train"] for p in range(4)})


def _feed(stream: _Stream, blocks) -> list[int]:
    done = []
    for ref, runs in blocks:
        for part in stream.add(ref, runs):
            stream.dispatched.add(part)
            done.append(part)
    return done


def test_blocks_are_cut_into_parts_by_row_groups_and_files():
    stream = _Stream(_job())
    # a block holding the first file's first row group and part of its second; one across two files
    done = _feed(stream, [("B1", [("a.parquet", 4)]), ("B2", [("a.parquet", 1), ("b.tar", 2)]),
                          ("B3", [("b.tar", 1)]), ("B4", [("c.parquet", 4)])])
    assert done == [0, 1, 2, 3]  # each part as soon as its last row came (a tar when the next file starts)
    slices = {part: stream.parts[part] for part in range(4)}
    assert slices[0] == [("B1", 0, 3, 0)]
    assert slices[1] == [("B1", 3, 4, 3), ("B2", 0, 1, 4)]  # rows 3 and 4 of a.parquet
    assert slices[2] == [("B2", 1, 3, 0), ("B3", 0, 1, 2)]
    assert slices[3] == [("B4", 0, 4, 0)]
    assert stream.close() == []


def test_the_end_of_the_stream_completes_the_last_file_and_files_without_rows():
    stream = _Stream(_job())
    assert _feed(stream, [("B1", [("a.parquet", 5)])]) == [0, 1]
    # b.tar gave no rows (an empty tar: the source's own reader reads it); c.parquet must have all
    with pytest.raises(MotError, match="gave 0 rows of c.parquet, its footer lists 4"):
        stream.close()
    stream = _Stream(_job())
    _feed(stream, [("B1", [("a.parquet", 5)]), ("B2", [("c.parquet", 4)])])
    assert stream.close() == [2]
    assert 2 not in stream.parts  # no slices: the writer reads that part with the source's reader


def test_rows_out_of_order_unknown_or_beyond_the_footer_are_refused():
    with pytest.raises(MotError, match="out of file order"):
        _feed(_Stream(_job()), [("B1", [("b.tar", 1)]), ("B2", [("a.parquet", 1)])])
    with pytest.raises(MotError, match="out of file order"):
        _feed(_Stream(_job()), [("B1", [("b.tar", 1), ("c.parquet", 1), ("b.tar", 1)])])
    with pytest.raises(MotError, match="gave rows of 'd.tar', which is not one of the files asked for"):
        _feed(_Stream(_job()), [("B1", [("d.tar", 1)])])
    with pytest.raises(MotError, match="more rows of c.parquet than its footer lists"):
        _feed(_Stream(_job()), [("B1", [("c.parquet", 5)])])


def test_only_files_with_a_part_to_write_are_read():
    job = _job(todo={1: ["val"], 3: ["train", "val"]})
    assert [f.path for f in job.files()] == ["a.parquet", "c.parquet"]


def test_path_runs_of_arrow_and_pandas_blocks():
    import pandas as pd
    import pyarrow as pa

    paths = ["a", "a", "b", "a"]
    assert _path_runs(pa.table({"path": paths})) == [("a", 2), ("b", 1), ("a", 1)]
    assert _path_runs(pd.DataFrame({"path": paths})) == [("a", 2), ("b", 1), ("a", 1)]


def test_a_read_covers_both_splits_and_the_rest_is_read_by_the_source(tmp_path):
    """text_records over JSON lines, a Parquet file and an Arrow IPC file: the JSON lines as
    bytes (parsed as locally), Parquet by ``read_parquet``, the Arrow file by the source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mot_core.experiment.build import build_experiment
    from mot_core.experiment.resolve import resolve_config
    from conftest import tiny_config_dict

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(6)))
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(10)]}), tmp_path / "b.parquet", row_group_size=4)
    with pa.ipc.new_file(str(tmp_path / "c.arrow"), pa.schema([("text", pa.string())])) as writer:
        writer.write_table(pa.table({"text": ["x", "y"]}))
    data = tiny_config_dict(tmp_path, tmp_path / "run")
    data["mixture"]["datasets"] = {"text_records": {"options": {"paths": [str(tmp_path / n) for n in
                                                                         ("a.jsonl", "b.parquet", "c.arrow")]}}}
    exp = build_experiment(resolve_config(data))
    tasks = [PartTask("text_records", split, part) for split in ("train", "val") for part in range(5)]
    jobs, rest = plan_native(exp, tasks)
    assert [(j.read.reader, [f.path.rsplit("/", 1)[-1] for f in j.read.files]) for j in jobs] == \
        [("read_binary_files", ["a.jsonl"]), ("read_parquet", ["b.parquet"])]
    assert jobs[1].read.files[0].part_rows == (4, 4, 2) and jobs[1].read.options == {} and jobs[1].read.columns == ("text",)
    assert jobs[0].todo == {0: ["train", "val"]} and jobs[1].todo == {p: ["train", "val"] for p in (1, 2, 3)}
    assert rest == [PartTask("text_records", "train", 4), PartTask("text_records", "val", 4)]
    # a part already written is not planned: its read covers what is left
    jobs, rest = plan_native(exp, [PartTask("text_records", "val", 2)])
    assert [(j.read.reader, j.todo, [f.path.rsplit("/", 1)[-1] for f in j.files()]) for j in jobs] == \
        [("read_parquet", {2: ["val"]}, ["b.parquet"])] and rest == []


def test_parquet_files_whose_columns_differ_in_type_are_read_apart(tmp_path):
    """Ray Data's read_parquet refuses to merge them; locally each part of the file of numbers
    is a bad record ('wrong column type'), so on Ray it must reach the source the same way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from plugins.text.records import TextRecords

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "good.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"text": ["c"]}), tmp_path / "more.parquet")
    src = TextRecords(TextRecords.Options(paths=[str(tmp_path / "*.parquet")]))
    reads = src.native_reads("train")
    assert [[f.path.rsplit("/", 1)[-1] for f in r.files] for r in reads] == [["good.parquet", "more.parquet"],
                                                                              ["ints.parquet"]]
    assert [f.first_part for r in reads for f in r.files] == [0, 2, 1]


def test_reader_without_an_address_is_one_line(tmp_path, write_config, capsys):
    from mot_core.cli import main

    assert main(["data", "tokenize", str(write_config()), "--reader", "source"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --reader chooses the readers of a Ray Data job (--address); without it the sources' own "
                   "readers read every part here"), err


def test_gs_uris_take_anonymous_and_an_endpoint_and_refuse_other_options():
    import pyarrow.fs as pafs

    from mot_core import filesystems

    fs, path = filesystems.resolve("gs://public-data/laion/part-0.parquet?anonymous=true", "paths")
    assert isinstance(fs, pafs.GcsFileSystem) and path == "public-data/laion/part-0.parquet"
    fs, path = filesystems.resolve("gs://b/p?endpoint_override=127.0.0.1:9023&scheme=http&anonymous=1", "paths")
    assert isinstance(fs, pafs.GcsFileSystem) and path == "b/p"
    with pytest.raises(MotError, match=r"unknown option 'region' in the URI's query \(known: endpoint_override, "
                                       r"scheme, anonymous\)"):
        filesystems.resolve("gs://b/p?region=eu", "paths")
    with pytest.raises(MotError, match="anonymous takes true or false, not 'maybe'"):
        filesystems.resolve("gs://b/p?anonymous=maybe", "paths")
    with pytest.raises(MotError, match="no bucket; give gs://BUCKET/PREFIX"):
        filesystems.resolve("gs:///p", "paths")
