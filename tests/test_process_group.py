"""``mot train --process-group``: mot launch's FSDP2/DDP runtime in a torch.distributed group
without Ray (one process, or torchrun's), as the GPU check runs FSDP2 on one GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_streamed_export import assert_export_is_the_distributed_checkpoint


def _mot(*args: str, cwd: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable, "-m", "mot_core.cli"]) + list(args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp2_in_one_process_trains_like_mot_train_and_resumes(write_config, tmp_path):
    config = write_config("pg")
    result = _mot("train", str(config), "--process-group", "fsdp2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 workers, fsdp2, gloo, fp32, device: cpu" in result.stdout
    run = tmp_path / "pg"
    steps = sorted(p.name for p in (run / "distributed_checkpoints").iterdir())
    assert steps == ["checkpoint_0000003", "checkpoint_0000006"]
    # the export, streamed from the last distributed checkpoint: the same weights and AdamW state
    assert_export_is_the_distributed_checkpoint(run / "checkpoints" / "step_0000006",
                                                run / "distributed_checkpoints" / "checkpoint_0000006", tmp_path)
    plain = _mot("train", str(config), "run.dir=" + str(tmp_path / "plain"), cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert _losses(run) == pytest.approx(_losses(tmp_path / "plain"), rel=1e-5)

    more = _mot("train", str(config), "train.steps=8", "--process-group", "fsdp2", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming from" in more.stdout and "checkpoint_0000006" in more.stdout
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))


@pytest.mark.slow
def test_ddp_under_torchrun_with_two_processes_matches_one(write_config, tmp_path):
    config = write_config("two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mot_core.cli"]
    result = _mot("train", str(config), "--process-group", "ddp", cwd=tmp_path, launcher=torchrun)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 workers, ddp, gloo" in result.stdout
    assert result.stdout.count("done: metrics in") == 1  # rank 0 alone reports
    single = _mot("train", str(config), "run.dir=" + str(tmp_path / "one"), cwd=tmp_path)
    assert single.returncode == 0
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    last = sorted((tmp_path / "two" / "distributed_checkpoints").iterdir())[-1]
    assert_export_is_the_distributed_checkpoint(tmp_path / "two" / "checkpoints" / f"step_{last.name[-7:]}", last,
                                                tmp_path)
    # A resume rank 0 refuses: every rank stops with the same one line (none is left waiting)
    refused = _mot("train", str(config), "train.steps=8", "mixture.modalities.text.options.min_frequency=3",
                   "--process-group", "ddp", cwd=tmp_path, launcher=torchrun)
    # (both ranks write to one pipe at once: their lines may run together, so the message is counted)
    message = "error: mixture.modalities.text.options.min_frequency was 2 when"
    assert refused.returncode != 0 and refused.stderr.count(message) == 2, refused.stderr[-3000:]


def test_bad_process_group_inputs_are_one_line(write_config, tmp_path):
    config = write_config("bad", batch_size=3)
    env_world = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    result = subprocess.run([sys.executable, "-m", "mot_core.cli", "train", str(config), "--process-group", "ddp"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env_world)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: train.batch_size=3 is not divisible by 2 processes"], result.stderr
    result = _mot("train", str(config), "--process-group", "zero3", cwd=tmp_path)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_a_relative_run_dir_lands_in_the_folder_it_was_started_from(write_config, tmp_path):
    config = write_config("rel_source")
    result = _mot("train", str(config), "run.dir=runs/rel", "--process-group", "fsdp2", "train.steps=3", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / "rel"
    assert (run / "metrics.jsonl").is_file() and (run / "distributed_checkpoints" / "checkpoint_0000003").is_dir()
    assert (run / "checkpoints" / "step_0000003").is_dir()
