"""Forecast metrics for the time-series modality: validation loss and bits per value."""

from __future__ import annotations

import math

import torch

from mot_core.plugin_api import Evaluator


class ForecastEvaluator(Evaluator):
    """``loss``: mean nats over every prediction made from a time-series position.
    ``bits_per_value``: sum(nats) / (ln 2 * number of values predicted), counting only the
    positions whose target is a time-series value (a bin id of this modality); with quantile
    bins it reads as the information, in bits, the model still needs per next value
    (log2(n_bins) for a uniform guess over the bins)."""

    name = "timeseries_forecast"

    def reset(self) -> None:
        self.nats = 0.0  # summed over all valid predictions
        self.predictions = 0
        self.value_nats = 0.0  # summed over predictions whose target is a value
        self.values = 0

    def update(self, losses: torch.Tensor, valid: torch.Tensor, local_targets: torch.Tensor) -> None:
        """losses, valid, local_targets: (n,); targets of another modality fall outside [0, n_bins)."""
        losses = losses.double()
        is_value = valid & (local_targets >= 0) & (local_targets < self.modality.vocab_size)
        self.nats += float(losses[valid].sum())
        self.predictions += int(valid.sum())
        self.value_nats += float(losses[is_value].sum())
        self.values += int(is_value.sum())

    def compute(self) -> dict[str, float]:
        if not self.predictions:
            return {}
        metrics = {"loss": self.nats / self.predictions}
        if self.values:
            metrics["bits_per_value"] = self.value_nats / (math.log(2) * self.values)
        return metrics
