"""Autoregressive generation with a KV cache over interleaved sequences.

One function, ``generate``, serves every direction (caption -> image, image -> caption, free
continuation). Modalities that must emit whole spans (an image: begin marker, exactly N codes,
end marker) declare a ``SpanGrammar``; decoding then allows only that modality's body tokens
until the span is full, then only its end marker, and never body tokens outside a span.

Classifier-free guidance runs a second, unconditional prompt through its own cache and mixes
logits: ``u + scale * (c - u)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mot_core.model.attention import AttentionLayout
from mot_core.data import Vocabulary
from mot_core.errors import MotError
from mot_core.model.kv_cache import KVCache
from mot_core.model.routing import build_routing
from mot_core.plugin_api import SamplingParams

__all__ = ["SamplingParams", "filter_logits", "generate", "sample"]


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: (B, V) -> same, with tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the first token past p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits: (B, V) float -> (B,) sampled ids."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class _Grammar:
    """Vectorised span constraints over the global vocabulary."""

    def __init__(self, vocab: Vocabulary, device: torch.device):
        size = vocab.size
        self.outside = torch.ones(size, dtype=torch.bool, device=device)
        bodies, ends, lengths, begins = [], [], [], {}
        for index, name in enumerate(vocab.names):
            grammar = vocab.modalities[name].span_grammar()
            if grammar is None:
                continue
            off = vocab.offsets[name]
            body = torch.zeros(size, dtype=torch.bool, device=device)
            body[off + grammar.body_lo : off + grammar.body_hi] = True
            end = torch.zeros(size, dtype=torch.bool, device=device)
            end[off + grammar.end] = True
            self.outside &= ~body & ~end
            begins[off + grammar.begin] = len(bodies)
            bodies.append(body)
            ends.append(end)
            lengths.append(grammar.length)
        self.begins = begins  # global begin id -> grammar slot
        self.bodies = torch.stack(bodies) if bodies else None
        self.ends = torch.stack(ends) if ends else None
        self.lengths = torch.tensor(lengths or [0], device=device)
        self.end_ids = {int(e.nonzero()) for e in ends}

    def initial_state(self, prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, count) per row after reading each prompt (-1 = outside any span)."""
        slots, counts = [], []
        for prompt in prompts:
            slot, count = -1, 0
            for token in prompt:
                if slot >= 0:
                    count += 1
                    if token in self.end_ids:
                        slot, count = -1, 0
                elif token in self.begins:
                    slot, count = self.begins[token], 0
            slots.append(slot)
            counts.append(count)
        return torch.tensor(slots, device=device), torch.tensor(counts, device=device)

    def allowed(self, slot: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """(B,) state -> (B, V) bool of tokens allowed next."""
        allowed = self.outside.expand(slot.shape[0], -1)
        if self.bodies is None:
            return allowed
        safe = slot.clamp(min=0)
        in_span = torch.where((count < self.lengths[safe])[:, None], self.bodies[safe], self.ends[safe])
        return torch.where((slot >= 0)[:, None], in_span, allowed)

    def advance(self, slot, count, token):
        inside = slot >= 0
        count = torch.where(inside, count + 1, count)
        ended = inside & (count > self.lengths[slot.clamp(min=0)])
        begun = torch.zeros_like(inside)
        new_slot = slot.clone()
        for begin_id, index in self.begins.items():
            hit = ~inside & (token == begin_id)
            begun |= hit
            new_slot = torch.where(hit, torch.full_like(slot, index), new_slot)
        new_slot = torch.where(ended, torch.full_like(slot, -1), new_slot)
        count = torch.where(ended | begun, torch.zeros_like(count), count)
        return new_slot, count


class _Stream:
    """One batch of prompts decoding in lockstep with a KV cache. Prompts are left-padded;
    pads form their own document (id 0) so no real token attends to them."""

    def __init__(self, model, vocab: Vocabulary, prompts: list[list[int]], capacity: int):
        if any(not p for p in prompts):
            raise MotError("every prompt needs at least one token")
        device = model.embed.weight.device
        self.model, self.vocab, self.device = model, vocab, device
        width = max(map(len, prompts))
        if width + capacity > model.args.max_seq_len:
            raise MotError(f"prompt + generation ({width + capacity} tokens) exceeds model.max_seq_len={model.args.max_seq_len}")
        self.cache = KVCache.for_model(model, len(prompts), width + capacity)
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        document = torch.zeros(len(prompts), width, dtype=torch.long)
        positions = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt) :] = torch.tensor(prompt)
            document[row, width - len(prompt) :] = 1
            positions[row, width - len(prompt) :] = torch.arange(len(prompt))
        self.next_position = torch.tensor([len(p) for p in prompts], device=device)
        self.token_modality = vocab.token_modality().to(device)
        self.logits = self._forward(tokens.to(device), positions.to(device), document.to(device))

    def _forward(self, tokens, positions, document) -> torch.Tensor:
        """Feed (B, T) tokens; returns (B, V) float logits of the last position."""
        modality = self.token_modality[tokens]
        plan = build_routing(modality, len(self.vocab.names))
        layout = AttentionLayout(document, None, None, False)
        hidden = plan.unsort(self.model(tokens, positions, modality, plan, layout, cache=self.cache))
        last = hidden.view(tokens.shape[0], tokens.shape[1], -1)[:, -1]
        return F.linear(last, self.model.head_weight).float()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: (B,) -> next (B, V) logits."""
        positions = self.next_position[:, None]
        self.next_position = self.next_position + 1
        document = torch.ones_like(positions)
        self.logits = self._forward(token[:, None], positions, document)
        return self.logits


@torch.no_grad()
def generate(
    model,
    vocab: Vocabulary,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    stop_ids: set[int] | frozenset[int] = frozenset(),
    allowed_modalities: list[str] | None = None,
    unconditional_prompts: list[list[int]] | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Continue each prompt (global ids) by up to ``max_new_tokens`` tokens.

    Args:
        stop_ids: global ids that end a row (not included in its output).
        allowed_modalities: restrict generation outside spans to these modalities' tokens.
        unconditional_prompts: enable classifier-free guidance with ``params.cfg_scale``.
    Returns:
        the generated global ids of each row.
    """
    model.eval()
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    grammar = _Grammar(vocab, device)
    restrict = None
    if allowed_modalities is not None:
        restrict = torch.zeros(vocab.size, dtype=torch.bool, device=device)
        for name in allowed_modalities:
            off = vocab.offsets[name]
            restrict[off : off + vocab.modalities[name].vocab_size] = True
    cond = _Stream(model, vocab, prompts, max_new_tokens)
    uncond = None
    if unconditional_prompts is not None and params.cfg_scale != 1.0:
        if len(unconditional_prompts) != len(prompts):
            raise MotError("classifier-free guidance needs one unconditional prompt per prompt")
        uncond = _Stream(model, vocab, unconditional_prompts, max_new_tokens)
    slot, count = grammar.initial_state(prompts, device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    logits = cond.logits
    for _ in range(max_new_tokens):
        if uncond is not None:
            logits = uncond.logits + params.cfg_scale * (logits - uncond.logits)
        allowed = grammar.allowed(slot, count)
        if restrict is not None:
            allowed = allowed & (restrict | (slot >= 0)[:, None])
        token = sample(logits.masked_fill(~allowed, float("-inf")), params, generator)
        finished |= torch.isin(token, stop)
        for row, value in enumerate(token.tolist()):
            if not finished[row]:
                outputs[row].append(value)
        if bool(finished.all()):
            break
        slot, count = grammar.advance(slot, count, token)
        logits = cond.step(token)
        if uncond is not None:
            uncond.step(token)
    return outputs
