"""Experiment trackers (train.loggers): every metrics.jsonl record in TensorBoard, W&B (offline)
and MLflow (file store), read back with each library's own reader; exactly once per step after a
crash and a resume; missing packages and unknown names refused in one line."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import fail_at_batch

from mot_core.cli import main

ALL = ["jsonl", "tensorboard", "wandb", "mlflow"]
WALL_CLOCK = ("tokens_per_s", "step_time_s")  # differ between a crashed attempt and its resume


def isolate(tmp_path: Path, monkeypatch) -> None:
    """W&B's settings and caches in the test's folder, no tracker settings from the
    environment; MLflow's file store allowed (as the tracker allows it for its default store)
    for the client that reads it back."""
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home"))
    for variable in ("WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


@pytest.fixture(autouse=True)
def _isolated_trackers(tmp_path, monkeypatch):
    isolate(tmp_path, monkeypatch)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step"}


# -- readers: each library's own -------------------------------------------------------------

def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_images(run: Path) -> dict[str, list[tuple[int, int, int]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return {tag: [(e.step, e.width, e.height) for e in events.Images(tag)] for tag in events.Tags()["images"]}


def tensorboard_config(run: Path) -> list[tuple[int, str]]:
    """(step, text) of each config TensorBoard holds (its text plugin's tensors)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in events.Tensors("config/text_summary")]


def wandb_records(path: Path):
    """The records of an offline W&B run file, decoded with wandb's own protobuf ``Record``.

    The installed wandb (0.31) writes ``run-<id>.wandb`` from its Go core and ships no Python
    reader of it; the framing is LevelDB's log format, which wandb documents and used to read in
    ``wandb.sdk.internal.datastore``: a 7-byte header (':W&B', magic 0xBEE1, version), then 32 KiB
    blocks of chunks, each with a 7-byte header (CRC-32 of type byte + data, length, type: 1 full,
    2 first, 3 middle, 4 last). Every chunk's checksum is verified."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is zero padding
            position += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zeros: the rest of the block is padding
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, f"{path}: bad chunk at {position}"
        position += 7 + length
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run: Path) -> tuple[set[str], list[tuple[int, dict]]]:
    """(run ids of every offline run file under the run folder, (step, row) of every history row)."""
    ids, rows = set(), []
    for file in sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))):
        for record in wandb_records(Path(file)):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                rows.append((record.history.step.num, row))
    return ids, rows


def mlflow_client(run: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())


def mlflow_history(run: Path, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    from mot_core.training.trackers import mlflow_names

    client = mlflow_client(run)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
            for key, name in mlflow_names(keys).items()}


# -- checks -------------------------------------------------------------------------------------

def check_every_step_once(run: Path, records: list[dict], exact: bool = True) -> None:
    """Every tracker holds every record of metrics.jsonl exactly once, with its values (all of
    them when ``exact``, else all but the wall-clock figures)."""
    state = json.loads((run / "trackers.json").read_text())
    compared = [{k: v for k, v in scalars(r).items() if exact or k not in WALL_CLOCK} for r in records]
    steps = [r["step"] for r in records]
    keys = sorted({k for c in compared for k in c})

    board = tensorboard_scalars(run)
    for key in keys:
        want = [(s, np.float32(c[key])) for s, c in zip(steps, compared) if key in c]
        assert board[key] == want, key  # TensorBoard stores scalars as float32

    ids, rows = wandb_history(run)
    assert ids == {state["wandb"]["run_id"]}
    assert sorted(step for step, _ in rows) == steps  # every step once (the files of the starts, in any order)
    by_step = dict(rows)
    for step, want in zip(steps, compared):
        assert {k: by_step[step][k] for k in want} == want, step

    history = mlflow_history(run, state["mlflow"]["run_id"], keys)
    for key in keys:
        assert history[key] == [(s, c[key]) for s, c in zip(steps, compared) if key in c], key
    runs = mlflow_client(run).search_runs([mlflow_client(run).get_experiment_by_name("mot").experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow"]["run_id"]]  # one MLflow run, continued
    assert state["tensorboard"]["last_step"] == state["wandb"]["last_step"] == state["mlflow"]["last_step"] == steps[-1]


def check_figures(run: Path, step: int) -> None:
    assert (run / "loss_curves.png").is_file()
    assert [s for s, _, _ in tensorboard_images(run)["loss_curves"]] == [step]
    _, rows = wandb_history(run)
    assert [s for s, row in rows if "loss_curves/_type" in row] == [step]
    assert dict(rows)[step]["loss_curves/_type"] == "image-file"
    state = json.loads((run / "trackers.json").read_text())
    client = mlflow_client(run)
    assert [a.path for a in client.list_artifacts(state["mlflow"]["run_id"], "figures")] == ["figures/loss_curves.png"]


# -- tests --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_record_reaches_every_tracker(write_config, tmp_path):
    config = write_config("all", loggers=ALL, eval_at_start=True)
    assert main(["train", str(config)]) == 0
    run = tmp_path / "all"
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(0, 7))  # step 0: validation before training
    check_every_step_once(run, records)
    check_figures(run, 6)
    state = json.loads((run / "trackers.json").read_text())
    client = mlflow_client(run)
    mlflow_run = client.get_run(state["mlflow"]["run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "all"
    assert mlflow_run.data.params["train.lr"] == "0.003" and mlflow_run.data.params["model.dim"] == "32"
    assert json.loads(mlflow_run.data.params["train.loggers"]) == ALL
    [(step, text)] = tensorboard_config(run)
    assert step == 0 and text.startswith("in effect from step 1\n") and "    train:\n" in text and "      lr: 0.003" in text


@pytest.mark.slow
def test_a_resumed_run_sends_every_step_once_to_the_same_runs(write_config, tmp_path, monkeypatch):
    config = write_config("crashed", loggers=ALL)
    fail_at_batch(monkeypatch, 5, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", str(config)])
    run = tmp_path / "crashed"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000003"]
    state = json.loads((run / "trackers.json").read_text())
    assert state["mlflow"]["last_step"] == 4  # sent before the crash, past the checkpoint
    crashed = read_metrics(run)
    assert mlflow_client(run).get_run(state["mlflow"]["run_id"]).info.status == "FAILED"

    monkeypatch.undo()
    isolate(tmp_path, monkeypatch)
    assert main(["train", str(config)]) == 0  # resumes from step 3: steps 4-6 recomputed, step 4 not resent
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 7))
    resumed = json.loads((run / "trackers.json").read_text())
    assert {n: resumed[n]["run_id"] for n in ("wandb", "mlflow")} == {n: state[n]["run_id"] for n in ("wandb", "mlflow")}
    check_every_step_once(run, records, exact=False)
    # the trackers keep the first attempt's step 4: the same values but for wall-clock figures
    step4 = dict(mlflow_history(run, state["mlflow"]["run_id"], ["tokens_per_s"]))["tokens_per_s"][3]
    assert step4 == (4, crashed[3]["tokens_per_s"])
    check_figures(run, 6)
    assert mlflow_client(run).get_run(state["mlflow"]["run_id"]).info.status == "FINISHED"


KILLER = textwrap.dedent("""
    import os, sys
    import mot_core.training.state as trainer
    from mot_core.data import PackedStream
    calls = [0]
    class Killed(PackedStream):
        def next_batch(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == int(sys.argv[1]):
                os._exit(137)  # as kill -9 would: no finally, no W&B finish
            return super().next_batch(*args, **kwargs)
    trainer.PackedStream = Killed
    from mot_core.cli import main
    sys.exit(main(["train", sys.argv[2]]))
""")


@pytest.mark.slow
def test_a_killed_run_resumes_with_every_step_once_in_every_tracker(write_config, tmp_path):
    """Killed outright after step 4 (checkpoint at 3): TensorBoard and MLflow hold what they
    were sent; W&B, whose service dies unflushed, is read back on resume and sent what it lacks."""
    config = write_config("killed", loggers=ALL)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    # its own W&B service (not this process's, which an earlier test may have started and would
    # keep the killed run's id in use): as a trainer killed on its own
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    killed = subprocess.run([sys.executable, str(script), "5", str(config)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300, env=env)
    assert killed.returncode == 137, killed.stderr[-3000:]
    run = tmp_path / "killed"
    state = json.loads((run / "trackers.json").read_text())
    assert {name: state[name]["last_step"] for name in state} == {"tensorboard": 4, "wandb": 4, "mlflow": 4}
    _, rows = wandb_history(run)
    assert len(rows) <= 4  # what W&B wrote before it died: maybe nothing
    assert main(["train", str(config)]) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 7))
    check_every_step_once(run, records, exact=False)
    check_figures(run, 6)


@pytest.mark.slow
def test_a_tracker_added_on_resume_gets_the_steps_before_it(write_config, tmp_path, monkeypatch, capsys):
    config = write_config("added")
    fail_at_batch(monkeypatch, 5, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", str(config)])
    monkeypatch.undo()
    isolate(tmp_path, monkeypatch)
    assert main(["train", str(config), "train.loggers=[jsonl,tensorboard]"]) == 0
    assert "changed on resume, in effect from step 4: train.loggers: ['jsonl'] -> ['jsonl', 'tensorboard']" in capsys.readouterr().out
    run = tmp_path / "added"
    records = read_metrics(run)
    board = tensorboard_scalars(run)
    for key in ("loss", "loss/text", "lr", "val/text/loss"):
        assert board[key] == [(r["step"], np.float32(r[key])) for r in records if key in r], key
    [(step, text)] = tensorboard_config(run)  # written with the first record sent, so no step goes back
    assert step == 1 and text.startswith("in effect from step 4\n")


def test_an_unknown_logger_is_one_line(write_config, tmp_path, capsys):
    code = main(["train", str(write_config("unknown")), "train.loggers=[jsonl,tensorbord]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "train.loggers" in err and "'tensorbord'" in err and "'tensorboard', 'wandb' or 'mlflow'" in err
    assert not (tmp_path / "unknown").exists()


@pytest.mark.parametrize("logger, module", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(write_config, tmp_path, capsys, monkeypatch, logger, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if not installed
    code = main(["train", str(write_config("missing")), f"train.loggers=[jsonl,{logger}]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"error: train.loggers has {logger} but the {logger} package is not installed: "
                                 f"pip install 'mot-framework[{logger}]'")
    assert not (tmp_path / "missing").exists()  # refused before the run folder is created


def test_a_tensorboard_start_names_its_event_file_after_the_last_starts(tmp_path):
    """A resume within the second of the killed start still sorts after it (TensorBoard reads a
    folder's event files in name order; names start with whole seconds, then the process id)."""
    import time

    from mot_core.training.trackers import wait_for_a_later_event_file_second

    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now}.some.host.99999.0").write_bytes(b"")
    wait_for_a_later_event_file_second(tmp_path)
    assert int(time.time()) > now
    wait_for_a_later_event_file_second(tmp_path / "absent")  # a first start: nothing to wait for
