"""The training loop, readable at a glance: build the state, then step, evaluate, log and save
until ``train.steps``. The same loop runs in ``mot train``, in every worker of ``mot launch``
and of a process group, and in a sweep's trials; what differs is the runtime it is given
(``runtime.py``). It is started by ``mot_core.runs.start_run``, after every refusal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mot_core.plotting import run_loss_curves
from mot_core.progress import progress
from mot_core.training.evaluation import evaluate
from mot_core.training.runtime import Runtime
from mot_core.training.state import PreparedRun, TrainState, build_state
from mot_core.training.step import train_step
from mot_core.training.trackers import open_trackers, read_records


def train_loop(run: PreparedRun, runtime: Runtime) -> dict:
    """Train ``run`` to ``train.steps``; returns the last step's record (its validation
    metrics included). An interrupt saves the last finished step (one process)."""
    exp, tcfg, main = run.exp, run.config.train, runtime.is_main
    state = build_state(run, runtime)
    _check_losses_and_evaluators(state, run, runtime)
    log = MetricsLog(exp.run_dir / "metrics.jsonl", state.step) if main else None
    trackers = open_trackers(run.config, exp.run_dir, state.step, main)  # after MetricsLog cut the file at the step
    record: dict = {}
    bar, failure = None, None
    write = print if main else (lambda _: None)
    try:
        if tcfg.eval_at_start and state.step == 0:
            _log_validation_at_start(state, run, runtime, log, trackers)
        bar = progress(total=tcfg.steps, initial=state.step, disable=not (tcfg.progress and main), desc="train",
                       dynamic_ncols=True)
        write = bar.write if main else write
        state.model.train()
        while state.step < tcfg.steps:
            record = train_step(state, exp, runtime, write)
            final = state.step == tcfg.steps
            if (tcfg.eval_every and state.step % tcfg.eval_every == 0) or final:
                record.update(evaluate(state.model, state.val_batches, state.vocab, exp, runtime.device, state.autocast))
            if log is not None:
                log.write(record)
                trackers.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)  # shown by the update
            bar.update(1)
            logged = state.step % tcfg.log_every == 0 or final or any(k.startswith("val/") for k in record)
            if logged:
                write(format_record(record, tcfg.steps))
            if (tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0) or final:
                save(state, run, runtime, record)
                state.skips.last_saved = state.step
            elif logged:
                runtime.reporter.report(record)
        if trackers:
            trackers.log_images(state.step, run_figures(exp.run_dir))
    except BaseException as exc:
        failure = exc  # what the trackers record as the run's end (failed, or killed by an interrupt)
        if isinstance(exc, KeyboardInterrupt) and state.step > state.skips.last_saved and not state.updating \
                and runtime.world == 1:
            write(f"interrupted: saved {save(state, run, runtime, record)}")
        raise
    finally:
        if bar is not None:
            bar.close()
        trackers.close(failure)
    runtime.store.finish(tcfg.keep_checkpoints, runtime.parallel)
    return record


def save(state: TrainState, run: PreparedRun, runtime: Runtime, record: dict) -> str:
    """Checkpoint the last finished step (a collective where there are several workers)."""
    trainer = {"scheduler": state.scheduler.state_dict(), "data": runtime.parallel.gather_stream_state(state.data_state),
               "skipped_updates": state.skips.total}
    return runtime.save(state.step, state.model, state.optimizer, trainer, run.config_yaml, run.args,
                        run.config.train.keep_checkpoints, record)


def _check_losses_and_evaluators(state: TrainState, run: PreparedRun, runtime: Runtime) -> None:
    """Every modality's loss and evaluators once on a real (held-out) batch before step 1, so a
    plugin mistake is reported before anything trains or a checkpoint is due."""
    rng = torch.get_rng_state()
    evaluate(state.model, state.val_batches[:1], state.vocab, run.exp, runtime.device, state.autocast)
    torch.set_rng_state(rng)


def _log_validation_at_start(state: TrainState, run: PreparedRun, runtime: Runtime, log, trackers) -> None:
    """``train.eval_at_start``: a step-0 record, where a pretrained or warm-started model begins."""
    rng = torch.get_rng_state()
    start = {"step": 0, **evaluate(state.model, state.val_batches, state.vocab, run.exp, runtime.device,
                                   state.autocast)}
    torch.set_rng_state(rng)
    if log is not None:
        log.write(start)
        trackers.log(start)
        print(" | ".join([f"step 0/{run.config.train.steps} (before training)",
                          *(f"{k} {v:.4f}" for k, v in start.items() if k.startswith("val/"))]))


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records after the checkpoint are dropped so
    the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept, torn = [], 0
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line) if line else None
                except ValueError:  # a line cut short by a crash
                    torn += 1
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                    kept.append(line)
            if torn:
                print(f"{path}: dropped {torn} incomplete line(s) left by an interrupted run")
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def run_figures(run_dir: Path) -> dict[str, Path]:
    """The figures of a finished run, sent to its trackers (tag -> PNG): the loss curves of its
    ``metrics.jsonl`` (``loss_curves.png`` in the run folder; training writes no other figure)."""
    path = run_dir / "loss_curves.png"
    return {"loss_curves": path} if run_loss_curves(read_records(run_dir / "metrics.jsonl"), path, run_dir.name) else {}


def format_record(record: dict, total_steps: int) -> str:
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss/")]
    parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val/")]
    return " | ".join(parts)
