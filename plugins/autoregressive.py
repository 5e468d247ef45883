"""Built-in plugin: the autoregressive next-token loss for any discrete modality."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mot_core.plugin_api import IGNORE_INDEX as IGNORE
from mot_core.plugin_api import Loss, ModalitySlice, PluginOptions
from registry import hookimpl


class AutoregressiveOptions(PluginOptions):
    z_loss: float = 0.0  # PaLM/Chameleon logit z-loss weight, stabilises large softmaxes


class AutoregressiveLoss(Loss):
    """Cross-entropy of the next token over the global vocabulary.

    The hidden state at position t (produced by the tower of t's modality) predicts token t+1,
    whatever that token's modality, so modality boundaries (text -> begin-of-image) are learnt.
    """

    name = "autoregressive"
    Options = AutoregressiveOptions

    def per_token(self, model: torch.nn.Module, hidden: torch.Tensor, batch: ModalitySlice):
        """hidden: (n, dim) -> losses (n,), valid (n,)."""
        logits = F.linear(hidden, model.head_weight).float()  # (n, vocab)
        losses = F.cross_entropy(logits, batch.targets, ignore_index=IGNORE, reduction="none")
        if self.options.z_loss:
            losses = losses + self.options.z_loss * torch.logsumexp(logits, dim=-1).pow(2)
        return losses, batch.targets != IGNORE


@hookimpl
def mot_losses():
    return [AutoregressiveLoss]
