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
        self.text_nats = 0.0
        self.text_bytes = 0
        self._token_bytes: torch.Tensor | None = None

    def update(self, losses: torch.Tensor, valid: torch.Tensor, local_targets: torch.Tensor) -> None:
        if self._token_bytes is None:
            self._token_bytes = torch.from_numpy(np.asarray(self.modality.token_bytes())).to(losses.device)
        self.nats += float(losses[valid].double().sum())
        self.tokens += int(valid.sum())
        # Bits per byte measures how well the text itself is compressed: only predictions whose
        # target is a text token count (a caption's last token predicting begin-of-image does not).
        is_text = valid & (local_targets >= 0) & (local_targets < self._token_bytes.numel())
        self.text_nats += float(losses[is_text].double().sum())
        self.text_bytes += int(self._token_bytes[local_targets[is_text]].sum())

    def compute(self) -> dict[str, float]:
        if not self.tokens:
            return {}
        loss = self.nats / self.tokens
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if self.text_bytes:
            metrics["bits_per_byte"] = self.text_nats / (math.log(2) * self.text_bytes)
        return metrics
