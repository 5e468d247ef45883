"""Validation: per-modality loss over fixed held-out batches, plus each modality's evaluators."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch

from mot_core.data import IGNORE, Batch, Vocabulary
from mot_core.model.transformer import ContinuousInputs
from mot_core.errors import MotError, plugin_boundary
from mot_core.plugin_api import EvaluationContext, ModalitySlice, origin
from mot_core.experiment.build import Experiment


def continuous_inputs(batch: Batch) -> dict[int, ContinuousInputs]:
    """The model's adapter inputs: each modality's values, and the rows of its loss extras
    that belong to its continuous positions (the end of its slice)."""
    out = {}
    for m, values in batch.values.items():
        start, end = batch.plan.bounds(m)
        first_value = end - start - batch.plan.num_values(m)
        extras = {k: v[first_value:] for k, v in batch.extras.get(m, {}).items()}
        out[m] = ContinuousInputs(values, extras)
    return out


def forward_losses(model, batch: Batch, vocab: Vocabulary, exp: Experiment, forward=None):
    """One forward pass -> {modality: (losses (n,), valid (n,), slice)} for modalities present.

    ``forward``: what runs the pass (a data-parallel wrapper of ``model``); default ``model``."""
    hidden = (forward or model)(batch.tokens, batch.positions, batch.modality, batch.plan, batch.layout,
                   continuous=continuous_inputs(batch) if batch.values else None)
    owned = model.modality_modules
    out = {}
    for name, (start, end, piece) in batch.modality_slices(vocab).items():
        piece.head = owned[name].head if name in owned else None
        loss = exp.losses[name]
        where = f"{origin(loss)}: loss '{loss.name}' of modality '{name}', per_token"
        with plugin_boundary(where):
            result = loss.per_token(model, hidden[start:end], piece)
        out[name] = (*_checked_loss(result, len(piece), where), piece)
    return out


def _checked_loss(result, n: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_token``'s (losses, valid): a floating (n,) tensor and a bool (n,) tensor, one entry
    per position of the modality's slice."""
    if not isinstance(result, tuple) or len(result) != 2:
        raise MotError(f"{where} returned {type(result).__name__}; expected (losses, valid): two tensors of shape ({n},)")
    losses, valid = result
    if not isinstance(losses, torch.Tensor) or not losses.is_floating_point() or tuple(losses.shape) != (n,):
        got = f"{tuple(losses.shape)} {losses.dtype}" if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise MotError(f"{where}: losses is {got}; expected a floating tensor of shape ({n},), one per position "
                       "of the slice (reduction is the engine's job)")
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (n,):
        got = f"{tuple(valid.shape)} {valid.dtype}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise MotError(f"{where}: valid is {got}; expected a bool tensor of shape ({n},)")
    return losses, valid


def _checked_metrics(result, where: str) -> dict[str, float]:
    """An evaluator's output: a mapping of metric names to finite numbers."""
    if not isinstance(result, Mapping):
        raise MotError(f"{where} returned {type(result).__name__}; expected a dict of metric name -> number")
    out = {}
    for key, value in result.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise MotError(f"{where} returned {{{key!r}: {type(value).__name__}}}; expected metric names (str) "
                           "mapped to numbers")
        if not math.isfinite(float(value)):
            raise MotError(f"{where} returned {key} = {value}; metrics must be finite")
        out[key] = float(value)
    return out


def reduce_losses(losses: torch.Tensor, valid: torch.Tensor, piece: ModalitySlice, reduction: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) whose ratio is the modality's mean loss in this batch.

    token: sum over valid positions, and their number. segment: the sum of each segment's mean
    over its valid positions, and the number of segments with any valid position; segments are
    ``piece.segment`` ids (unique within the batch)."""
    losses = torch.where(valid, losses.float(), 0.0)
    if reduction == "token":
        return losses.sum(), valid.sum()
    if piece.segment is None:
        raise ValueError("a per-segment loss needs the batch's segment ids")
    _, inverse = torch.unique(piece.segment, return_inverse=True)
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    sums = losses.new_zeros(groups).index_add_(0, inverse, losses)
    counts = losses.new_zeros(groups).index_add_(0, inverse, valid.float())
    scored = counts > 0
    return (sums[scored] / counts[scored]).sum(), scored.sum()


@torch.no_grad()
def evaluate(model, batches: list[Batch], vocab: Vocabulary, exp: Experiment, device, autocast,
             context: EvaluationContext | None = None) -> dict[str, float]:
    """Returns ``val/<modality>/loss`` and ``val/<modality>/<metric>`` for each evaluator;
    with a ``context`` (``mot eval``), model-level metrics too.

    ``val/<modality>/loss`` is the modality's loss over all validation batches reduced as its
    loss declares: token, the mean over every valid position of the modality; segment, the mean
    over every segment of its per-segment means."""
    was_training = model.training
    model.eval()
    evaluators = {}
    for name, classes in exp.evaluators.items():
        evaluators[name] = []
        for cls in classes:
            with plugin_boundary(f"{origin(cls)}: evaluator '{cls.name}' of modality '{name}', __init__"):
                evaluators[name].append(cls(exp.modalities[name], exp.evaluator_options.get((name, cls.name))))
    sums = {name: [0.0, 0] for name in vocab.names}
    for batch in batches:
        batch = batch.to(device)
        with autocast():
            per_modality = forward_losses(model, batch, vocab, exp)
        for name, (losses, valid, piece) in per_modality.items():
            losses = losses.float()
            total, count = reduce_losses(losses, valid, piece, exp.losses[name].reduction)
            sums[name][0] += float(total)
            sums[name][1] += int(count)
            local = torch.where(piece.targets == IGNORE, piece.targets, piece.targets - piece.offset)
            for ev in evaluators[name]:
                with plugin_boundary(f"{origin(ev)}: evaluator '{ev.name}' of modality '{name}', update"):
                    ev.update(losses, valid, local)
    metrics = {}
    for name, (total, count) in sums.items():
        if count:
            metrics[f"val/{name}/loss"] = total / count
        for ev in evaluators[name]:
            where = f"{origin(ev)}: evaluator '{ev.name}' of modality '{name}'"
            with plugin_boundary(f"{where}, compute"):
                results = ev.compute()
            results = _checked_metrics(results, f"{where}, compute()")
            if context is not None:
                with plugin_boundary(f"{where}, evaluate_model"):
                    extra = ev.evaluate_model(context)
                results.update(_checked_metrics(extra, f"{where}, evaluate_model()"))
            for key, value in results.items():
                if key != "loss":
                    metrics[f"val/{name}/{key}"] = value
    model.train(was_training)
    return metrics


FEW_SCORED_POSITIONS = 1000  # below this, a modality's validation loss is a noisy estimate


def describe_coverage(batches, sources: list[str], modalities: list[str]) -> list[str]:
    """What validation scores: one line of positions per modality and of the held-out share
    each source's rows read, then a warning line per modality scored on few positions."""
    scored = getattr(batches, "modality_positions", {})
    read = getattr(batches, "source_tokens", [])
    lines = [
        f"validation: {len(batches)} batches score "
        + ", ".join(f"{modalities[m]} {count:,} positions" for m, count in sorted(scored.items()))
        + " | read "
        + ", ".join(f"{name} {got:,} of {held:,} held-out positions ({100 * got / max(1, held):.0f}%)"
                    for name, (held, got) in zip(sources, read))
    ]
    for m, name in enumerate(modalities):
        count = scored.get(m, 0)
        if count < FEW_SCORED_POSITIONS:
            lines.append(f"warning: validation scores modality '{name}' on {count:,} positions only, so val/{name}/* "
                         "is a noisy (or missing) estimate; raise train.eval_batches, or score every held-out position "
                         "with `mot eval RUN --full`")
    return lines
