"""``mot launch``: Ray Train workers (DDP and FSDP2) run the ``mot train`` loop step for step,
survive a killed worker without losing or repeating a step, and refuse bad input in one line.

The runs mix text with the example plugin's continuous time-series patches, so the shards
carry continuous values and the plugin's own adapter and head are sharded and trained too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_mot
from mot_core.data import PackedStream
from mot_core.errors import MotError
from mot_core.training import checkpoint as ckpt
from mot_core.training import storage
from test_continuous_modality import ramp_documents, ramp_vocab
from test_streamed_export import assert_export_is_the_distributed_checkpoint

STEPS = 24


def test_a_workers_lanes_build_its_rows_of_the_global_batch():
    """A worker builds only its lanes: its batch equals those rows of the single-process
    batch (ids, routing, values, next-value targets), and the loss extras, drawn per row from
    each lane's generator, land at the same positions of the global batch."""
    vocab = ramp_vocab()
    docs = vocab.tokenize(ramp_documents(8), "test")

    def number_positions(batch, generator):  # extras that name the row-local position they belong to
        for m in range(batch.plan.num_modalities):
            start, end = batch.plan.bounds(m)
            if end > start:
                batch.extras[m] = {"flat": batch.plan.order[start:end].double(), "noise": torch.randn(end - start, generator=generator)}

    seq = 6
    whole_stream = PackedStream([docs], [1.0], seq_len=seq, seed=3, lanes=4, extras=number_positions)
    parts_streams = {(first, end): PackedStream([docs], [1.0], seq_len=seq, seed=3, lanes=4, owned=range(first, end),
                                                extras=number_positions) for first, end in ((0, 2), (2, 4), (1, 2))}
    for _ in range(3):
        whole = whole_stream.next_batch(2)
        for m in range(2):  # each position's extra was drawn for its own row
            start, end = whole.plan.bounds(m)
            order = whole.plan.order[start:end]
            assert torch.equal(whole.extras[m]["flat"].long() + (order // seq) * seq, order)
        halves = []
        for (first, end), stream in parts_streams.items():
            part = stream.next_batch(2)
            for field in ("tokens", "modality", "positions", "document", "span", "targets", "is_value", "has_next_value"):
                assert torch.equal(getattr(part, field), getattr(whole, field)[first:end]), field
            for m in range(2):
                start, stop = part.plan.bounds(m)
                if stop > start:
                    assert torch.equal(part.extras[m]["flat"].long() + (part.plan.order[start:stop] // seq) * seq,
                                       part.plan.order[start:stop])
            if (first, end) != (1, 2):
                halves.append(part)
        for m in range(2):  # the workers' batches hold every value and extra exactly once
            joined = torch.cat([h.extras[m]["noise"] for h in halves if m in h.extras]).sort().values
            assert torch.equal(joined, whole.extras[m]["noise"].sort().values)
            if m in whole.values:
                assert torch.equal(torch.cat([h.values[m] for h in halves if m in h.values]), whole.values[m])


# --------------------------------------------------------------------------------------------
# On a local Ray cluster (two CPU workers, gloo)
# --------------------------------------------------------------------------------------------


def _config(run_dir: Path, strategy: str, corpus: Path | None = None) -> dict:
    return {
        "run": {"dir": str(run_dir), "seed": 0, "device": "cpu"},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
        "train": {"steps": STEPS, "batch_size": 4, "seq_len": 64, "lr": 3e-3, "warmup_steps": 2, "eval_every": 12,
                  "eval_batches": 2, "checkpoint_every": 5, "log_every": 5, "progress": False, "keep_checkpoints": 2},
        "launch": {"strategy": strategy, "num_workers": 2, "max_failures": 2},
        "mixture": {
            "modalities": {
                "text": {"options": {"vocab_size": 300}},
                "timeseries_patches": {"loss_options": {"learn_scale": True}, "options": {"patch_size": 8}},
            },
            "datasets": {"timeseries_csv": {"options": {"window": 32, "stride": 16, "val_fraction": 0.2,
                                                        "modality": "timeseries_patches"}}},
        },
    }


def _write(tmp: Path, name: str, strategy: str = "ddp", warm_start: Path | None = None) -> Path:
    data = _config(tmp / name, strategy)
    if warm_start is not None:
        data["model"]["warm_start"] = str(warm_start)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _launch(site: Path, cwd: Path, *args: str, on_start=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "RAY_DEDUP_LOGS": "0"}
    process = subprocess.Popen([sys.executable, "-m", "mot_core.cli", "launch", *args], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if on_start is not None:
        threading.Thread(target=on_start, daemon=True).start()
    out, _ = process.communicate(timeout=400)
    return subprocess.CompletedProcess(process.args, process.returncode, out, "")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def launched(plugin_site, tmp_path_factory):
    """A short dense `mot train` run; then MoT warm-started from it, trained by `mot train`, and
    the same config launched with 2 DDP and with 2 FSDP2 workers (the dense checkpoint is
    copied into every tower before the model is sharded)."""
    tmp = tmp_path_factory.mktemp("launch")
    dense = _config(tmp / "dense", "ddp")
    dense["model"]["untie"] = {"ffn": False, "attention": False, "norm": False}
    dense["train"].update(steps=4, checkpoint_every=4, eval_every=0)
    (tmp / "dense.yaml").write_text(yaml.safe_dump(dense))
    result = run_mot(plugin_site, tmp, "train", str(tmp / "dense.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    warm = tmp / "dense" / "checkpoints" / "step_0000004"
    single = _write(tmp, "single", warm_start=warm)
    result = run_mot(plugin_site, tmp, "train", str(single))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {"single": tmp / "single", "warm_start": warm}
    for strategy in ("ddp", "fsdp2"):
        config = _write(tmp, strategy, strategy, warm_start=warm)
        result = _launch(plugin_site, tmp, str(config), "--num-workers", "2")
        assert result.returncode == 0, result.stdout[-5000:]
        assert f"2 workers, {strategy}, gloo" in result.stdout
        assert f"warm start: copied {warm} into every tower" in result.stdout
        runs[strategy] = tmp / strategy
    return tmp, runs


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_workers_give_mot_trains_loss_at_every_step(launched, strategy):
    tmp, runs = launched
    single, parallel = _metrics(runs["single"]), _metrics(runs[strategy])
    assert [r["step"] for r in parallel] == list(range(1, STEPS + 1)) == [r["step"] for r in single]
    for a, b in zip(single, parallel):
        for key in ("loss", "loss/text", "loss/timeseries_patches", "grad_norm", "lr"):
            if key in a or key in b:
                assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), (a["step"], key)
    for key in ("val/text/loss", "val/timeseries_patches/loss"):
        assert parallel[-1][key] == pytest.approx(single[-1][key], rel=2e-5)
    # the final weights come back as a `mot train` checkpoint: equal to the single process's
    from safetensors.torch import load_file

    ours = load_file(str(runs[strategy] / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
    theirs = load_file(str(runs["single"] / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)
    # the driver streamed the export from the last checkpoint in storage: its weights and AdamW
    # state are the workers' shards gathered, bit for bit
    found = storage.intact_checkpoints(str(runs[strategy] / "ray"), strategy)
    assert found[-1][0] == STEPS
    assert_export_is_the_distributed_checkpoint(runs[strategy] / "checkpoints" / f"step_{STEPS:07d}",
                                                Path(found[-1][1]), tmp)


def _kill_a_worker_once(metrics: Path, after_step: int, killed: list):
    """Kill -9 one Ray Train worker process once the run has logged ``after_step``."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")]
        except (OSError, ValueError):
            steps = []
        if steps and max(steps) >= after_step:
            break
        time.sleep(0.01)
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if name == b"ray::RayTrainWorker":
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return


@pytest.mark.slow
def test_a_killed_worker_costs_no_step_and_no_adam_moment(launched, plugin_site):
    tmp, runs = launched
    config = _write(tmp, "faulted", "ddp", warm_start=runs["warm_start"])
    killed: list[int] = []
    result = _launch(plugin_site, tmp, str(config), "--num-workers", "2",
                     on_start=lambda: _kill_a_worker_once(tmp / "faulted" / "metrics.jsonl", 7, killed))
    assert result.returncode == 0, result.stdout[-5000:]
    assert killed, "no worker was killed"
    assert "resuming from" in result.stdout  # the group restarted from a checkpoint (not a warm start again)
    faulted, uninterrupted = _metrics(tmp / "faulted"), _metrics(runs["ddp"])
    assert [r["step"] for r in faulted] == list(range(1, STEPS + 1))  # no lost or repeated step
    for a, b in zip(uninterrupted, faulted):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), a["step"]
    states = [ckpt.load_trainer_state(run / "checkpoints" / f"step_{STEPS:07d}") for run in (runs["ddp"], tmp / "faulted")]
    moments = [s["optimizer_by_name"]["state"] for s in states]
    assert moments[0].keys() == moments[1].keys() and moments[0]
    for name, state in moments[0].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(moments[1][name][key], state[key], rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_mot_train_continues_a_launched_run(launched, plugin_site):
    """The exported checkpoint holds everything: one process resumes it (optimizer included)."""
    tmp, runs = launched
    copy = tmp / "continued"
    shutil.copytree(runs["fsdp2"], copy)
    data = _config(copy, "fsdp2")
    data["model"]["warm_start"] = str(runs["warm_start"])
    data["train"]["steps"] = STEPS + 2
    path = tmp / "continue.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_mot(plugin_site, tmp, "train", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(step {STEPS})" in result.stdout
    assert [r["step"] for r in _metrics(copy)] == list(range(1, STEPS + 3))


def test_a_launch_with_relative_paths_writes_where_mot_train_would(plugin_site, tmp_path, text_corpus):
    """The README's example from an empty folder: relative run.dir, data path and storage path.
    Every file lands under run.dir as `mot train` would put it, the last line says where, and
    `mot eval run.dir` reads it."""
    import shutil

    shutil.copytree(text_corpus, tmp_path / "corpus")
    data = {
        "run": {"dir": "runs/rel", "seed": 0, "device": "cpu"},
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
        "train": {"steps": 4, "batch_size": 2, "seq_len": 64, "eval_every": 0, "eval_batches": 1,
                  "checkpoint_every": 2, "log_every": 1, "progress": False},
        "launch": {"strategy": "ddp", "storage_path": "ray_storage", "max_failures": 0},
        "mixture": {"modalities": {"text": {"options": {"vocab_size": 300}}},
                    "datasets": {"text_files": {"options": {"paths": ["corpus/*.txt"], "val_fraction": 0.2}}}},
    }
    (tmp_path / "rel.yaml").write_text(yaml.safe_dump(data))
    result = _launch(plugin_site, tmp_path, "rel.yaml", "--num-workers", "2")
    assert result.returncode == 0, result.stdout[-5000:]
    run = (tmp_path / "runs" / "rel").resolve()
    assert f"done: metrics in {run / 'metrics.jsonl'}, the final checkpoint in {run / 'checkpoints'}" in result.stdout
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step_0000004" / "meta.json").is_file()
    assert (tmp_path / "ray_storage" / "rel").is_dir()  # a relative storage path is a local folder
    evaluated = run_mot(plugin_site, tmp_path, "eval", "runs/rel")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "val/text/loss" in evaluated.stdout


def test_a_worker_error_that_repeats_ends_the_launch_on_its_first_attempt(plugin_site, tmp_path):
    """A setting only the workers can check (flex attention has no CPU backward) fails the same
    way on every attempt: one attempt, one line, although launch.max_failures allows 2 more."""
    config = _write(tmp_path, "flex")
    started = time.monotonic()
    result = _launch(plugin_site, tmp_path, str(config), "model.attention_backend=flex", "--num-workers", "2")
    assert result.returncode == 2, result.stdout[-5000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("error: training on Ray failed: attention backend 'flex' has no backward pass on CPU"), last
    assert "restarting it from the last checkpoint" not in result.stdout
    assert time.monotonic() - started < 120


class _FakeTrainer:
    def __init__(self, outcomes: list):
        self.outcomes = outcomes

    def fit(self):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return types.SimpleNamespace(error=None, metrics={"loss": outcome})


def _wrapped(error: BaseException) -> RuntimeError:
    """As Ray reports a worker's error: nested in a group error's worker_failures."""
    group = RuntimeError("Training failed due to worker errors")
    group.worker_failures = {0: error}
    return group


@pytest.mark.parametrize(
    "outcomes, max_failures, fits, message",
    [
        ([_wrapped(RuntimeError("node lost")), _wrapped(RuntimeError("node lost")), 1.5], 2, 3, None),
        ([_wrapped(RuntimeError("node lost"))] * 2, 1, 2, "training on Ray failed (after 2 attempts): node lost"),
        ([_wrapped(RuntimeError("node lost"))], 0, 1, "training on Ray failed: node lost"),
        ([_wrapped(MotError("no file x.txt"))], 3, 1, "training on Ray failed: no file x.txt"),
        ([_wrapped(RuntimeError("node lost"))] * 3 + [2.0], -1, 4, None),
    ],
)
def test_the_driver_restarts_a_failed_group_but_not_a_repeating_error(outcomes, max_failures, fits, message):
    from mot_core.distributed.launch import fit_with_retries

    made: list[int] = []
    queue = list(outcomes)

    def make_trainer():
        made.append(1)
        return _FakeTrainer(queue)

    if message is None:
        assert fit_with_retries(make_trainer, max_failures) == {"loss": outcomes[-1]}
    else:
        with pytest.raises(MotError) as raised:
            fit_with_retries(make_trainer, max_failures)
        assert str(raised.value) == message
    assert len(made) == fits


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any training
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, overrides, message",
    [
        (["--num-workers", "0"], [], "--num-workers: expected an integer >= 1"),
        (["--num-workers", "3"], [], "train.batch_size=4 is not divisible by 3 workers"),
        (["--address", "127.0.0.1:9"], [], "no Ray cluster reachable at 127.0.0.1:9"),
        (["--address", "nonsense"], [], "is not HOST:PORT"),
        (["--gpus-per-worker", "64"], [], "GPUs but this machine has"),
        ([], ["launch.storage_path={file}/sub"], "a_file is a file; give a folder"),
        ([], ["launch.strategy=zero3"], "launch.strategy"),
    ],
)
def test_bad_launch_input_is_one_line(tmp_path, plugin_site, extra, overrides, message):
    config = _write(tmp_path, "bad")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    overrides = [o.format(file=blocker) for o in overrides]
    started = time.monotonic()
    result = run_mot(plugin_site, tmp_path, "launch", str(config), *overrides, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="mot launch runs on Ray (the GPU check runs FSDP2 through mot train --process-group)")
def test_fsdp2_bf16_on_gpu(tmp_path, plugin_site, capsys):
    """A short FSDP2 launch on every local GPU (NCCL, bf16 compute): it trains, and its
    tokens/s is printed (run with -s to see it)."""
    workers = 2 if torch.cuda.device_count() >= 2 else 1
    data = _config(tmp_path / "gpu", "fsdp2")
    data["run"]["device"] = "auto"
    data["model"].update(dim=256, n_layers=4, n_heads=4, max_seq_len=512)
    data["train"].update(steps=30, batch_size=8 * workers, seq_len=512, precision="bf16", eval_every=0,
                         checkpoint_every=0, log_every=10)
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(data))
    result = _launch(plugin_site, tmp_path, str(path), "--num-workers", str(workers), "--gpus-per-worker", "1")
    assert result.returncode == 0, result.stdout[-5000:]
    assert f"{workers} workers, fsdp2, nccl, bf16, device: cuda" in result.stdout
    records = _metrics(tmp_path / "gpu")
    assert records[-1]["loss"] < records[0]["loss"]
    speed = sorted(r["tokens_per_s"] for r in records[5:])[len(records[5:]) // 2]
    with capsys.disabled():
        print(f"\nFSDP2 bf16, {workers} GPU worker(s): median {speed:,.0f} tokens/s")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_a_launch_from_a_pretrained_lm_keeps_its_frozen_tower_bit_identical(plugin_site, tmp_path, text_corpus,
                                                                            strategy):
    """`mot launch` from a local HF Llama folder: the text tower and rows frozen, the time-series
    tower a copy of the text tower. With FSDP2 each worker builds on the meta device and loads
    its own shards; either way the exported weights hold the checkpoint's text tower unchanged."""
    from safetensors.torch import load_file

    from test_pretrained import hf_folder

    folder = hf_folder(tmp_path, text_corpus, "llama", num_attention_heads=4, num_key_value_heads=2)
    data = _config(tmp_path / "run", strategy)
    data["model"] = {"max_seq_len": 64, "init_from": {"path": str(folder)}}
    data["train"].update(steps=4, eval_every=0, checkpoint_every=2)
    text = data["mixture"]["modalities"]["text"]
    text["options"] = {"tokenizer_path": str(folder)}
    text["tower"] = {"trainable": False, "vocab_rows_trainable": False}
    data["mixture"]["datasets"]["text_files"] = {"options": {"paths": [str(text_corpus / "*.txt")]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    result = _launch(plugin_site, tmp_path, "run.yaml", "--num-workers", "2")
    assert result.returncode == 0, result.stdout[-5000:]
    assert "towers copied from it: timeseries_patches" in result.stdout
    if strategy == "fsdp2":
        started = {line[line.index("start-up:"):] for line in result.stdout.splitlines() if "start-up:" in line}
        assert len(started) == 2 and all("its own shards, built on the meta device" in line for line in started)
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000004" / "model.safetensors"))
    hf = load_file(str(folder / "model.safetensors"))
    assert torch.equal(state["embed.weight_frozen"], hf["model.embed_tokens.weight"])
    for i in range(2):
        layer = f"model.layers.{i}."
        qkv = torch.cat([hf[layer + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(state[f"layers.{i}.wqkv.weight_frozen"][0], qkv)
        assert torch.equal(state[f"layers.{i}.ffn.w13.weight_frozen"][0],
                           torch.cat([hf[layer + "mlp.gate_proj.weight"], hf[layer + "mlp.up_proj.weight"]]))
        assert not torch.equal(state[f"layers.{i}.wqkv.weight"][0], qkv)  # the copied tower learned
