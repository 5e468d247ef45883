"""Built-in image-VQ plugin (the paper's Chameleon setting): a VQ image tokenizer, image
tokens between begin/end-of-image markers, and image evaluation (reconstruction, FID-style)."""

from plugins.image_vq.evaluator import ImageVQEvaluator
from plugins.image_vq.modality import ImageVQ
from registry import hookimpl


@hookimpl
def mot_modalities():
    return [ImageVQ]


@hookimpl
def mot_evaluators():
    return [ImageVQEvaluator]


@hookimpl
def mot_tower_defaults(modality):
    # Chameleon uses QK-norm to keep attention logits bounded when image tokens join.
    return {"qk_norm": True} if modality == "image" else None
