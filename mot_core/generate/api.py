"""The one generation entry point for any modality: a prompt as segments in, payloads out.

``mot generate``, evaluators (through ``EvaluationContext.generate``) and a plugin's own
scripts all call ``generate_segments``. How the target modality is generated follows from
what it declares:
  - a ``span_grammar`` (an image of VQ codes): one whole span between its begin and end
    markers, with classifier-free guidance against the begin marker alone;
  - ``input_dim`` (continuous values) and a ``value_span``: the modality's ``sample_values``
    fills the span inside the KV cache, denoised whole (diffusion latents) or one position at
    a time from its head's prediction (an autoregressive forecast); a prompt may end inside
    such a span to continue it (not for a bidirectional modality);
  - otherwise free-running: tokens of that modality only, until its ``stop_token`` or
    ``max_tokens``.
"""

from __future__ import annotations

from typing import Any

import torch

from mot_core.data import Vocabulary
from mot_core.errors import MotError, plugin_boundary
from mot_core.generate.decoding import SamplingParams, generate
from mot_core.generate.tasks import checked_value_span, continuous_spans, prompt_to_span, prompts_of
from mot_core.plugin_api import RawSegment, origin


def generate_segments(model, vocab: Vocabulary, prompts: list[list[RawSegment]], modality: str,
                      params: SamplingParams = SamplingParams(), max_tokens: int = 64, seed: int = 0) -> list[Any]:
    """One payload of ``modality`` per prompt.

    Args:
        prompts: each a list of ``RawSegment`` (modality, payload) read in order, laid out as
            in training: every segment encoded whole (a text segment ends with its end token),
            except a last segment of the target modality itself, which is continued.
        modality: the modality to generate.
        max_tokens: free-running generation stops here if the stop token has not come; an
            open-ended continuous span (``ValueSpan.length`` None) has this many positions.
    Returns:
        the generated payloads (``modality.decode`` of the new ids, or ``values_to_payloads``).
    """
    if modality not in vocab.modalities:
        raise MotError(f"this run has no modality '{modality}'; it has: {', '.join(vocab.names)}")
    target = vocab.modalities[modality]
    if not prompts:
        raise MotError("give at least one prompt")
    if target.input_dim is not None:
        return _value_spans(model, vocab, prompts, modality, params, max_tokens, seed)
    if target.span_grammar() is not None:
        return _whole_spans(model, vocab, prompts, modality, params, seed)
    token_prompts, values = _encode_prompts(vocab, prompts, modality)
    stop = target.stop_token
    if stop is not None and not (isinstance(stop, int) and 0 <= stop < target.vocab_size):
        raise MotError(f"{origin(target)}: modality '{modality}': stop_token {stop!r} is not a local id in "
                       f"0..{target.vocab_size - 1} (its vocabulary); generation would never stop on it")
    offset = vocab.offsets[modality]
    rows = generate(model, vocab, token_prompts, max_tokens, params,
                    stop_ids=set() if stop is None else {offset + stop}, allowed_modalities=[modality],
                    seed=seed, prompt_values=values)
    with plugin_boundary(f"{origin(target)}: modality '{modality}', decode"):
        return [target.decode(torch.tensor(row, dtype=torch.long) - offset) for row in rows]


def _encode_prompts(vocab: Vocabulary, prompts: list[list[RawSegment]], modality: str):
    """Prompts as global ids (``-1 - m`` at continuous positions) and their values per row."""
    token_prompts, all_values = [], []
    for prompt in prompts:
        ids: list[int] = []
        row_values: dict[int, list[torch.Tensor]] = {}
        for position, segment in enumerate(prompt):
            if not isinstance(segment, RawSegment):
                raise MotError(f"prompt segment {position} is {type(segment).__name__}; expected RawSegment(modality, payload)")
            if segment.modality not in vocab.modalities:
                raise MotError(f"prompt segment of modality '{segment.modality}', which this run does not have "
                               f"({', '.join(vocab.names)})")
            source = vocab.modalities[segment.modality]
            continued = position == len(prompt) - 1 and segment.modality == modality
            with plugin_boundary(f"{origin(source)}: modality '{segment.modality}', "
                                 f"{'encode_prompt' if continued else 'encode'}"):
                encoded = source.encode_prompt(segment.payload) if continued else source.encode(segment.payload)
            segment_ids, segment_values = prompts_of(vocab, segment.modality, [encoded])
            ids += segment_ids[0]
            if segment_values:
                for m, v in segment_values[0].items():
                    row_values.setdefault(m, []).append(v)
        token_prompts.append(ids)
        all_values.append({m: torch.cat(v) for m, v in row_values.items()})
    return token_prompts, (all_values if any(all_values) else None)


def _whole_spans(model, vocab: Vocabulary, prompts: list[list[RawSegment]], modality: str,
                 params: SamplingParams, seed: int) -> list[Any]:
    """A span modality (VQ image, diffusion latents) generated after a one-segment prompt of
    a discrete modality (the caption), as ``prompt_to_span`` lays it out."""
    shapes = {tuple(s.modality for s in p) for p in prompts}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise MotError(f"modality '{modality}' is generated as a whole span after a one-segment prompt "
                       "(a caption); give each prompt as one segment of the same modality")
    prompt_modality = next(iter(shapes))[0]
    return prompt_to_span(model, vocab, [p[0].payload for p in prompts], prompt_modality, modality, params, seed=seed)


def _value_spans(model, vocab: Vocabulary, prompts: list[list[RawSegment]], modality: str,
                 params: SamplingParams, max_tokens: int, seed: int) -> list[Any]:
    """A continuous modality: after the prompt and the span's begin marker, or continuing a
    span the prompt ends with. Guidance (against the begin marker alone) for one-segment
    prompts of another modality, as ``prompt_to_span``."""
    target = vocab.modalities[modality]
    span = checked_value_span(target, modality)
    begin = vocab.offsets[modality] + span.begin
    continued = [bool(p) and isinstance(p[-1], RawSegment) and p[-1].modality == modality for p in prompts]
    if any(continued) and target.bidirectional:
        raise MotError(f"modality '{modality}' is generated whole (bidirectional spans); a prompt cannot end with "
                       "part of one: give a prompt of another modality (a caption)")
    token_prompts, values = _encode_prompts(vocab, prompts, modality)
    token_prompts = [ids if c else ids + [begin] for ids, c in zip(token_prompts, continued)]
    captions_only = not any(continued) and all(len(p) == 1 for p in prompts)
    unconditional = [[begin]] * len(prompts) if captions_only else None
    return continuous_spans(model, vocab, token_prompts, values, modality, span, params, unconditional, max_tokens, seed)
