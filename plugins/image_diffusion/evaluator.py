"""Image evaluation of the Transfusion setting.

Per batch (every training evaluation): ``val/image_diffusion/loss``, the diffusion loss of
held-out images (mean per image) at timesteps and noise drawn once for the fixed validation
batches, so every evaluation and every twin sees the same (image, t, noise) triples; this is
the paper's main image metric and needs nothing external.

With the model (``mot eval --samples N``):
- ``vae_psnr``: reconstruction of held-out images by the VAE (an upper bound on sample quality);
- ``fid_local`` (or ``fid_inception`` with Inception weights): Frechet distance between held-out
  images and images generated from their captions, through the caption-word feature network
  of ``plugins.common.fid``; NOT comparable with published FID;
- ``clip_local`` (or ``clip_score`` with a published CLIP): image-caption similarity of those
  generated images, x100; the local model is trained here and NOT comparable with CLIP scores;
  ``clip_local_real`` is the same score of the held-out images themselves, the ceiling;
- ``cider``: CIDEr-D (x100, as papers report it) of captions generated from held-out images
  against all their captions, through pycocoevalcap (see ``captioning`` for tokenization).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mot_core.plugin_api import EvaluationContext, Evaluator, SamplingParams

class ImageDiffusionEvaluator(Evaluator):
    name = "image_diffusion"

    def reset(self) -> None:
        pass

    def update(self, losses: torch.Tensor, valid: torch.Tensor, local_targets: torch.Tensor) -> None:
        pass  # the engine's val/image_diffusion/loss is the per-image diffusion loss already

    def compute(self) -> dict[str, float]:
        return {}

    def evaluate_model(self, context: EvaluationContext) -> dict[str, float]:
        from plugins.common.fid import frechet_distance, inception_feature_net, load_feature_net
        from plugins.common.images import images_with_captions, psnr_from_mse
        from plugins.image_diffusion.captioning import cider_score, references_by_image
        from plugins.image_diffusion.clip_score import image_text_scorer
        from plugins.image_diffusion.vae import decode_latents, encode_latents

        modality = self.modality
        opts = modality.options
        images, captions = images_with_captions(context.val_docs, modality.name)
        recon = decode_latents(modality.vae, encode_latents(modality.vae, images))
        metrics = {"vae_psnr": float(psnr_from_mse(float(((recon - images) / 2).pow(2).mean())))}
        text = opts.text_modality
        if context.samples < 2 or text not in context.vocab.names:
            return metrics
        captioned = _spread([i for i, c in enumerate(captions) if c], context.samples)
        prompts = [captions[i] for i in captioned]
        params = SamplingParams(cfg_scale=opts.diffusion.cfg_scale)
        fake = torch.stack(list(context.sample_spans(prompts, text, modality.name, params)))
        if opts.inception_weights:
            metrics["fid_inception"] = frechet_distance(images[captioned], fake, inception_feature_net(Path(opts.inception_weights)))
        else:
            metrics["fid_local"] = frechet_distance(images[captioned], fake, load_feature_net(Path(opts.tokenizer_dir)))
        scorer = image_text_scorer(opts.clip_model, Path(opts.tokenizer_dir))
        metrics[scorer.metric_name] = scorer.score(fake, prompts)
        metrics[f"{scorer.metric_name}_real"] = scorer.score(images[captioned], prompts)
        unique, references = references_by_image(images, captions)
        chosen = _spread(list(range(len(references))), context.samples)
        unique, references = unique[chosen], [references[i] for i in chosen]
        hypotheses = context.continue_with_text(list(unique), modality.name, text, SamplingParams(temperature=0.0))
        metrics["cider"] = 100 * cider_score(references, hypotheses)
        return metrics


def _spread(indices: list[int], count: int) -> list[int]:
    """``count`` of ``indices`` evenly spaced over the list: held-out documents come grouped by
    source (emoji, then MNIST), and the first N alone would score one source only."""
    if count >= len(indices):
        return indices
    return [indices[(k * len(indices)) // count] for k in range(count)]
