"""`mot sweep`: grids of `mot train` runs on Ray Tune, their table, and resuming a sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config_dict
from mot_core.cli import main
from mot_core.distributed.sweep import parse_grid, plan_sweep, split_values


def _base(tmp_path: Path, corpus: Path, **train) -> Path:
    data = tiny_config_dict(corpus, tmp_path / "sweep")
    data["model"]["dim"] = 16
    data["train"].update({"steps": 6, "eval_every": 3, "checkpoint_every": 3, "log_every": 3, **train})
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_grid_values_are_yaml_with_brackets_kept_whole():
    assert split_values("a, [1, 2] ,{x: 1, y: 2}") == ["a", "[1, 2]", "{x: 1, y: 2}"]
    grid = parse_grid(["train.lr=1e-3,3.0e-3", "model.untie={ffn: true, attention: false, norm: false},{ffn: true}",
                       "model.tie_embeddings=true,false"])
    assert grid["train.lr"] == [0.001, 0.003]
    assert grid["model.untie"][0] == {"ffn": True, "attention": False, "norm": False}
    assert grid["model.tie_embeddings"] == [True, False]


def test_a_plan_has_every_combination_and_variant_validated(tmp_path, text_corpus):
    base = yaml.safe_load(_base(tmp_path, text_corpus).read_text())
    base["sweep"] = {"variants": {"dense": {"model.untie": {"ffn": False, "attention": False, "norm": False}},
                                  "mot": {}},
                     "samples": 2}
    (tmp_path / "with_sweep.yaml").write_text(yaml.safe_dump(base))
    plan = plan_sweep(str(tmp_path / "with_sweep.yaml"), [], ["train.lr=1e-3,3e-3"], str(tmp_path / "out"))
    assert len(plan.trials) == 2 * 2 * 2
    names = [t.name for t in plan.trials]
    assert len(set(names)) == len(names) and names[0] == "t000_dense_lr=0.001_r0"
    seeds = {plan.configs[t.name]["run"]["seed"] for t in plan.trials}
    assert seeds == {0, 1}
    dense = plan.configs[names[0]]
    assert dense["model"]["untie"] == {"ffn": False, "attention": False, "norm": False}
    assert dense["run"]["dir"] == str((tmp_path / "out" / "trials" / names[0]).resolve())
    assert plan.metric == "val/text/loss"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grid", "model.dimm=16,32"], "sweep grid key 'model.dimm' is not a config key"),
        (["--grid", "model.dim=16,-3"], "trial t001_dim=-3 ({'model.dim': -3}): model.dim"),
        (["--grid", "mixture.modalities.text.options.vocab_sizee=300"], "trial t000_vocab_sizee=300"),
        (["--metric", "val/audio/loss"], "sweep.metric 'val/audio/loss' is not logged by any trial"),
        (["--metric", "val/text/accuracy"], "sweep.metric 'val/text/accuracy' is not logged by any trial; they log "
                                            "loss, loss/text, val/text/loss, val/text/perplexity, val/text/bits_per_byte"),
        (["--metric", "val/text/accuracy", "--grid", "mixture.modalities.text.evaluators=[text_lm],[]"],
         "they log loss, loss/text, val/text/loss, val/text/perplexity, val/text/bits_per_byte"),
        (["--grid", "train.lr"], "--grid 'train.lr': expected key=value1,value2"),
        (["--scheduler", "pbt"], "--scheduler"),
        (["--grid", "run.dir=a,b"], "sweep grid key 'run.dir' cannot be swept"),
    ],
)
def test_bad_sweep_input_is_one_line(tmp_path, text_corpus, capsys, args, message):
    base = _base(tmp_path, text_corpus)
    try:
        code = main(["sweep", str(base), "--out", str(tmp_path / "out"), *args])
    except SystemExit as exc:  # a usage mistake: argparse's one line
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()  # nothing started


def test_a_metric_an_evaluator_logs_is_accepted_and_nothing_is_written(tmp_path, text_corpus):
    """Evaluators name their metrics in what compute() returns: the plan finds them by a dry run
    (text's needs its tokenizer, fitted in a scratch folder), and writes nothing."""
    base = _base(tmp_path, text_corpus)
    for metric in ("val/text/perplexity", "val/text/bits_per_byte", "loss/text", "loss"):
        plan = plan_sweep(str(base), [], ["train.lr=1e-3,3e-3"], str(tmp_path / "out"), metric=metric)
        assert plan.metric == metric
    assert not (tmp_path / "out").exists()


def _table(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("trial | "))
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith("t0"):
            break
        cells = line.split(" | ")
        rows[cells[0]] = cells
    return rows


def _sweep(base: Path, out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    return subprocess.Popen([sys.executable, "-m", "mot_core.cli", "sweep", str(base), "--out", str(out), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _records(run: Path) -> list[dict]:
    """The complete records of a run's ``metrics.jsonl``; the sweep may be appending one while
    this reads, so a last line without its newline is not read yet."""
    file = run / "metrics.jsonl"
    complete = file.read_text().rpartition("\n")[0] if file.is_file() else ""
    return [json.loads(line) for line in complete.splitlines() if line]


@pytest.mark.slow
def test_a_sweep_of_four_trials_runs_and_its_table_matches_each_trials_metrics(tmp_path, text_corpus):
    base = _base(tmp_path, text_corpus)
    out = tmp_path / "out"
    process = _sweep(base, out, "--grid", "model.dim=16,32", "--grid", "train.lr=1e-3,3e-3")
    stdout, _ = process.communicate(timeout=600)
    assert process.returncode == 0, stdout[-4000:]
    rows = _table(stdout)
    assert len(rows) == 4
    scores = []
    for name, cells in rows.items():
        records = _records(out / "trials" / name)
        assert [r["step"] for r in records] == list(range(1, 7))
        assert cells[3] == "finished"
        assert float(cells[4]) == pytest.approx(records[-1]["val/text/loss"], abs=1e-4)
        scores.append(float(cells[4]))
    assert scores == sorted(scores)  # best first
    assert (out / "loss_curves.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())[0]["trial"] == next(iter(rows))
    compared = subprocess.run([sys.executable, "-m", "mot_core.cli", "compare", str(out)], capture_output=True,
                              text=True, timeout=120)
    assert compared.returncode == 0 and all(name in compared.stdout for name in rows), compared.stderr


@pytest.mark.slow
def test_an_interrupted_sweep_finishes_without_retraining_finished_trials(tmp_path, text_corpus):
    # A tiny trial runs ~10 ms a step: 200 steps keep the second trial between its first
    # checkpoint and its end for a second or more, which a 10 ms poll cannot miss (30 steps
    # passed in 0.3 s, shorter than the poll, and a faster machine skipped the window).
    steps = 200
    base = _base(tmp_path, text_corpus, steps=steps, eval_every=100, checkpoint_every=10, log_every=50)
    out = tmp_path / "out"
    args = ("--grid", "train.lr=1e-3,2e-3,3e-3")
    data = yaml.safe_load(base.read_text())
    data["sweep"] = {"max_concurrent": 1}  # one trial at a time: the interruption lands between two
    base.write_text(yaml.safe_dump(data))
    process = _sweep(base, out, *args)
    trials = out / "trials"
    deadline = time.monotonic() + 400
    while True:  # until one trial finished and the next has a checkpoint
        counts = {t: len(_records(t)) for t in trials.glob("t*")} if trials.is_dir() else {}
        done = [t for t, n in counts.items() if n == steps]
        started = [t for t, n in counts.items() if 20 <= n < steps - 20]
        if done and started:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            stdout, _ = process.communicate(timeout=60)
            pytest.fail(f"the sweep never had a finished and a started trial at once (records: "
                        f"{ {t.name: n for t, n in counts.items()} }):\n{stdout[-3000:]}")
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
    stdout, _ = process.communicate(timeout=120)
    finished = {t.name: (t / "metrics.jsonl").stat().st_mtime_ns for t in done}
    interrupted = [t.name for t in trials.glob("t*") if len(_records(t)) < steps]
    assert interrupted, "the Ctrl-C did not land in the middle of a trial"
    # not a finished sweep: exit 130, the interrupted trial labelled so (not "stopped", ASHA's word),
    # and the command that resumes it
    assert process.returncode == 130, stdout[-4000:]
    rows = _table(stdout)
    for name in interrupted:
        at = len(_records(trials / name))
        if at:
            assert rows[name][2] == f"interrupted at step {at}", rows[name]
    assert not any(cells[2].startswith("stopped") for cells in rows.values()), rows
    assert "resume with the same command" in stdout and f"mot sweep {base} --grid train.lr=1e-3,2e-3,3e-3" in stdout
    again = _sweep(base, out, *args)
    stdout, _ = again.communicate(timeout=600)
    assert again.returncode == 0, stdout[-4000:]
    assert "resuming the sweep" in stdout
    assert "resuming from" in stdout  # the interrupted trial continued from its checkpoint
    for name, mtime in finished.items():  # finished trials were not trained again
        assert (trials / name / "metrics.jsonl").stat().st_mtime_ns == mtime
    for trial in trials.glob("t*"):
        assert [r["step"] for r in _records(trial)] == list(range(1, steps + 1)), trial.name
    assert len(_table(stdout)) == 3


@pytest.mark.slow
def test_asha_stops_a_trial_that_does_not_learn_at_its_first_rung(tmp_path, text_corpus):
    """ASHA (reduction factor 4) compares each trial reaching a rung with those recorded there:
    one at a time, the learning trial sets the bar at step 2 (sweep.grace_steps) and the trial
    whose learning rate is too small to learn falls below it there and is stopped."""
    steps, grace = 8, 2
    base = _base(tmp_path, text_corpus, steps=steps, eval_every=grace, checkpoint_every=4, log_every=1)
    data = yaml.safe_load(base.read_text())
    data["sweep"] = {"scheduler": "asha", "grace_steps": grace, "max_concurrent": 1}
    base.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    process = _sweep(base, out, "--grid", "train.lr=1e-2,1e-9")
    stdout, _ = process.communicate(timeout=600)
    assert process.returncode == 0, stdout[-4000:]
    assert "scheduler asha" in stdout and "interrupted" not in stdout
    rows = _table(stdout)
    learns, idle = rows["t000_lr=0.01"], rows["t001_lr=1e-09"]
    assert learns[2] == "finished", learns
    stopped = [r["step"] for r in _records(out / "trials" / "t001_lr=1e-09")]
    assert grace <= stopped[-1] < steps and idle[2] == f"stopped at step {stopped[-1]}", (idle, stopped)
    at_rung = [{r["step"]: r.get("val/text/loss") for r in _records(out / "trials" / t)}[grace]
               for t in ("t000_lr=0.01", "t001_lr=1e-09")]
    assert at_rung[1] > at_rung[0]  # why it was stopped: worse at the rung
    assert [r["status"] for r in json.loads((out / "results.json").read_text())] == ["finished", "stopped early"]
