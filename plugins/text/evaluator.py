"""Language-model metrics for text: validation loss, perplexity and bits per byte."""

from __future__ import annotations

import math

import numpy as np
import torch

from mot_core.plugin_api import Evaluator


class LanguageModelEvaluator(Evaluator):
    """Bits per byte divides the summed loss by the UTF-8 bytes of the predicted tokens, so
    it compares across tokenizers: bpb = sum(nats) / (ln 2 * sum(bytes))."""

    name = "text_lm"

    def reset(self) -> None:
        self.nats = 0.0
        self.tokens = 0
        self.bytes = 0
        self._token_bytes: torch.Tensor | None = None

    def update(self, losses: torch.Tensor, valid: torch.Tensor, local_targets: torch.Tensor) -> None:
        if self._token_bytes is None:
            self._token_bytes = torch.from_numpy(np.asarray(self.modality.token_bytes())).to(losses.device)
        # Targets outside the text range (another modality's token after a text position)
        # carry no text bytes; they still count as predictions of this modality's loss.
        in_range = valid & (local_targets >= 0) & (local_targets < self._token_bytes.numel())
        self.nats += float(losses[valid].double().sum())
        self.tokens += int(valid.sum())
        self.bytes += int(self._token_bytes[local_targets[in_range]].sum())

    def compute(self) -> dict[str, float]:
        if not self.tokens:
            return {}
        loss = self.nats / self.tokens
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if self.bytes:
            metrics["bits_per_byte"] = self.nats / (math.log(2) * self.bytes)
        return metrics
