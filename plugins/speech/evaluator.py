"""Speech evaluation: unit-token loss, and (``mot eval``) the tokenizer's unit statistics on
held-out clips: perplexity of the unit distribution, units used, units per second."""

from __future__ import annotations

import torch

from mot_core.plugin_api import EvaluationContext, Evaluator
from plugins.speech.modality import clips
from plugins.speech.units import unit_statistics


class SpeechUnitsEvaluator(Evaluator):
    """``loss``: mean nats per predicted speech position; ``unit_loss``: over positions whose
    target is a unit (not the end marker or another modality's token)."""

    name = "speech_units"

    def reset(self) -> None:
        self.nats, self.tokens, self.unit_nats, self.units = 0.0, 0, 0.0, 0

    def update(self, losses: torch.Tensor, valid: torch.Tensor, local_targets: torch.Tensor) -> None:
        losses = losses.double()
        is_unit = valid & (local_targets >= 0) & (local_targets < self.modality.options.n_units)
        self.nats += float(losses[valid].sum())
        self.tokens += int(valid.sum())
        self.unit_nats += float(losses[is_unit].sum())
        self.units += int(is_unit.sum())

    def compute(self) -> dict[str, float]:
        metrics = {"loss": self.nats / self.tokens} if self.tokens else {}
        if self.units:
            metrics["unit_loss"] = self.unit_nats / self.units
        return metrics

    def evaluate_model(self, context: EvaluationContext) -> dict[str, float]:
        modality = self.modality
        held_out = clips(context.val_docs, modality.name)
        tokenizer = modality._require()
        units = [tokenizer.units(modality._samples(clip)) for clip in held_out]  # before deduplication
        return unit_statistics(units, modality.options.n_units, sum(c.seconds for c in held_out))
