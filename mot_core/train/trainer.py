"""The training loop, readable top to bottom: build, (resume), step, log, evaluate, save.

Loss: ``sum_m w_m * mean_m`` where ``mean_m`` is modality m's loss in the batch, reduced as its
loss declares (a mean over valid positions, or over segments of per-segment means; see
``evaluation.reduce_losses``): Transfusion's L_LM + lambda * L_DDPM form. A modality absent
from a batch contributes nothing. MoE routers add their weighted auxiliary losses.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mot_core.train import checkpoint as ckpt
from mot_core.config import RunConfig
from mot_core.data import PackedStream, fixed_batches
from mot_core.errors import MotError
from mot_core.train.evaluation import evaluate, forward_losses, reduce_losses
from mot_core.train.experiment import Experiment, build_experiment, build_model, extras_sampler, model_args, prepare_data
from mot_core.launch.device import autocast_for, keep_freed_memory_in_heap, resolve_device, seed_everything
from mot_core.model.transformer import warm_start_from_dense


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``. ``step`` is 0-based."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        # norm gains and biases (of plugin-owned modules) are not decayed, matrices are
        (no_decay if "norm" in name or param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters (CPU and CUDA); MoT holds a tower per modality,
    # so optimizer cost, unlike FLOPs, grows with the number of towers.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


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


def train(config: RunConfig) -> dict:
    """Run (or resume) training. Returns the last step's metrics and final validation metrics."""
    exp = build_experiment(config)
    run_dir = exp.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise MotError(f"run.dir {run_dir} is a file; give a folder (it is created if missing)")
    if ckpt.list_checkpoints(run_dir) and config.run.resume == "never":
        raise MotError(f"{run_dir} already holds checkpoints; use run.resume=auto to continue or a new run.dir")
    lock = ckpt.RunLock(run_dir)
    try:
        return _run(config, exp)
    except OSError as exc:  # metrics, config or state files: the disk, not the code
        raise ckpt.storage_error(exc, Path(exc.filename or run_dir), "training") from None
    finally:
        lock.release()


def _run(config: RunConfig, exp: Experiment) -> dict:
    """The body of ``train``, run while this process holds the run folder's lock."""
    tcfg = config.train
    run_dir = exp.run_dir
    removed = ckpt.clean_leftovers(run_dir)
    if removed:
        print(f"removed leftovers of an interrupted checkpoint save: {', '.join(removed)}")
    latest = ckpt.latest_intact(run_dir)
    device = resolve_device(config.run.device)
    seed_everything(config.run.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
        keep_freed_memory_in_heap()

    data = prepare_data(exp)
    vocab = data.vocab
    args = model_args(config, vocab)
    config_yaml = exp.resolved_yaml()
    (run_dir / "config.yaml").write_text(config_yaml)

    torch.manual_seed(config.run.seed)
    model = build_model(args, vocab).to(device)
    optimizer = build_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr_ratio)
    )
    names = list(exp.source_weights)
    extras = extras_sampler(exp, vocab)
    stream = PackedStream([data.train[n] for n in names], [exp.source_weights[n] for n in names], tcfg.seq_len,
                          config.run.seed, extras=extras)
    val_batches = fixed_batches(data.val, tcfg.batch_size, tcfg.seq_len, tcfg.eval_batches, len(vocab.names), extras)

    step = 0
    if latest is not None:
        meta = ckpt.read_meta(latest)
        ckpt.check_compatible(meta["model_args"], args, latest)
        model.load_state_dict(ckpt.load_weights(latest))
        state = ckpt.load_trainer_state(latest)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        step = meta["step"]
        print(f"resuming from {latest} (step {step})")
    elif config.model.warm_start:
        source = Path(config.model.warm_start)
        warm_start_from_dense(model, ckpt.load_weights(source))
        print(f"warm start: copied {source} into every tower")

    counts = model.parameter_counts()
    print(
        f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active_per_token'] / 1e6:.2f}M active per token, "
        f"{model.flops_per_token(tcfg.seq_len) / 1e6:.1f} MFLOP per token per training step | "
        f"modalities: {', '.join(f'{n} ({vocab.modalities[n].vocab_size} ids)' for n in vocab.names)} | device: {device}"
    )
    log = MetricsLog(run_dir / "metrics.jsonl", step)
    autocast = autocast_for(device, tcfg.precision)

    def trainer_state() -> dict:
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": data_state,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def save() -> Path:
        return ckpt.save_checkpoint(run_dir, step, model, trainer_state(), config_yaml, args, tcfg.keep_checkpoints)

    data_state = stream.state_dict()
    last_saved = step
    updating = False
    record: dict = {}
    bar = tqdm(total=tcfg.steps, initial=step, disable=not tcfg.progress, desc="train", dynamic_ncols=True)
    model.train()
    try:
        while step < tcfg.steps:
            started = time.perf_counter()
            batch = stream.next_batch(tcfg.batch_size, len(vocab.names)).to(device)
            with autocast():
                per_modality = forward_losses(model, batch, vocab, exp)
            total = torch.zeros((), device=device)
            record = {"step": step + 1}
            for name, (losses, valid, piece) in per_modality.items():
                loss_sum, count = reduce_losses(losses, valid, piece, exp.losses[name].reduction)
                if count:
                    mean = loss_sum / count
                    total = total + exp.loss_weights[name] * mean
                    record[f"loss/{name}"] = float(mean.detach())
            aux = model.auxiliary_loss()
            if aux is not None:  # MoE routers: load balance and z-loss, already weighted
                total = total + aux
            if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
                record.update(model.router_stats(vocab.names))
            total_value = float(total.detach())
            if not math.isfinite(total_value) and tcfg.on_nonfinite == "stop":
                raise MotError(
                    f"loss is {total_value} at step {step + 1}; stopped before it reached the weights "
                    f"(last checkpoint: step {last_saved}; train.on_nonfinite=skip skips such steps instead)"
                )
            optimizer.zero_grad(set_to_none=True)
            if math.isfinite(total_value):
                total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or float("inf"))
            else:
                grad_norm = torch.tensor(float("nan"))
            finite_grads = math.isfinite(float(grad_norm))
            if not finite_grads and tcfg.on_nonfinite == "stop":
                raise MotError(
                    f"gradient norm is {float(grad_norm)} at step {step + 1}; stopped before it reached the weights "
                    f"(last checkpoint: step {last_saved}; train.on_nonfinite=skip skips such steps instead)"
                )
            updating = True  # an interrupt inside this window leaves no consistent state to save
            if finite_grads:
                optimizer.step()
            else:
                record["skipped"] = 1  # the update is dropped; the schedule moves on with the step count
                bar.write(f"step {step + 1}: gradient norm {float(grad_norm)}; update skipped (train.on_nonfinite=skip)")
            scheduler.step()
            step += 1
            data_state = stream.state_dict()
            updating = False
            elapsed = time.perf_counter() - started
            record.update(
                loss=total_value, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                tokens_per_s=batch.num_tokens / elapsed, step_time_s=elapsed,
            )
            final = step == tcfg.steps
            if (tcfg.eval_every and step % tcfg.eval_every == 0) or final:
                record.update(evaluate(model, val_batches, vocab, exp, device, autocast))
            log.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if step % tcfg.log_every == 0 or final or any(k.startswith("val/") for k in record):
                bar.write(_format(record, tcfg.steps))
            if (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or final:
                save()
                last_saved = step
    except KeyboardInterrupt:
        if step > last_saved and not updating:
            bar.write(f"interrupted: saved {save()}")
        raise
    finally:
        bar.close()
    return record


def _format(record: dict, total_steps: int) -> str:
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss/")]
    parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val/")]
    return " | ".join(parts)
