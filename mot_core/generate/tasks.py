"""Cross-modal sampling tasks built on ``generate``, for any pair of modalities:
a prompt in one modality -> a whole span in another (caption -> image), and a span -> free
text-like continuation (image -> caption). Uses only the ``Modality`` API."""

from __future__ import annotations

from typing import Any

import torch

from mot_core.data import Vocabulary
from mot_core.errors import MotError
from mot_core.generate.decoding import SamplingParams, generate


def prompt_to_span(model, vocab: Vocabulary, prompts: list[Any], prompt_modality: str, span_modality: str,
                   params: SamplingParams, seed: int = 0) -> list[Any]:
    """One span of ``span_modality`` per prompt payload, decoded (e.g. caption -> image).

    The prompt is laid out as in training: the prompt segment with its end token, then the
    span's begin marker. The unconditional prompt for guidance is the begin marker alone, as
    in the caption-dropout documents the model saw."""
    source, target = vocab.modalities[prompt_modality], vocab.modalities[span_modality]
    grammar = target.span_grammar()
    if grammar is None:
        raise MotError(f"modality '{span_modality}' has no span grammar to generate whole spans")
    s_off, t_off = vocab.offsets[prompt_modality], vocab.offsets[span_modality]
    begin = t_off + grammar.begin
    end_of_prompt = [] if source.stop_token is None else [s_off + source.stop_token]
    token_prompts = [[s_off + int(t) for t in source.encode_prompt(p)] + end_of_prompt + [begin] for p in prompts]
    out = generate(model, vocab, token_prompts, grammar.length + 1, params,
                   unconditional_prompts=[[begin]] * len(prompts), seed=seed)
    return target.decode_batch(torch.tensor([row[: grammar.length] for row in out]) - t_off)


def span_to_text(model, vocab: Vocabulary, payloads: list[Any], span_modality: str, text_modality: str,
                 params: SamplingParams, max_tokens: int = 48, seed: int = 0) -> list[Any]:
    """Continue each encoded span with ``text_modality`` tokens until its stop token
    (e.g. image -> caption)."""
    span, text = vocab.modalities[span_modality], vocab.modalities[text_modality]
    if text.stop_token is None:
        raise MotError(f"modality '{text_modality}' has no stop token to end generation")
    s_off, t_off = vocab.offsets[span_modality], vocab.offsets[text_modality]
    prompts = [[s_off + int(t) for t in ids] for ids in span.encode_batch(payloads)]
    out = generate(model, vocab, prompts, max_tokens, params, stop_ids={t_off + text.stop_token},
                   allowed_modalities=[text_modality], seed=seed)
    return [text.decode(torch.tensor(row, dtype=torch.long) - t_off) for row in out]
