"""Validation: per-modality loss over fixed held-out batches, plus each modality's evaluators."""

from __future__ import annotations

import torch

from mot_core.data import IGNORE, Batch, Vocabulary
from mot_core.experiment import Experiment
from mot_core.plugin_api import EvaluationContext


def forward_losses(model, batch: Batch, vocab: Vocabulary, exp: Experiment):
    """One forward pass -> {modality: (losses (n,), valid (n,), slice)} for modalities present."""
    hidden = model(batch.tokens, batch.positions, batch.modality, batch.plan, batch.layout)
    out = {}
    for name, (start, end, piece) in batch.modality_slices(vocab).items():
        losses, valid = exp.losses[name].per_token(model, hidden[start:end], piece)
        out[name] = (losses, valid, piece)
    return out


@torch.no_grad()
def evaluate(model, batches: list[Batch], vocab: Vocabulary, exp: Experiment, device, autocast,
             context: EvaluationContext | None = None) -> dict[str, float]:
    """Returns ``val/<modality>/loss`` and ``val/<modality>/<metric>`` for each evaluator;
    with a ``context`` (``mot eval``), model-level metrics too."""
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
            sums[name][0] += float(losses[valid].sum())
            sums[name][1] += int(valid.sum())
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
