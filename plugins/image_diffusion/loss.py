"""Transfusion's diffusion loss for continuous image positions.

For each image one timestep t is drawn (uniform over the T noise levels; at most
``cap_before_text`` x T when the image precedes text of its document, as Transfusion caps the
noise of images that condition a caption), and noise eps ~ N(0, I) for each patch. The adapter
reads x_t; the head predicts the process's target (eps, v or flow velocity) at the same
position. The loss is the squared error averaged over the patch's values, then over each
image (``reduction = "segment"``); the engine weights the image mean by the modality's
``loss_weight`` (Transfusion: lambda = 5) against the text loss.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mot_core.errors import MotError
from mot_core.plugin_api import Loss, ModalitySlice, PluginOptions


class DiffusionLossOptions(PluginOptions):
    cap_before_text: float | None = Field(
        0.5, gt=0, le=1,
        description="largest noise level, as a fraction of T, of an image followed by text in its document "
        "(Transfusion: t <= 500 of 1000); null: no cap",
    )


class DiffusionLoss(Loss):
    name = "diffusion"
    Options = DiffusionLossOptions
    reduction = "segment"

    def _process(self):
        process = getattr(self.modality, "process", None)
        if process is None:
            raise MotError(f"loss 'diffusion' needs a diffusion modality (one with a noise process), got '{getattr(self.modality, 'name', None)}'")
        return process

    def sample_extras(self, piece: ModalitySlice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """t (n,), noise and noised x_t (n, input_dim); rows before the continuous ones are zeros."""
        process = self._process()
        if piece.values is None or not piece.num_values:
            return {}
        n, first = len(piece), len(piece) - piece.num_values
        segments = piece.segment[first:]
        ids, image_of = torch.unique_consecutive(segments, return_inverse=True)
        followed = piece.followed[first:] if piece.followed is not None else torch.zeros_like(segments, dtype=torch.bool)
        top = process.max_timestep()
        cap_fraction = self.options.cap_before_text
        capped_top = top if cap_fraction is None else cap_fraction * process.T
        image_followed = torch.zeros(len(ids), dtype=torch.bool).index_put_((image_of,), followed, accumulate=False)
        cap = torch.where(image_followed, torch.tensor(min(capped_top, top), dtype=torch.float64),
                          torch.tensor(top, dtype=torch.float64))
        t_image = process.sample_timesteps(len(ids), cap, generator)
        noise_values = torch.randn(piece.values.shape, generator=generator)
        t_values = t_image[image_of]
        noised_values = process.add_noise(piece.values.float(), noise_values, t_values)
        dim = piece.values.shape[1]
        t = torch.zeros(n)
        noise, noised = torch.zeros(n, dim), torch.zeros(n, dim)
        t[first:], noise[first:], noised[first:] = t_values, noise_values, noised_values
        return {"t": t, "noise": noise, "noised": noised}

    def per_token(self, model: torch.nn.Module, hidden: torch.Tensor, batch: ModalitySlice):
        """hidden: (n, dim) -> squared error (n,) at continuous positions, valid (n,)."""
        process = self._process()
        if batch.head is None or batch.values is None or "noise" not in batch.extras:
            raise MotError("loss 'diffusion' needs continuous values, an output head and its sampled noise")
        n, first = len(batch), len(batch) - batch.num_values
        prediction = batch.head(hidden[first:]).float()
        extras = batch.extras
        target = process.target(batch.values.float(), extras["noise"][first:].float(), extras["t"][first:])
        losses = torch.cat([hidden.new_zeros(first, dtype=torch.float32), (prediction - target).pow(2).mean(dim=-1)])
        valid = torch.arange(n, device=hidden.device) >= first
        return losses, valid
