"""Nothing lost: interrupted checkpoint saves, damaged checkpoints, torn metrics, non-finite
losses, and two trainers on one run folder. Every case either resumes to exactly the
uninterrupted run's metrics or stops with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import fail_at_batch, nan_losses_on
from mot_core.cli import main
from mot_core.training import checkpoint as ckpt

COMPARED = ("step", "loss", "loss/text", "lr", "grad_norm", "val/text/loss")


def metrics(run: Path) -> list[dict]:
    return [{k: r[k] for k in COMPARED if k in r} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture
def uninterrupted(write_config, tmp_path) -> list[dict]:
    assert main(["train", str(write_config("full", checkpoint_every=2))]) == 0
    return metrics(tmp_path / "full")


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


KILLER = textwrap.dedent("""
    import os, sys
    import mot_core.training.checkpoint as ckpt
    calls, kill_at = [0], int(sys.argv[1])
    real_fsync = ckpt._fsync
    def fsync(path):
        real_fsync(path)
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit(137)  # as kill -9 would: no cleanup, no exception handlers
    ckpt._fsync = fsync
    from mot_core.cli import main
    sys.exit(main(["train", sys.argv[2]]))
""")


def test_kills_inside_checkpoint_saves_always_resume_to_the_same_metrics(write_config, tmp_path, uninterrupted):
    """Kill -9 at many instants inside saves (after each file, after meta.json, after the
    rename); every next run resumes, and the last one ends exactly as the uninterrupted run."""
    config = write_config("killed", checkpoint_every=2)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    # Each save fsyncs 3 files, meta.json and the folder: these counts land in every phase of
    # the first, second and third saves of the runs they interrupt.
    kills = [2, 5, 3, 9, 4, 1, 10]
    killed = 0
    for kill_at in kills:
        result = subprocess.run([sys.executable, str(script), str(kill_at), str(config)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode in (0, 137), result.stderr
        if result.returncode == 0:
            break
        killed += 1
        assert "Traceback" not in result.stderr, result.stderr
    print(f"killed {killed} times inside checkpoint saves")
    assert killed >= 5
    assert main(["train", str(config)]) == 0
    assert metrics(tmp_path / "killed") == uninterrupted
    leftovers = [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if not ckpt._COMPLETE.match(p.name)]
    assert leftovers == []


def test_leftover_of_an_interrupted_save_is_ignored_and_cleaned(write_config, tmp_path, uninterrupted, capsys):
    config = write_config("leftover", checkpoint_every=2, steps=6)
    run = tmp_path / "leftover"
    assert main(["train", str(config)]) == 0
    # Pretend a save of step 8 died half way: a folder with some files, no meta.json, and a
    # '.old' folder from an interrupted re-save.
    for name in ("step_0000008.tmp4242", "step_0000004.old77"):
        (run / "checkpoints" / name).mkdir()
        (run / "checkpoints" / name / "model.safetensors").write_bytes(b"partial")
    (run / "checkpoints" / "step_0000004.old77" / "meta.json").write_text("{")
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6.0
    assert main(["train", str(config)]) == 0  # nothing left to train: step 6 of 6
    out = capsys.readouterr().out
    assert "removed leftovers of an interrupted checkpoint save: step_0000004.old77, step_0000008.tmp4242" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    assert metrics(run) == uninterrupted


def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(write_config, tmp_path, uninterrupted, capsys):
    config = write_config("damaged", checkpoint_every=2)
    run = tmp_path / "damaged"
    assert main(["train", str(config)]) == 0
    newest = run / "checkpoints" / "step_0000006"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in a tensor
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 4.0
    assert "checkpoint step_0000006 is damaged (model.safetensors does not match its checksum); using step_0000004" in captured.err
    code = main(["eval", str(newest)])
    assert "is damaged (model.safetensors does not match its checksum)" in one_line_error(capsys, code)
    # Training resumes from step 4, redoes 5 and 6, and ends as the uninterrupted run did.
    assert main(["train", str(config)]) == 0
    assert "checkpoint step_0000006 is damaged" in capsys.readouterr().out
    assert metrics(run) == uninterrupted
    assert ckpt.damage(newest) is None  # rewritten


def test_no_intact_checkpoint_is_one_line_naming_what_to_delete(write_config, tmp_path, capsys):
    config = write_config("broken", checkpoint_every=3)
    run = tmp_path / "broken"
    assert main(["train", str(config)]) == 0
    for path in ckpt.list_checkpoints(run):
        (path / "trainer.pt").unlink()
    capsys.readouterr()
    err = one_line_error(capsys, main(["train", str(config)]))
    assert "no intact checkpoint" in err and "step_0000006: trainer.pt missing" in err and "delete those folders" in err


def test_torn_metrics_line_does_not_block_resume(write_config, tmp_path, uninterrupted, monkeypatch, capsys):
    config = write_config("torn", checkpoint_every=2)
    run = tmp_path / "torn"
    fail_at_batch(monkeypatch, 5, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError):
        main(["train", str(config)])
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "loss": 3.1')  # the crash cut the line short
    assert main(["train", str(config)]) == 0
    assert "dropped 1 incomplete line(s)" in capsys.readouterr().out
    assert metrics(run) == uninterrupted


@pytest.fixture
def nan_at_step_3(monkeypatch):
    """The text loss is NaN on the 3rd training forward pass only."""
    nan_losses_on(monkeypatch, lambda call: call == 3)


def test_nonfinite_loss_stops_before_reaching_the_weights(write_config, tmp_path, capsys, nan_at_step_3):
    config = write_config("nan", checkpoint_every=2)
    err = one_line_error(capsys, main(["train", str(config)]))
    assert "loss is nan at step 3; stopped before it reached the weights (last checkpoint: step 2" in err
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "nan")] == ["step_0000002"]


def test_nonfinite_loss_can_be_skipped(write_config, tmp_path, nan_at_step_3):
    config = write_config("skip", checkpoint_every=2, on_nonfinite="skip")
    assert main(["train", str(config)]) == 0
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3]
    assert all(r["loss"] == r["loss"] for r in records if r["step"] != 3)  # finite elsewhere
    assert ckpt.damage(tmp_path / "skip" / "checkpoints" / "step_0000006") is None


def test_weights_with_nan_are_never_saved(tmp_path):
    import torch

    from mot_core.errors import MotError

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(MotError, match="not saving step 3: weights hold NaN or inf"):
        ckpt.save_checkpoint(tmp_path, 3, model, {}, "", _Args(), keep=2)
    assert ckpt.list_checkpoints(tmp_path) == [] and ckpt.clean_leftovers(tmp_path) == []


class _Args:
    pass


def test_eval_exits_nonzero_on_nonfinite_metrics(write_config, tmp_path, capsys, monkeypatch):
    config = write_config("evalnan", steps=2, checkpoint_every=2)
    assert main(["train", str(config)]) == 0
    monkeypatch.setattr("mot_core.runs.reopen.evaluate", lambda *a, **k: {"val/text/loss": float("nan")})
    capsys.readouterr()
    code = main(["eval", str(tmp_path / "evalnan")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: non-finite metrics: val/text/loss (the checkpoint's weights or the data are broken)"


def test_one_trainer_per_run_folder(write_config, tmp_path, capsys):
    config = write_config("locked", steps=2)
    run = tmp_path / "locked"
    holder = ckpt.RunLock(run)
    try:
        err = one_line_error(capsys, main(["train", str(config)]))
        assert f"{run} is being trained by pid {os.getpid()}" in err
    finally:
        holder.release()
    # A lock file left by a trainer that died (its flock went with it) is taken over.
    (run / "train.lock").write_text("pid 999999")
    assert main(["train", str(config)]) == 0
    assert f"taking over {run / 'train.lock'} from pid 999999, which is no longer running" in capsys.readouterr().out
    assert (run / "train.lock").read_text() == ""  # released at the end


def _snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime) for p in sorted(folder.rglob("*"))}


def test_moved_run_folder_is_self_contained_and_eval_writes_nothing(write_config, tmp_path, capsys):
    """`mot eval` reads the folder it is given (its own tokenizer), not the run.dir recorded at
    training time, and leaves the folder untouched (it may be read-only)."""
    import shutil

    config = write_config("original", steps=2, checkpoint_every=2)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "original"), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(tmp_path / "original"), moved)
    (tmp_path / "original").mkdir()  # a decoy at the recorded run.dir: must not be read or written
    before = _snapshot(moved)
    assert main(["eval", str(moved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert _snapshot(moved) == before
    assert list((tmp_path / "original").iterdir()) == []


@pytest.mark.parametrize("failure, message", [
    (OSError(28, "No space left on device"), "no space left on the device of"),
    (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"), "no space left on the device of"),
    (OSError(30, "Read-only file system"), "the file system is read-only; the run folder must be writable to train"),
])
def test_storage_errors_are_one_line_and_keep_the_previous_checkpoint(write_config, tmp_path, capsys, monkeypatch,
                                                                       failure, message):
    import shutil as shutil_module

    config = write_config("disk", checkpoint_every=2)
    calls = [0]
    real_save = __import__("torch").save

    def failing_save(obj, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint (step 4)
            raise failure
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr("mot_core.training.checkpoint.torch.save", failing_save)
    if isinstance(failure, RuntimeError):  # torch's bare write error: the free space tells
        usage = shutil_module.disk_usage(tmp_path)
        monkeypatch.setattr("mot_core.training.checkpoint.shutil.disk_usage", lambda _: usage._replace(free=1 << 20))
    err = one_line_error(capsys, main(["train", str(config)]))
    assert message in err and "step 4 (the previous one is kept)" in err, err
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "disk")] == ["step_0000002"]
    assert ckpt.clean_leftovers(tmp_path / "disk") == []  # the failed save left nothing behind
