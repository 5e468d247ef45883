"""``mot generate``: samples from a checkpoint (caption -> image grid, image -> caption)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mot_core.cli.common import non_negative_float, non_negative_int, output_file, positive_int, probability
from mot_core.errors import MotError


def generate_samples(checkpoint: Path, prompts: list[str], image_files: list[str], out: Path, samples: int,
                     params, seed: int, text: str, image: str) -> dict:
    """``--prompt`` payloads of the ``text`` modality become ``image`` spans written to ``out``;
    ``--image`` files of the ``image`` modality are continued in ``text``."""
    from mot_core.generate.tasks import prompt_to_span, span_to_text
    from mot_core.train.runs import load_run

    exp, vocab, _, model, meta = load_run(checkpoint, with_data=False)
    if image is None:  # the run's one modality emitted as whole spans (VQ codes or latent patches)
        spans = [n for n in vocab.names if vocab.modalities[n].span_grammar() is not None]
        if not spans:
            raise MotError(f"this run has no modality to draw images with (it has: {', '.join(vocab.names)})")
        if len(spans) > 1:
            raise MotError(f"say which modality to draw with --image-modality (one of: {', '.join(spans)})")
        image = spans[0]
    for name in (text, image):
        if name not in vocab.modalities:
            raise MotError(f"this run has no modality '{name}'; it has: {', '.join(vocab.names)}")
    result: dict = {"step": meta["step"]}
    if prompts:
        captions = [p for p in prompts for _ in range(samples)]
        images = prompt_to_span(model, vocab, captions, text, image, params, seed=seed)
        result["grid"] = str(vocab.modalities[image].write_payloads(list(images), out, captions))
    if image_files:
        payloads = [vocab.modalities[image].read_payload(Path(f)) for f in image_files]
        result["captions"] = dict(zip(image_files, span_to_text(model, vocab, payloads, image, text, params, seed=seed)))
    return result


def cmd_generate(ns: argparse.Namespace) -> int:
    from mot_core.plugin_api import SamplingParams

    if not ns.prompt and not ns.image:
        raise MotError("give at least one --prompt TEXT (caption -> image) or --image FILE (image -> caption)")
    if ns.prompt:
        output_file(ns.out, "--out")
    params = SamplingParams(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, cfg_scale=ns.cfg,
                            denoising_steps=ns.steps)
    result = generate_samples(Path(ns.checkpoint), ns.prompt, ns.image, Path(ns.out), ns.samples, params,
                              ns.seed, ns.text_modality, ns.image_modality)
    if "grid" in result:
        print(f"images for {len(ns.prompt)} prompt(s) x {ns.samples}: {result['grid']}")
    for file, caption in result.get("captions", {}).items():
        print(f"{file}: {caption}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="caption -> image grid (PNG) and image -> caption from a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--prompt", action="append", default=[], help="a caption to draw (repeatable)")
    p.add_argument("--image", action="append", default=[], help="an image file to caption (repeatable)")
    p.add_argument("--samples", type=positive_int, default=4, help="images per prompt")
    p.add_argument("--out", default="samples.png", help="PNG grid of generated images")
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=probability, default=1.0, help="1 = off")
    p.add_argument("--cfg", type=non_negative_float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-modality", default="text")
    p.add_argument("--image-modality", default=None,
                   help="the modality to draw (default: the run's one image modality, VQ or diffusion)")
    p.add_argument("--steps", type=non_negative_int, default=0,
                   help="denoising steps of a diffusion image modality (0 = its configured inference_steps)")
    p.set_defaults(func=cmd_generate)
