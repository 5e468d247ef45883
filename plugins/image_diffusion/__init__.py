"""Built-in image-diffusion plugin (the paper's Transfusion setting): VAE latent patches as
continuous positions, denoised by diffusion inside the same MoT as autoregressive text."""

from plugins.image_diffusion.evaluator import ImageDiffusionEvaluator
from plugins.image_diffusion.loss import DiffusionLoss
from plugins.image_diffusion.modality import ImageDiffusion
from registry import hookimpl


@hookimpl
def mot_modalities():
    return [ImageDiffusion]


@hookimpl
def mot_losses():
    return [DiffusionLoss]


@hookimpl
def mot_evaluators():
    return [ImageDiffusionEvaluator]
