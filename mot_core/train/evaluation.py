"""Validation: per-modality loss over fixed held-out batches, plus each modality's evaluators."""

from __future__ import annotations

import torch

from mot_core.data import IGNORE, Batch, Vocabulary
from mot_core.model.transformer import ContinuousInputs
from mot_core.plugin_api import EvaluationContext, ModalitySlice
from mot_core.train.experiment import Experiment


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
        losses, valid = exp.losses[name].per_token(model, hidden[start:end], piece)
        out[name] = (losses, valid, piece)
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
    evaluators = {name: [cls(exp.modalities[name]) for cls in classes] for name, classes in exp.evaluators.items()}
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
                ev.update(losses, valid, local)
    metrics = {}
    for name, (total, count) in sums.items():
        if count:
            metrics[f"val/{name}/loss"] = total / count
        for ev in evaluators[name]:
            results = ev.compute()
            if context is not None:
                results.update(ev.evaluate_model(context))
            for key, value in results.items():
                if key != "loss":
                    metrics[f"val/{name}/{key}"] = value
    model.train(was_training)
    return metrics
