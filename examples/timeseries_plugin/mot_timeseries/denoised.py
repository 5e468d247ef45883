"""The same series as continuous patches, generated the diffusion way: a whole window denoised
at once (Transfusion's recipe, on a 1-D signal), where ``timeseries_patches`` forecasts one
patch at a time.

    "Yearly sunspot numbers from 1700 to 1763:"  <series>  [x1..x8] ... [x57..x64]  </series>
     text tokens (text tower, text loss)        markers: text tower and text loss (marker_modality)
                                                          patches: this modality's tower, attending
                                                          to each other in both directions

- Tokenizer: as ``timeseries_patches`` (log transform, standardised by the training values).
- Markers: ``<series>`` and ``</series>`` are this modality's ids 0 and 1 but are read by the
  text tower and predicted by the text loss (``marker_modality``), so text learns when a series
  starts and what follows one; the patches are a bidirectional span kept whole in packing.
- Training (loss ``series_denoising``): one noise level t per series, noise per patch; the
  adapter reads the noised patch and t, the head predicts the noise (epsilon), squared error
  averaged per series. The noise schedule is ``diffusers``' DDPM schedule.
- Generation: ``value_span`` says a span is ``patches`` positions between the markers;
  ``sample_values`` starts from pure noise and runs ``diffusers``' DDIM sampler, asking the
  model for the noise of the whole span at each step (``runner.predict``), with classifier-free
  guidance against the markers alone.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from pydantic import Field

from mot_core.errors import MotError
from mot_core.plugin_api import (
    ContinuousSegment, Loss, ModalitySlice, SamplingParams, SpanRunner, ValueSpan,
)
from mot_timeseries.patches import PatchOptions, TimeSeriesPatches, ZeroLinearHead

BEGIN, END = 0, 1  # <series>, </series>
CLIP = 6.0  # standard deviations of the standardised log-space values


class DenoisedOptions(PatchOptions):
    patches: int = Field(8, ge=1, le=4096, description="patches in a generated series (the training window / patch_size)")
    marker_modality: str = Field("text", description="the discrete modality whose tower and loss read the markers")
    train_timesteps: int = Field(1000, ge=2, le=100_000, description="noise levels of the DDPM schedule")
    inference_steps: int = Field(50, ge=1, description="DDIM steps when generating (mot generate --steps overrides)")


@functools.lru_cache(maxsize=4)
def _schedule(steps: int):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=steps, beta_schedule="squaredcos_cap_v2", clip_sample=False)


class DenoisingAdapter(nn.Module):
    """(V, patch_size) patches and their noise level -> (V, dim). Reads ``extras["noised"]``
    (training: x_t drawn by the loss) or the values themselves (generation: the candidates
    x_t; a clean prompt or committed span: t = 0)."""

    def __init__(self, patch_size: int, dim: int, timesteps: int):
        super().__init__()
        self.proj = nn.Linear(patch_size, dim)
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.timesteps = timesteps

    def forward(self, values: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        x = extras.get("noised", values).to(values.dtype)
        t = extras.get("t")
        t = torch.zeros(values.shape[0], device=values.device) if t is None else t
        level = (t.float() / self.timesteps)[:, None].to(values.dtype)  # (V, 1) in [0, 1)
        return self.proj(x) + self.time(level)


class TimeSeriesDenoised(TimeSeriesPatches):
    """A 1-D series as a bidirectional span of continuous patches, denoised whole."""

    name = "timeseries_denoised"
    Options = DenoisedOptions
    default_loss = "series_denoising"
    default_evaluators = ()
    bidirectional = True
    keep_segments_whole = True

    @property
    def vocab_size(self) -> int:
        return 2  # the two markers

    @property
    def marker_modality(self) -> str:
        return self.options.marker_modality

    def encode(self, payload) -> ContinuousSegment:
        """(L,) values -> <series>, L // patch_size patches, </series> (a held-out tail shorter
        than a patch: the markers alone)."""
        inner = super().encode(payload)
        return ContinuousSegment.of_values(inner.values, prefix=(BEGIN,), suffix=(END,))

    def encode_prompt(self, payload):
        raise MotError("timeseries_denoised spans are generated whole: a prompt cannot end with one")

    def build_adapter(self, dim: int) -> nn.Module:
        return DenoisingAdapter(self.options.patch_size, dim, self.options.train_timesteps)

    def build_head(self, dim: int) -> nn.Module:
        return ZeroLinearHead(dim, self.options.patch_size)  # the predicted noise, (V, patch_size)

    def value_span(self) -> ValueSpan:
        return ValueSpan(begin=BEGIN, length=self.options.patches, end=END)

    def sample_values(self, runner: SpanRunner, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        """DDIM from pure noise over the whole span: (B, count, patch_size)."""
        from diffusers import DDIMScheduler

        opts: DenoisedOptions = self.options
        steps = params.denoising_steps or opts.inference_steps
        if not 1 <= steps <= opts.train_timesteps:
            raise MotError(f"timeseries_denoised: {steps} denoising steps, but the model was trained with "
                           f"train_timesteps={opts.train_timesteps}; give 1..{opts.train_timesteps}")
        # The clean estimate is clipped to +-CLIP standard deviations: at the noisiest levels of
        # the cosine schedule it divides by sqrt(alpha_bar) ~ 0 and an imperfect noise
        # prediction would otherwise blow it up (the standardised data lies well inside).
        sampler = DDIMScheduler.from_config(_schedule(opts.train_timesteps).config, timestep_spacing="trailing",
                                            set_alpha_to_one=True, clip_sample=True, clip_sample_range=CLIP)
        sampler.set_timesteps(steps)
        rows = runner.rows
        x = torch.randn((rows, runner.count, self.input_dim), generator=generator, device=generator.device)
        for t in sampler.timesteps:
            both = torch.cat([x, x]) if runner.guided else x
            noise = runner.predict(both, {"t": torch.full(both.shape[:2], float(t), device=x.device)})
            if runner.guided:
                noise = noise[rows:] + params.cfg_scale * (noise[:rows] - noise[rows:])
            x = sampler.step(noise, t, x, eta=0.0).prev_sample
        return x


class SeriesDenoising(Loss):
    """Epsilon prediction: ``|head(h) - noise|^2`` averaged over a patch's values, then per
    series (``reduction = "segment"``). t is drawn per series, uniform over the noise levels."""

    name = "series_denoising"
    reduction = "segment"

    def _timesteps(self) -> int:
        if not isinstance(self.modality, TimeSeriesDenoised):
            raise MotError("loss 'series_denoising' scores the timeseries_denoised modality only")
        return self.modality.options.train_timesteps

    def sample_extras(self, piece: ModalitySlice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """t (n,), noise and x_t (n, patch_size); rows before the patches (none: the markers
        are text's) are zeros."""
        steps = self._timesteps()
        if piece.values is None or not piece.num_values:
            return {}
        n, first = len(piece), len(piece) - piece.num_values
        _, series_of = torch.unique_consecutive(piece.segment[first:], return_inverse=True)
        t_series = torch.randint(0, steps, (int(series_of.max()) + 1,), generator=generator)
        t_values = t_series[series_of]
        noise_values = torch.randn(piece.values.shape, generator=generator)
        noised_values = _schedule(steps).add_noise(piece.values.float(), noise_values, t_values)
        t, noise, noised = torch.zeros(n), torch.zeros(n, piece.values.shape[1]), torch.zeros(n, piece.values.shape[1])
        t[first:], noise[first:], noised[first:] = t_values.float(), noise_values, noised_values
        return {"t": t, "noise": noise, "noised": noised}

    def per_token(self, model: torch.nn.Module, hidden: torch.Tensor, batch: ModalitySlice):
        """hidden: (n, dim) -> squared error (n,) at the patches, valid (n,)."""
        if batch.head is None or batch.values is None or "noise" not in batch.extras:
            raise MotError("loss 'series_denoising' needs continuous values, an output head and its sampled noise")
        n, first = len(batch), len(batch) - batch.num_values
        error = (batch.head(hidden[first:]).float() - batch.extras["noise"][first:].float()).pow(2).mean(dim=-1)
        losses = torch.cat([hidden.new_zeros(first, dtype=torch.float32), error])
        return losses, torch.arange(n, device=hidden.device) >= first

