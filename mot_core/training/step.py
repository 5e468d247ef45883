"""One training step: a batch of this worker's rows, every modality's loss, the backward pass,
the clipped update (or a skipped one), and the step's record.

Loss: ``sum_m w_m * mean_m`` where ``mean_m`` is modality m's loss in the batch, reduced as its
loss declares (a mean over valid positions, or over segments of per-segment means; see
``evaluation.reduce_losses``): Transfusion's L_LM + lambda * L_DDPM form. A modality absent
from a batch contributes nothing. MoE routers add their weighted auxiliary losses.
"""

from __future__ import annotations

import math
import time

import torch

from mot_core.data import PackedStream
from mot_core.experiment.build import Experiment
from mot_core.training.evaluation import forward_losses, reduce_losses
from mot_core.training.runtime import Runtime
from mot_core.training.state import TrainState


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
    stats = runtime.parallel.all_reduce_sum(table).tolist()
    total = torch.zeros((), device=runtime.device)
    for name, (loss_sum, _) in reduced.items():
        count = stats[row[name]][1]
        if count:  # present but with no scored position anywhere: contributes nothing
            total = total + exp.loss_weights[name] * (loss_sum / count)
    means = {name: stats[i][0] / stats[i][1] for name, i in row.items() if stats[i][1]}
    return total * runtime.world if runtime.world > 1 else total, means


def mix_record(stream: PackedStream, sources: list[str], modalities: list[str], runtime: Runtime) -> dict[str, float]:
    """Token shares read so far by every worker (padding excluded), per source and per modality."""
    by_source, by_modality = stream.token_counts()
    counts = torch.tensor([*by_source, *(by_modality.get(m, 0) for m in range(len(modalities)))], dtype=torch.float64,
                          device=runtime.device)
    counts = runtime.parallel.all_reduce_sum(counts).cpu().numpy()
    total = max(1.0, float(counts[: len(sources)].sum()))
    record = {f"share/source/{name}": float(counts[i]) / total for i, name in enumerate(sources)}
    record.update({f"share/modality/{name}": float(counts[len(sources) + m]) / total
                   for m, name in enumerate(modalities) if counts[len(sources) + m]})
    return record


def train_step(state: TrainState, exp: Experiment, runtime: Runtime, write) -> dict:
    """Train one step; returns its record (``step``, per-modality losses, ``loss``, ``lr``,
    ``grad_norm``, throughput, and on logged steps router statistics and token shares)."""
    tcfg, names, skips = exp.config.train, state.vocab.names, state.skips
    started = time.perf_counter()
    batch = state.stream.next_batch(len(names)).to(runtime.device)
    if not state.reads_reported:
        state.reads_reported = True
        reads = state.object_store_reads()
        if reads:  # every worker's own figure: each reads only its lanes' documents
            print(f"worker {runtime.rank}: {reads} before step {state.step + 1}", flush=True)
    with state.autocast():
        per_modality = forward_losses(state.model, batch, state.vocab, exp, forward=state.forward)
    total, means = step_loss(per_modality, exp, runtime)
    record = {"step": state.step + 1, **{f"loss/{name}": value for name, value in means.items()}}
    total_value = sum(exp.loss_weights[name] * value for name, value in means.items())
    aux = state.model.auxiliary_loss()
    if aux is not None:  # MoE routers: load balance and z-loss, already weighted, per worker
        total = total + aux
        total_value += float(runtime.parallel.all_reduce_sum(aux.detach().double().reshape(1))) / runtime.world
    # Modules a plugin owns (adapters, heads) sit idle when their modality is absent from a
    # worker's rows. A zero-weighted term gives them a zero gradient, as every tower gets, so
    # all workers run the same collectives and AdamW treats them alike whatever the sharding.
    idle = state.trainable_modality_modules()
    if idle:
        total = total + 0.0 * sum(p.sum() for p in idle)
    if (state.step + 1) % tcfg.log_every == 0 or state.step + 1 == tcfg.steps:
        record.update(state.model.router_stats(names))
        record.update(mix_record(state.stream, state.sources, names, runtime))
    skips.check_loss(total_value, state.step + 1)
    state.optimizer.zero_grad(set_to_none=True)
    if math.isfinite(total_value):
        total.backward()
        grad_norm = runtime.parallel.clip_grad_norm(state.model.parameters(), tcfg.grad_clip or float("inf"))
    else:
        grad_norm = float("nan")
    apply = skips.check_gradient(grad_norm, state.step + 1)
    state.updating = True  # an interrupt from here until the step is counted leaves no state to save
    if apply:
        state.optimizer.step()
    else:
        record["skipped"] = 1  # the update is dropped; the schedule moves on with the step count
        write(f"step {state.step + 1}: gradient norm {grad_norm}; update skipped (train.on_nonfinite=skip, "
              f"{skips.consecutive} in a row, {skips.total} in all)")
    state.scheduler.step()
    state.step += 1
    state.data_state = state.stream.state_dict()
    state.updating = False
    elapsed = time.perf_counter() - started
    record.update(loss=total_value, lr=state.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                  tokens_per_s=batch.num_tokens * runtime.world / elapsed, step_time_s=elapsed)
    return record
