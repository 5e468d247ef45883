"""Damaged tokenized data stops `mot train` and `mot eval` in one line, before a step trains on it.

One tiny text run is tokenized and trained for 2 steps once (a module fixture). Each case copies
the run twice, damages the train split of one copy and the val split of the other, then resumes
training the first (`mot train`, 2 more steps) and scores the second (`mot eval RUN`): each must
exit 2 with one line naming the damaged file and `mot data tokenize CONFIG --force`, no
traceback, and no training step after the one the run had (metrics.jsonl unchanged). A progress
file is read only while tokenizing: `mot eval` scores a split without an index from its source
(exit 0, nothing damaged read), and `mot data tokenize` is the command that must refuse it.

Shard content is damaged two ways: in place, as bit rot or a bad copy leaves a file (same size;
the batch checksums catch it), and as shards written before checksums with damaged content
(the per-document checks of ``Vocabulary.check_encoded`` catch it).

The commands run in this process (``mot_core.cli.main``: what ``python -m mot_core.cli`` runs,
without an interpreter start per command); an exception escaping ``main`` is recorded as its
traceback, which the assertions refuse. The last test prints the table of what each command said.
"""

from __future__ import annotations

import json
import shutil
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import yaml

from conftest import tiny_config_dict
from mot_core.cli import main
from mot_core.data.shards import LENGTHS_KEY

FIX = "mot data tokenize CONFIG --force"
ROWS: list[tuple[str, str, int | str, str]] = []  # (case, command, exit, line): the table the last test prints


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_corpus) -> Path:
    """A folder holding ``run/`` (tokenized, 2 steps trained, checkpoint at step 2)."""
    base = tmp_path_factory.mktemp("damage").resolve()
    config = tiny_config_dict(text_corpus, base / "run", steps=2, eval_every=0, checkpoint_every=2, eval_batches=1)
    config["data"] = {"shard_tokens": 4000}
    (base / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(base / "run.yaml")]) == 0
    return base


# ---- what damages a split's folder; each returns the files it damaged (relative to the folder)

def _shards(folder: Path) -> list[Path]:
    index = json.loads((folder / "index.json").read_text())
    return [folder / s["file"] for s in index["shards"]]


def _buffers(path: Path, column: int) -> list[tuple[int, int, int, int]]:
    """Per record batch of a shard: (offsets position, offsets bytes, values position, values
    bytes) of one column in the file, from the addresses of the mapped file's buffers."""
    source = pa.memory_map(str(path))
    base = source.read_buffer(1).address
    source.seek(0)
    reader = ipc.open_file(source)
    out = []
    for b in range(reader.num_record_batches):
        _, offsets, _, values = reader.get_batch(b).column(column).buffers()
        out.append((offsets.address - base, offsets.size, values.address - base, values.size))
    return out


def _in_place(column: int, which: str, change: Callable[[np.ndarray], np.ndarray]):
    """Rewrite one buffer (``offsets`` or ``values``, int32) of a column of every record batch of
    every shard, in place: same size, same layout; as bit rot or a bad copy leaves a file."""

    def damage(folder: Path) -> list[str]:
        for path in _shards(folder):
            data = bytearray(path.read_bytes())
            for offsets_at, offsets_size, values_at, values_size in _buffers(path, column):
                at, size = (offsets_at, offsets_size) if which == "offsets" else (values_at, values_size)
                old = np.frombuffer(bytes(data[at:at + size]), dtype="<i4")
                new = change(old).astype("<i4")
                assert not np.array_equal(new, old)
                data[at:at + size] = new.tobytes()
            path.write_bytes(bytes(data))
        return [p.name for p in _shards(folder)]

    return damage


def _unchecked(column: int, change: Callable[[np.ndarray], np.ndarray]):
    """Rewrite every shard as shards were written before batch checksums (none in the footer
    or the index) with one column's values changed: only the per-document checks stand."""

    def damage(folder: Path) -> list[str]:
        index = json.loads((folder / "index.json").read_text())
        for shard in index["shards"]:
            path = folder / shard["file"]
            reader = ipc.open_file(pa.memory_map(str(path)))
            sink = pa.BufferOutputStream()
            with ipc.new_file(sink, reader.schema, metadata={LENGTHS_KEY: reader.metadata[LENGTHS_KEY]}) as writer:
                for b in range(reader.num_record_batches):
                    arrays = reader.get_batch(b).columns
                    cell = arrays[column]
                    values = change(cell.values.to_numpy()).astype(cell.values.type.to_pandas_dtype())
                    arrays[column] = type(cell).from_arrays(cell.offsets, pa.array(values))
                    writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=reader.schema))
            path.write_bytes(sink.getvalue().to_pybytes())
            shard["bytes"] = path.stat().st_size
            del shard["footer_crc32"]
        (folder / "index.json").write_text(json.dumps(index))
        return [s["file"] for s in index["shards"]]

    return damage


def _index(change: Callable[[dict], object]):
    def damage(folder: Path) -> list[str]:
        (folder / "index.json").write_text(json.dumps(change(json.loads((folder / "index.json").read_text()))))
        return ["index.json"]

    return damage


def _progress_a_list(folder: Path) -> list[str]:
    """An interrupted tokenize (no index.json yet) whose first progress file is a list."""
    (folder / "index.json").unlink()
    progress = folder / "part-00000.json"
    progress.write_text(json.dumps([json.loads(progress.read_text())]))
    return [progress.name]


def _truncated(folder: Path) -> list[str]:
    shard = _shards(folder)[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    return [shard.name]


def _deleted(folder: Path) -> list[str]:
    shard = _shards(folder)[-1]
    shard.unlink()
    return [shard.name]


IDS, SEG_LENGTH = 0, 2
CASES = {
    "ids rewritten in vocabulary": _in_place(IDS, "values", lambda ids: np.roll(ids, 1)),  # same ids, moved
    "ids out of range": _in_place(IDS, "values", lambda ids: ids + 100_000),
    "offsets broken": _in_place(IDS, "offsets", lambda offsets: offsets + np.arange(offsets.size)),
    "ids out of range, unchecked shard": _unchecked(IDS, lambda ids: ids + 100_000),
    "segment lengths broken, unchecked shard": _unchecked(SEG_LENGTH, lambda lengths: lengths + 1),
    "index.json a list": _index(lambda index: [index]),
    "index.json without shards": _index(lambda index: {k: v for k, v in index.items() if k != "shards"}),
    "progress file a list": _progress_a_list,
    "truncated shard": _truncated,
    "deleted shard": _deleted,
}


def _copy(trained: Path, target: Path, split: str, damage) -> tuple[Path, Path, list[Path]]:
    """The trained run copied to ``target``/run with one split damaged -> (config, run, the
    damaged files)."""
    run = target / "run"
    shutil.copytree(trained / "run", run)
    config = yaml.safe_load((trained / "run.yaml").read_text())
    config["run"]["dir"] = str(run)
    config["train"]["steps"] = 4
    (target / "run.yaml").write_text(yaml.safe_dump(config))
    folder = run / "tokens" / "text_files" / split
    return target / "run.yaml", run, [folder / name for name in damage(folder)]


def _mot(capsys, *argv: str) -> tuple[int | str, str]:
    """(exit code, stderr) of ``mot ARGV`` run in this process; an escaping exception is the
    exit "exception" and its traceback the stderr."""
    capsys.readouterr()
    try:
        code: int | str = main(list(argv))
        err = capsys.readouterr().err
    except Exception:  # noqa: BLE001 - recorded, and refused by the assertions
        code, err = "exception", capsys.readouterr().err + traceback.format_exc()
    return code, err


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line(case: str, command: str, code, err: str, damaged: list[Path], root: Path) -> str:
    lines = err.strip().splitlines()
    ROWS.append((case, command, code, (lines[0] if len(lines) == 1 else err.strip()).replace(f"{root}/", "")))
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert any(str(path) in lines[0] for path in damaged), (damaged, lines[0])
    assert FIX in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_damage_stops_train_and_eval_in_one_line(trained, tmp_path, capsys, case):
    damage = CASES[case]
    config, run, damaged = _copy(trained, tmp_path / "train", "train", damage)
    before = _steps(run)
    code, err = _mot(capsys, "train", str(config))
    _one_line(case, "mot train", code, err, damaged, tmp_path / "train")
    assert _steps(run) == before == [1, 2]  # no step trained once the damage was met
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]
    if case == "ids rewritten in vocabulary":  # the fix the line names works: the run then resumes
        assert _mot(capsys, "data", "tokenize", str(config), "--force")[0] == 0
        assert _mot(capsys, "train", str(config))[0] == 0 and _steps(run) == [1, 2, 3, 4]

    config, run, damaged = _copy(trained, tmp_path / "eval", "val", damage)
    code, err = _mot(capsys, "eval", str(run))
    if case == "progress file a list":
        # `mot eval` reads no progress file: a split without an index is scored from its source,
        # tokenized in memory (never written into a run folder); `mot data tokenize` reads it
        ROWS.append((case, "mot eval", code, "(exit 0: val scored from its source, tokenized in memory; "
                                             "no progress file read)"))
        assert code == 0 and not err.strip(), err
        code, err = _mot(capsys, "data", "tokenize", str(config))
        _one_line(case, "mot data tokenize", code, err, damaged, tmp_path / "eval")
    else:
        _one_line(case, "mot eval", code, err, damaged, tmp_path / "eval")


def test_the_damage_table(capsys):
    """Prints what each command said (paths shown from the damaged run's folder)."""
    if not ROWS:
        pytest.skip("no case ran in this process")
    table = ["case | command | exit | line", "---|---|---|---"]
    table += [" | ".join(map(str, row)) for row in ROWS]
    with capsys.disabled():
        print("\n" + "\n".join(table))
