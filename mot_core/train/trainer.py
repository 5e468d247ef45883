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
import time
from pathlib import Path

import torch

from mot_core.train import checkpoint as ckpt
from mot_core.config import RunConfig
from mot_core.data import PackedStream, fixed_batches
from mot_core.errors import MotError
from mot_core.plugin_api import progress
from mot_core.train.evaluation import describe_coverage, evaluate, forward_losses, reduce_losses
from mot_core.train.runtime import LocalRuntime, Runtime
from mot_core.train.experiment import Experiment, build_experiment, build_model, extras_sampler, model_args
from mot_core.train.pretrained import check_tensors, check_vocabulary, read_checkpoint, resolve_init_from, start_from_pretrained
from mot_core.train.resume import apply_optimizer_settings, resume_changes
from mot_core.train.tokenize import open_data, prepare_vocabulary
from mot_core.train.trackers import check_trackers, open_trackers, read_records
from mot_core.train.memory import check_training_fits
from mot_core.launch.device import autocast_for, describe_precision, keep_freed_memory_in_heap, resolve_device, seed_everything
from mot_core.launch.host import host_memory_mb
from mot_core.launch.parallel import materialize, real_tensors
from mot_core.model.transformer import warm_start_from_dense
from mot_core.plotting import run_loss_curves


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``. ``step`` is 0-based."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:  # frozen towers and rows: no optimizer state
            continue
        # norm gains and biases (of plugin-owned modules) are not decayed, matrices are
        (no_decay if "norm" in name or param.ndim < 2 else decay).append(param)
    if not decay and not no_decay:
        raise MotError("nothing would train: every tower and every vocabulary row is frozen (tower.trainable, "
                       "tower.vocab_rows_trainable); let one of them train")
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


def train(config: RunConfig, make_runtime=LocalRuntime) -> dict:
    """Run (or resume) training. Returns the last step's metrics and final validation metrics.
    ``make_runtime(device, run_dir)``: a ``LocalRuntime`` or a subclass (a sweep's trial
    reports its metrics to Ray Tune)."""
    saved = Path(config.run.dir) / "config.yaml"
    started = saved.is_file() and bool(ckpt.list_checkpoints(saved.parent))
    config = resolve_init_from(config, saved.read_text() if started else None)
    exp = build_experiment(config)
    run_dir = exp.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise MotError(f"run.dir {run_dir} is a file; give a folder (it is created if missing)")
    if ckpt.list_checkpoints(run_dir) and config.run.resume == "never":
        raise MotError(f"{run_dir} already holds checkpoints; use run.resume=auto to continue or a new run.dir")
    check_trackers(config.train.loggers)  # before the run folder is created
    lock = ckpt.RunLock(run_dir)
    try:
        removed = ckpt.clean_leftovers(run_dir)
        if removed:
            print(f"removed leftovers of an interrupted checkpoint save: {', '.join(removed)}")
        return run_loop(config, exp, make_runtime(resolve_device(config.run.device), run_dir))
    except OSError as exc:  # metrics, config or state files: the disk, not the code
        raise ckpt.storage_error(exc, Path(exc.filename or run_dir), "training") from None
    finally:
        lock.release()


def mix_record(stream: PackedStream, sources: list[str], modalities: list[str], runtime: Runtime) -> dict[str, float]:
    """Token shares read so far by every worker (padding excluded), per source and per modality."""
    by_source, by_modality = stream.token_counts()
    counts = torch.tensor([*by_source, *(by_modality.get(m, 0) for m in range(len(modalities)))], dtype=torch.float64,
                          device=runtime.device)
    counts = runtime.all_reduce_sum(counts).cpu().numpy()
    total = max(1.0, float(counts[: len(sources)].sum()))
    record = {f"share/source/{name}": float(counts[i]) / total for i, name in enumerate(sources)}
    record.update({f"share/modality/{name}": float(counts[len(sources) + m]) / total
                   for m, name in enumerate(modalities) if counts[len(sources) + m]})
    return record


def describe_mix(stream: PackedStream, sources: list[str], modalities: list[str], batches: int = 200) -> str:
    """The configured token shares next to those of the next ``batches`` batches of this
    process's rows (read from a copy of the stream: the run's own stream does not move)."""
    rows = len(stream.owned)
    batches = max(1, min(batches, 2_000_000 // (rows * stream.seq_len)))  # at most ~2M tokens of packing
    by_source, by_modality = stream.preview_shares(batches)
    parts = [f"{name} {100 * share:.1f}% (weight {100 * target:.1f}%, {length:.0f} tokens/doc)"
             for name, share, target, length in zip(sources, by_source, stream.target_shares, stream.mean_lengths)]
    kinds = ", ".join(f"{modalities[m]} {100 * share:.1f}%" for m, share in by_modality.items())
    return (f"data mix over the next {batches} batches (weights are shares of {stream.weight_unit}): {'; '.join(parts)} | "
            f"modalities: {kinds}")


def step_loss(per_modality: dict, exp: Experiment, runtime: Runtime) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective to differentiate on this worker, and each modality's loss over the GLOBAL
    batch (every worker's rows).

    Each modality's mean divides this worker's loss sum by the count over all workers, times
    the number of workers: data-parallel gradients are averaged over workers, so the update is
    exactly the gradient of the single-process loss of the whole global batch."""
    row = {name: i for i, name in enumerate(exp.losses)}
    reduced = {name: reduce_losses(losses, valid, piece, exp.losses[name].reduction)
               for name, (losses, valid, piece) in per_modality.items()}
    # (modalities, 2) sums and counts, built on the device: one all-reduce, one host read
    table = torch.zeros(len(row), 2, dtype=torch.float64, device=runtime.device)
    for name, (loss_sum, count) in reduced.items():
        table[row[name], 0] = loss_sum.detach().double()
        table[row[name], 1] = count.double()
    stats = runtime.all_reduce_sum(table).tolist()
    total = torch.zeros((), device=runtime.device)
    for name, (loss_sum, _) in reduced.items():
        count = stats[row[name]][1]
        if count:  # present but with no scored position anywhere: contributes nothing
            total = total + exp.loss_weights[name] * (loss_sum / count)
    means = {name: stats[i][0] / stats[i][1] for name, i in row.items() if stats[i][1]}
    return total * runtime.world if runtime.world > 1 else total, means


def run_loop(config: RunConfig, exp: Experiment, runtime: Runtime) -> dict:
    """The training loop of ``mot train`` and of every ``mot launch`` worker."""
    tcfg = config.train
    run_dir = exp.run_dir
    device = runtime.device
    main = runtime.is_main
    if config.model.attention_backend == "flex" and device.type == "cpu":  # before torch warns about it
        raise MotError("attention backend 'flex' has no backward pass on CPU in this torch; train with "
                       "model.attention_backend=sdpa (flex works on CPU for eval and generation)")
    if main:  # the trackers' packages (the main process logs), before anything is written
        check_trackers(tcfg.loggers)
    describe_precision(device, tcfg.precision)  # a bad MOT_CPU_BF16 is refused before anything is written
    seed_everything(config.run.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
        keep_freed_memory_in_heap()

    vocab = prepare_vocabulary(exp)
    args = model_args(config, vocab)
    check_training_fits(args, device, runtime.world if runtime.shards_at_build else 1)  # before tokenizing or allocating
    data = open_data(exp, vocab, missing=runtime.missing_data, progress=main)
    config_yaml = exp.resolved_yaml()
    latest = runtime.latest()
    # Settings that may not change on resume are refused here, before the run folder changes.
    changes = resume_changes(runtime.saved_config(latest), config_yaml, str(latest)) if latest is not None else []
    pretrained = None
    if latest is None and config.model.init_from is not None:
        init = config.model.init_from
        pretrained = read_checkpoint(init.path)
        check_vocabulary(pretrained, vocab.modalities[init.modality].vocab_size, init.modality, init.path)
        check_tensors(pretrained, args)
    if main:
        (run_dir / "config.yaml").write_text(config_yaml)  # what runs from now on

    held_before = host_memory_mb().get("anon", 0.0)
    torch.manual_seed(config.run.seed)
    # A sharding worker whose weights all come from somewhere (its checkpoint, a warm start, a
    # pretrained model) allocates only its own shards: the engine's parameters start on the
    # meta device, and nothing holds the whole model (Bagel's users' start-up OOM).
    sharded_start = runtime.shards_at_build and (
        latest is not None or pretrained is not None or bool(config.model.warm_start))
    model = build_model(args, vocab, empty_core=sharded_start)
    counts = model.parameter_counts()
    flops = model.flops_per_token(tcfg.seq_len)
    if sharded_start:
        kept = real_tensors(model)
        forward = runtime.wrap(model)
        materialize(model, device, kept, model.reset_parameters)
    else:
        model = model.to(device)
    if latest is None and config.model.warm_start:
        source = Path(config.model.warm_start)
        warm_start_from_dense(model, ckpt.LazyWeights(source))
        if main:
            print(f"warm start: copied {source} into every tower")
    if pretrained is not None:
        message = start_from_pretrained(model, pretrained, config, vocab)
        if main:
            print(message)
    if not sharded_start:
        forward = runtime.wrap(model)
    memory = host_memory_mb()
    if memory:
        # Allocated memory (RssAnon) is the measure: the resident peak also counts the pages of
        # memory-mapped checkpoints read, which the kernel drops first under pressure.
        who = f" on worker {runtime.rank}" if runtime.world > 1 else ""
        print(f"start-up: host memory {memory['anon']:,.0f} MB allocated{who} "
              f"({memory['anon'] - held_before:+,.0f} MB for the model: "
              f"{'its own shards, built on the meta device' if sharded_start else 'built whole'}; "
              f"resident peak {memory['peak']:,.0f} MB)", flush=True)
    optimizer = build_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr_ratio)
    )
    names = list(exp.source_weights)
    extras = extras_sampler(exp, vocab)
    stream = PackedStream([data.train[n] for n in names], [exp.source_weights[n] for n in names], tcfg.seq_len,
                          config.run.seed, lanes=tcfg.batch_size, owned=runtime.lanes(tcfg.batch_size), extras=extras,
                          weight_unit=config.mixture.weight_unit)
    val_batches = fixed_batches(data.val, tcfg.batch_size, tcfg.seq_len, tcfg.eval_batches, len(vocab.names), extras,
                                tcfg.eval_sampling)
    if main:
        print("\n".join(describe_coverage(val_batches, list(exp.sources), vocab.names)))
    # Modules a plugin owns (adapters, heads) sit idle when their modality is absent from a
    # worker's rows. A zero-weighted term gives them a zero gradient, as every tower gets, so
    # all workers run the same collectives and AdamW treats them alike whatever the sharding.
    # (Read after each forward: a sharded model holds its gathered parameters only then.)
    owned = lambda: [p for p in model.modality_modules.parameters() if p.requires_grad]  # noqa: E731

    step, skipped_total = 0, 0
    if latest is not None:
        meta, state = runtime.load(latest, model, optimizer, args)
        scheduler.load_state_dict(state["scheduler"])
        apply_optimizer_settings(optimizer, scheduler, tcfg)  # the config's lr, schedule, betas, decay
        stream.load_state_dict(state["data"])
        step, skipped_total = meta["step"], state.get("skipped_updates", 0)
        if main:
            print(f"resuming from {latest} (step {step})")
            if changes:
                print(f"changed on resume, in effect from step {step + 1}: {'; '.join(changes)}")

    if main:
        print(describe_mix(stream, names, vocab.names))
        print(
            f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active_per_token'] / 1e6:.2f}M active per token, "
            f"{flops / 1e6:.1f} MFLOP per token per training step | "
            f"modalities: {', '.join(f'{n} ({vocab.modalities[n].vocab_size} ids)' for n in vocab.names)} | "
            f"{runtime.describe()} | precision: {describe_precision(device, tcfg.precision)}"
        )
    # Before step 1: every modality's loss and evaluators once on a real (held-out) batch, so
    # a plugin mistake is reported before anything trains or a checkpoint is due.
    autocast = autocast_for(device, tcfg.precision)
    rng = torch.get_rng_state()
    evaluate(model, val_batches[:1], vocab, exp, device, autocast)
    torch.set_rng_state(rng)
    log = MetricsLog(run_dir / "metrics.jsonl", step) if main else None
    trackers = open_trackers(config, run_dir, step, main)  # after MetricsLog has cut the file at `step`

    def save() -> str:
        state = {"scheduler": scheduler.state_dict(), "data": runtime.gather_stream_state(data_state),
                 "skipped_updates": skipped_total}
        return runtime.save(step, model, optimizer, state, config_yaml, args, tcfg.keep_checkpoints, record)

    data_state = stream.state_dict()
    last_saved = step
    consecutive_skips = 0
    updating = False
    record: dict = {}
    bar = None
    failure: BaseException | None = None
    write = print if main else (lambda _: None)
    try:
        if tcfg.eval_at_start and step == 0:
            rng = torch.get_rng_state()
            start = {"step": 0, **evaluate(model, val_batches, vocab, exp, device, autocast)}
            torch.set_rng_state(rng)
            if log is not None:
                log.write(start)
                trackers.log(start)
                print(" | ".join([f"step 0/{tcfg.steps} (before training)",
                                  *(f"{k} {v:.4f}" for k, v in start.items() if k.startswith("val/"))]))
        bar = progress(total=tcfg.steps, initial=step, disable=not (tcfg.progress and main), desc="train",
                       dynamic_ncols=True)
        write = bar.write if main else write
        model.train()
        while step < tcfg.steps:
            started = time.perf_counter()
            batch = stream.next_batch(len(vocab.names)).to(device)
            with autocast():
                per_modality = forward_losses(model, batch, vocab, exp, forward=forward)
            total, means = step_loss(per_modality, exp, runtime)
            record = {"step": step + 1, **{f"loss/{name}": value for name, value in means.items()}}
            total_value = sum(exp.loss_weights[name] * value for name, value in means.items())
            aux = model.auxiliary_loss()
            if aux is not None:  # MoE routers: load balance and z-loss, already weighted, per worker
                total = total + aux
                total_value += float(runtime.all_reduce_sum(aux.detach().double().reshape(1))) / runtime.world
            idle = owned()
            if idle:
                total = total + 0.0 * sum(p.sum() for p in idle)
            if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
                record.update(model.router_stats(vocab.names))
                record.update(mix_record(stream, names, vocab.names, runtime))
            if not math.isfinite(total_value) and tcfg.on_nonfinite == "stop":
                raise MotError(
                    f"loss is {total_value} at step {step + 1}; stopped before it reached the weights "
                    f"(last checkpoint: step {last_saved}; train.on_nonfinite=skip skips such steps instead)"
                )
            optimizer.zero_grad(set_to_none=True)
            if math.isfinite(total_value):
                total.backward()
                grad_norm = runtime.clip_grad_norm(model.parameters(), tcfg.grad_clip or float("inf"))
            else:
                grad_norm = float("nan")
            finite_grads = math.isfinite(grad_norm)
            if not finite_grads and tcfg.on_nonfinite == "stop":
                raise MotError(
                    f"gradient norm is {grad_norm} at step {step + 1}; stopped before it reached the weights "
                    f"(last checkpoint: step {last_saved}; train.on_nonfinite=skip skips such steps instead)"
                )
            if finite_grads:
                consecutive_skips = 0
            else:
                consecutive_skips, skipped_total = consecutive_skips + 1, skipped_total + 1
                over = ("consecutive", consecutive_skips, tcfg.max_consecutive_skips) \
                    if consecutive_skips > tcfg.max_consecutive_skips else \
                    ("total", skipped_total, tcfg.max_total_skips) if skipped_total > tcfg.max_total_skips else None
                if over is not None:
                    kind, count, limit = over
                    raise MotError(
                        f"{count} {kind} updates skipped for a non-finite gradient at step {step + 1} "
                        f"(train.max_{kind}_skips={limit}): the run diverged; "
                        + (f"the last good checkpoint is step {last_saved} in {run_dir}: resume it with a lower train.lr "
                           "(it may change on resume)" if last_saved else "no checkpoint was saved: lower train.lr")
                    )
            updating = True  # an interrupt inside this window leaves no consistent state to save
            if finite_grads:
                optimizer.step()
            else:
                record["skipped"] = 1  # the update is dropped; the schedule moves on with the step count
                write(f"step {step + 1}: gradient norm {grad_norm}; update skipped (train.on_nonfinite=skip, "
                      f"{consecutive_skips} in a row, {skipped_total} in all)")
            scheduler.step()
            step += 1
            data_state = stream.state_dict()
            updating = False
            elapsed = time.perf_counter() - started
            record.update(
                loss=total_value, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                tokens_per_s=batch.num_tokens * runtime.world / elapsed, step_time_s=elapsed,
            )
            final = step == tcfg.steps
            if (tcfg.eval_every and step % tcfg.eval_every == 0) or final:
                record.update(evaluate(model, val_batches, vocab, exp, device, autocast))
            if log is not None:
                log.write(record)
                trackers.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)  # shown by the update
            bar.update(1)
            logged = step % tcfg.log_every == 0 or final or any(k.startswith("val/") for k in record)
            if logged:
                write(_format(record, tcfg.steps))
            if (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or final:
                save()
                last_saved = step
            elif logged:
                runtime.report(record)
        if trackers:
            trackers.log_images(step, run_figures(run_dir))
    except BaseException as exc:
        failure = exc  # what the trackers record as the run's end (failed, or killed by an interrupt)
        if isinstance(exc, KeyboardInterrupt) and step > last_saved and not updating and runtime.world == 1:
            write(f"interrupted: saved {save()}")
        raise
    finally:
        if bar is not None:
            bar.close()
        trackers.close(failure)
    return record


def run_figures(run_dir: Path) -> dict[str, Path]:
    """The figures of a finished run, sent to its trackers (tag -> PNG): the loss curves of its
    ``metrics.jsonl`` (``loss_curves.png`` in the run folder; training writes no other figure)."""
    path = run_dir / "loss_curves.png"
    return {"loss_curves": path} if run_loss_curves(read_records(run_dir / "metrics.jsonl"), path, run_dir.name) else {}


def _format(record: dict, total_steps: int) -> str:
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss/")]
    parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val/")]
    return " | ".join(parts)
