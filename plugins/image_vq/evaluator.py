"""Image evaluation: image-token loss, tokenizer reconstruction, and an FID-style score."""

from __future__ import annotations

from pathlib import Path

import torch

from pydantic import Field

from mot_core.plugin_api import EvaluationContext, Evaluator, PluginOptions, SamplingParams
from plugins.common.images import images_with_captions
from plugins.image_vq.tokenizer_io import reconstruction_metrics


class ImageVQEvaluatorOptions(PluginOptions):
    """How ``mot eval`` samples the images it scores (``evaluator_options.image_vq``)."""

    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(0.95, gt=0, le=1, description="1 = off")
    cfg_scale: float = Field(3.0, ge=0, description="classifier-free guidance scale (1 = off)")


class ImageVQEvaluator(Evaluator):
    """Per-token: the image-token validation loss. With the model (``mot eval``):
    ``recon_psnr``/``recon_mse``/``codebook_perplexity`` of the tokenizer on held-out images,
    and ``fid_local`` (see ``plugins.common.fid``: not comparable with published FID)
    between held-out images and images generated from their captions."""

    name = "image_vq"
    Options = ImageVQEvaluatorOptions

    def reset(self) -> None:
        self.nats, self.tokens = 0.0, 0

    def update(self, losses: torch.Tensor, valid: torch.Tensor, local_targets: torch.Tensor) -> None:
        self.nats += float(losses[valid].double().sum())
        self.tokens += int(valid.sum())

    def compute(self) -> dict[str, float]:
        return {"loss": self.nats / self.tokens} if self.tokens else {}

    def evaluate_model(self, context: EvaluationContext) -> dict[str, float]:
        from plugins.common.fid import frechet_distance, inception_feature_net, load_feature_net

        modality = self.modality
        images, captions = images_with_captions(context.val_docs, modality.name)
        recon = reconstruction_metrics(modality.tokenizer, images, batch_size=256)
        metrics = {
            "recon_psnr": recon["psnr"], "recon_mse": recon["mse"],
            "codebook_perplexity": recon["codebook_perplexity"], "codes_used": float(recon["codes_used"]),
        }
        captioned = [i for i, c in enumerate(captions) if c][: context.samples]
        text = next((n for n in context.vocab.names if n != modality.name and context.vocab.modalities[n].stop_token is not None), None)
        if len(captioned) >= 2 and text is not None:
            fake = torch.stack(list(context.sample_spans(
                [captions[i] for i in captioned], text, modality.name,
                SamplingParams(temperature=self.options.temperature, top_k=self.options.top_k,
                               top_p=self.options.top_p, cfg_scale=self.options.cfg_scale),
            )))
            opts = modality.options
            if opts.inception_weights:
                metrics["fid_inception"] = frechet_distance(images[captioned], fake, inception_feature_net(Path(opts.inception_weights)))
            else:
                metrics["fid_local"] = frechet_distance(images[captioned], fake, load_feature_net(Path(opts.tokenizer_dir)))
        return metrics
