"""The diffusion process of the image modality, on top of ``diffusers`` schedulers.

Transfusion (Zhou et al. 2024) trains images with DDPM: a cosine noise schedule over 1,000
steps and the epsilon objective ``|| eps - eps_theta(x_t, t) ||^2``; the MoT paper keeps it.
Offered as well, as in common practice since: v-prediction (Salimans & Ho 2022) and rectified
flow (x_t = (1 - s) x_0 + s eps, target eps - x_0, s = t / T).

Training draws one timestep per image and noises every patch of it; sampling runs DDIM
(deterministic, eta = 0) or ancestral DDPM for DDPM-trained models and Euler for flow models.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mot_core.errors import MotError
from mot_core.plugin_api import PluginOptions

# The diffusers schedulers are imported where they are used: diffusers costs ~4 s to import and
# every `mot` command loads this plugin (and DiffusionOptions); only runs that use it pay.

SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}


class DiffusionOptions(PluginOptions):
    train_timesteps: int = Field(1000, ge=2, description="T, the number of noise levels (Transfusion: 1000)")
    schedule: Literal["cosine", "linear"] = Field("cosine", description="beta schedule of DDPM (Transfusion: cosine)")
    prediction: Literal["epsilon", "v_prediction", "flow"] = Field(
        "epsilon", description="what the model predicts: epsilon (Transfusion), v_prediction, or flow (velocity eps - x0)"
    )
    sampler: Literal["ddim", "ddpm"] = Field("ddim", description="sampler of epsilon/v models (flow models use Euler)")
    inference_steps: int = Field(250, ge=1, description="denoising steps when generating (Transfusion: 250)")
    cfg_scale: float = Field(3.0, ge=0, description="classifier-free guidance scale when generating (1 = none)")
    clip_denoised: float | None = Field(
        4.0, gt=0,
        description="DDIM/DDPM samplers clamp their estimate of the clean latent to +-this (latents have unit std): "
        "with the cosine schedule abar(T) is ~1e-9, so an epsilon model's first estimates divide by ~1e-5; null = off",
    )


class DiffusionProcess:
    """Forward noising, training target and sampler of one ``DiffusionOptions``."""

    def __init__(self, options: DiffusionOptions):
        from diffusers import DDPMScheduler

        self.options = options
        self.T = options.train_timesteps
        self.flow = options.prediction == "flow"
        self.ddpm = DDPMScheduler(
            num_train_timesteps=self.T, beta_schedule=SCHEDULES[options.schedule],
            prediction_type="epsilon" if self.flow else options.prediction, clip_sample=False,
        )

    def sample_timesteps(self, count: int, cap: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(count,) timesteps, one per image: integers uniform in [0, cap] for DDPM, reals
        uniform in [0, cap] for flow; ``cap`` (count,) is T - 1 (or T) unless capped."""
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        if self.flow:
            return (u * cap).to(torch.float32)
        return torch.floor(u * (cap + 1)).clamp(max=cap).to(torch.float32)

    def max_timestep(self) -> float:
        return float(self.T if self.flow else self.T - 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0, noise: (n, d); t: (n,) -> x_t (n, d)."""
        if self.flow:
            s = (t / self.T).to(x0.dtype)[:, None]
            return (1 - s) * x0 + s * noise
        return self.ddpm.add_noise(x0, noise, t.long())

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model regresses at x_t: eps, v = sqrt(abar) eps - sqrt(1 - abar) x0, or eps - x0."""
        if self.flow:
            return noise - x0
        if self.options.prediction == "v_prediction":
            return self.ddpm.get_velocity(x0, noise, t.long())
        return noise

    def sampler(self, steps: int):
        """A fresh scheduler with ``steps`` inference timesteps (``.timesteps``, noisiest first)."""
        from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

        if not 1 <= steps <= self.T:
            raise MotError(f"image_diffusion: {steps} denoising steps (--steps or diffusion.inference_steps) "
                           f"but the model was trained with diffusion.train_timesteps={self.T} noise levels; "
                           f"give 1..{self.T}")

        if self.flow:
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.T, shift=1.0)
        else:
            clip = self.options.clip_denoised
            settings = {"timestep_spacing": "trailing", "clip_sample": clip is not None, "clip_sample_range": clip or 1.0}
            if self.options.sampler == "ddim":
                sched = DDIMScheduler.from_config(self.ddpm.config, set_alpha_to_one=True, **settings)
            else:
                sched = DDPMScheduler.from_config(self.ddpm.config, **settings)
        sched.set_timesteps(steps)
        return sched

    @staticmethod
    def step(sched, output: torch.Tensor, t: torch.Tensor, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One sampler step from x at timestep t given the model output -> the next x."""
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        if isinstance(sched, FlowMatchEulerDiscreteScheduler):
            return sched.step(output, t, x).prev_sample
        if isinstance(sched, DDPMScheduler):
            return sched.step(output, t, x, generator=generator).prev_sample
        return sched.step(output, t, x, eta=0.0).prev_sample
