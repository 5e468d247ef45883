"""Autoregressive generation with a KV cache over interleaved sequences.

One function, ``generate``, serves every direction (caption -> image, image -> caption, free
continuation). Modalities that must emit whole spans (an image: begin marker, exactly N codes,
end marker) declare a ``SpanGrammar``; decoding then allows only that modality's body tokens
until the span is full, then only its end marker, and never body tokens outside a span.

Classifier-free guidance runs a second, unconditional prompt through its own cache and mixes
logits: ``u + scale * (c - u)``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from mot_core.model.attention import AttentionLayout
from mot_core.data import Vocabulary
from mot_core.errors import MotError, plugin_boundary
from mot_core.model.kv_cache import KVCache
from mot_core.model.memory import available_bytes, gigabytes
from mot_core.model.routing import build_routing
from mot_core.model.transformer import ContinuousInputs
from mot_core.plugin_api import SamplingParams, SpanRunner, origin

__all__ = ["SamplingParams", "filter_logits", "generate", "sample", "sample_value_span"]


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
    raw = logits
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    try:
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    except RuntimeError as exc:  # checked only on failure: no extra device sync per token
        if bool(torch.isnan(raw).any()) or bool(torch.isposinf(raw).any()):
            raise MotError("the model's output holds NaN or inf: the checkpoint's weights are broken "
                           "(`mot eval` on it reports non-finite metrics)") from None
        if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
            raise MotError(f"temperature {params.temperature:g} makes the model's (finite) logits NaN or inf in "
                           f"{raw.dtype}: give a temperature between 1e-4 and 1e4 (0 = greedy)") from None
        raise MotError(f"sampling failed ({str(exc).splitlines()[0]}); try a higher --temperature or --top-p") from None


class _Grammar:
    """Vectorised span constraints over the global vocabulary."""

    def __init__(self, vocab: Vocabulary, device: torch.device):
        size = vocab.size
        self.outside = torch.ones(size, dtype=torch.bool, device=device)
        bodies, ends, lengths, begins = [], [], [], {}
        for index, name in enumerate(vocab.names):
            grammar = vocab.modalities[name].span_grammar()
            if grammar is None or vocab.modalities[name].input_dim is not None:
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


def check_generation_fits(model, rows: int, length: int) -> None:
    """A one-line MotError, before allocating, when ``rows`` sequences of ``length`` positions
    (KV cache, plus about eight activations of ``dim`` per position for the prompt's forward
    pass, plus each step's logits and sampling probabilities over the vocabulary) cannot fit in
    what the model's device has free. Computed from the shapes: nothing is allocated."""
    args = model.args
    element = model.embed.weight.element_size()
    kv_heads, head_dim = args.n_kv_heads or args.n_heads, args.dim // args.n_heads
    cache = 2 * args.n_layers * rows * kv_heads * length * head_dim * element
    need = cache + 8 * rows * length * args.dim * 4 + 2 * rows * args.vocab_size * 4
    free = available_bytes(model.embed.weight.device)
    if free is not None and need > free:
        raise MotError(f"generating {rows:,} sequences of up to {length:,} positions needs about {gigabytes(need)} "
                       f"(KV cache {gigabytes(cache)}) and the device has {gigabytes(free)} free; "
                       "ask for fewer --samples or prompts")


class _Stream:
    """One batch of prompts decoding in lockstep with a KV cache. Prompts are left-padded;
    pads form their own document (id 0) so no real token attends to them.

    A prompt is a list of global ids in which ``-1 - m`` marks a continuous position of
    modality m; ``prompt_values[row][m]`` holds those positions' values (V, input_dim) in order.
    Continuous positions enter clean (their adapter gets no extras) and each run of them is
    one bidirectional span when its modality is bidirectional."""

    def __init__(self, model, vocab: Vocabulary, prompts: list[list[int]], capacity: int,
                 prompt_values: list[dict[int, torch.Tensor]] | None = None):
        if any(not p for p in prompts):
            raise MotError("every prompt needs at least one token")
        device = model.embed.weight.device
        self.model, self.vocab, self.device = model, vocab, device
        width = max(map(len, prompts))
        if width + capacity > model.args.max_seq_len:
            raise MotError(f"prompt + generation ({width + capacity} tokens) exceeds model.max_seq_len={model.args.max_seq_len}")
        check_generation_fits(model, len(prompts), width + capacity)
        self.cache = KVCache.for_model(model, len(prompts), width + capacity)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        document = torch.zeros(len(prompts), width, dtype=torch.long)
        positions = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            document[row, width - len(prompt) :] = 1
            positions[row, width - len(prompt) :] = torch.arange(len(prompt))
        self.next_position = torch.tensor([len(p) for p in prompts], device=device)
        self.token_modality = vocab.token_modality().to(device)
        is_value = ids < 0
        tokens = torch.where(is_value, 0, ids)
        modality = torch.where(is_value, -1 - ids, self.token_modality.cpu()[tokens])
        span = self._value_spans(is_value, modality)
        values = None
        if bool(is_value.any()):
            values = {}
            for m in sorted(set((-1 - ids[is_value]).tolist())):
                rows = [pv[m] for pv in prompt_values or [] if m in pv]
                values[m] = torch.cat(rows).to(device, model.embed.weight.dtype)
        self.logits = self._forward(tokens.to(device), positions.to(device), document.to(device), modality.to(device),
                                    is_value.to(device), span.to(device), values)

    def _value_spans(self, is_value: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """(B, T) span ids: each run of continuous positions of a bidirectional modality gets
        the index of its first position; everything else is causal (-1)."""
        span = torch.full_like(modality, -1)
        bidirectional = torch.tensor([self.vocab.modalities[n].bidirectional for n in self.vocab.names])
        if not bool(is_value.any()):
            return span
        starts = is_value & ~torch.nn.functional.pad(is_value, (1, 0))[:, :-1]
        index = torch.arange(is_value.shape[1]).expand_as(is_value)
        run_start = torch.cummax(torch.where(starts, index, 0), dim=1).values
        return torch.where(is_value & bidirectional[modality], run_start, span)

    def _forward(self, tokens, positions, document, modality=None, is_value=None, span=None, values=None,
                 extras=None) -> torch.Tensor:
        """Feed (B, T) positions; returns (B, V) float logits of the last position."""
        hidden = self._hidden(tokens, positions, document, modality, is_value, span, values, extras)
        self.last_hidden = hidden.view(tokens.shape[0], tokens.shape[1], -1)[:, -1]  # (B, dim)
        return F.linear(self.last_hidden, self.model.head_weight).float()

    def _hidden(self, tokens, positions, document, modality=None, is_value=None, span=None, values=None, extras=None):
        """(B, T) new positions -> (B*T, dim) final hidden states in batch order."""
        if modality is None:
            modality = self.token_modality[tokens]
        plan = build_routing(modality, len(self.vocab.names), is_value)
        layout = AttentionLayout(document, span, None, False)
        continuous = None
        if values:
            continuous = {m: ContinuousInputs(v, (extras or {}).get(m, {})) for m, v in values.items()}
        self._last_plan = plan
        return plan.unsort(self.model(tokens, positions, modality, plan, layout, cache=self.cache, continuous=continuous))

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: (B,) -> next (B, V) logits."""
        positions = self.next_position[:, None]
        self.next_position = self.next_position + 1
        document = torch.ones_like(positions)
        self.logits = self._forward(token[:, None], positions, document)
        return self.logits

    def span_inputs(self, modality: int, count: int):
        """Layout of a span of ``count`` continuous positions of ``modality`` after every row."""
        rows = self.next_position.shape[0]
        positions = self.next_position[:, None] + torch.arange(count, device=self.device)
        bidirectional = self.vocab.modalities[self.vocab.names[modality]].bidirectional
        span = torch.full((rows, count), 0 if bidirectional else -1, dtype=torch.long, device=self.device)
        span = span + positions[:, :1] if bidirectional else span  # an id no cached span uses
        return (
            torch.zeros(rows, count, dtype=torch.long, device=self.device), positions,
            torch.ones(rows, count, dtype=torch.long, device=self.device),
            torch.full((rows, count), modality, dtype=torch.long, device=self.device),
            torch.ones(rows, count, dtype=torch.bool, device=self.device), span,
        )

    def predict_span(self, modality: int, values: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, count, input_dim) candidate values (+ extras (B, count, ...)) -> (B, count, out)
        outputs of the modality's own head; the cache is left as it was."""
        rows, count = values.shape[:2]
        tokens, positions, document, mod, is_value, span = self.span_inputs(modality, count)
        flat_extras = {k: v.reshape(rows * count, *v.shape[2:]) for k, v in extras.items()}
        with self.cache.scratch():
            hidden = self._hidden(tokens, positions, document, mod, is_value, span,
                                  {modality: values.reshape(rows * count, -1).to(self.model.embed.weight.dtype)},
                                  {modality: flat_extras})
        return self.head(modality)(hidden).float().view(rows, count, -1)

    def append_span(self, modality: int, values: torch.Tensor) -> torch.Tensor:
        """Append (B, count, input_dim) clean values to every row; returns the next logits."""
        self._append(modality, values)
        return self.logits

    def append_values(self, modality: int, values: torch.Tensor) -> torch.Tensor:
        """Append (B, k, input_dim) clean values to every row, kept in the cache; returns
        (B, k, out) the modality's own head at them."""
        hidden = self._append(modality, values)
        return self.head(modality)(hidden).float().view(*values.shape[:2], -1)

    def _append(self, modality: int, values: torch.Tensor) -> torch.Tensor:
        """(B, k, input_dim) values into the cache as the next k positions of every row;
        updates the next logits and returns the (B*k, dim) final hidden states."""
        rows, count = values.shape[:2]
        tokens, positions, document, mod, is_value, span = self.span_inputs(modality, count)
        self.next_position = self.next_position + count
        hidden = self._hidden(tokens, positions, document, mod, is_value, span,
                              {modality: values.reshape(rows * count, -1).to(self.model.embed.weight.dtype)})
        self.last_hidden = hidden.view(rows, count, -1)[:, -1]
        self.logits = F.linear(self.last_hidden, self.model.head_weight).float()
        return hidden

    def head(self, modality: int):
        """The modality's own output head; a one-line error naming it when it built none."""
        name = self.vocab.names[modality]
        head = self.model.modality_modules[name].head
        if head is None:
            raise MotError(f"{origin(self.vocab.modalities[name])}: modality '{name}' generates values but "
                           "build_head() returned None: its sampler has no prediction to read")
        return head


class _SpanRunner(SpanRunner):
    """``SpanRunner`` over a stream: conditional rows first, then unconditional ones. Records
    what a sampler appends itself (autoregressive), so that the engine appends nothing twice."""

    def __init__(self, stream: _Stream, modality: int, guided: bool, count: int, input_dim: int, where: str):
        self.stream, self.modality, self.guided, self.count = stream, modality, guided, count
        self.rows = stream.next_position.shape[0] // (2 if guided else 1)
        self.input_dim, self.where = input_dim, where
        self.appended: list[torch.Tensor] = []
        self.appended_count = 0

    def predict(self, values: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.appended_count:
            raise MotError(f"{self.where}: runner.predict after runner.append: a span is either denoised whole "
                           "(predict) or generated one position at a time (append), not both")
        self._check(values, "predict", self.count)
        return self.stream.predict_span(self.modality, values, extras)

    def prompt_output(self) -> torch.Tensor:
        modality = self.stream.vocab.modalities[self.stream.vocab.names[self.modality]]
        if modality.marker_modality is not None:
            raise MotError(f"{self.where}: runner.prompt_output reads this modality's head at its begin marker, but "
                           f"marker_modality '{modality.marker_modality}' gives the marker to that modality's tower and "
                           "loss, so the head was never trained there (generate such a span whole, with runner.predict)")
        return self.stream.head(self.modality)(self.stream.last_hidden).float()

    def append(self, values: torch.Tensor) -> torch.Tensor:
        self._check(values, "append", None)
        bidirectional = self.stream.vocab.modalities[self.stream.vocab.names[self.modality]].bidirectional
        if bidirectional and values.shape[1] != self.count:
            raise MotError(f"{self.where}: runner.append of {values.shape[1]} of {self.count} positions, but the "
                           "modality is bidirectional: its span is one block in training, so append it whole or "
                           "let the engine do it (return the values)")
        if self.appended_count + values.shape[1] > self.count:
            raise MotError(f"{self.where}: runner.append of {values.shape[1]} more position(s) after "
                           f"{self.appended_count} goes past the span's {self.count} (runner.count)")
        if not bool(torch.isfinite(values).all()):
            raise MotError(f"{self.where}: runner.append got NaN or inf values")
        self.appended.append(values[: self.rows].detach().clone())
        self.appended_count += values.shape[1]
        return self.stream.append_values(self.modality, values)

    def _check(self, values, call: str, count: int | None) -> None:
        rows = self.rows * (2 if self.guided else 1)
        ok = isinstance(values, torch.Tensor) and values.dim() == 3 and values.shape[0] == rows and \
            values.shape[2] == self.input_dim and (count is None or values.shape[1] == count) and values.shape[1] > 0
        if not ok:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            want = f"({rows}, {count if count is not None else 'k >= 1'}, input_dim={self.input_dim})"
            raise MotError(f"{self.where}: runner.{call} got {shape}, expected {want}"
                           + (" (R = 2 x rows: guided)" if self.guided else ""))


def _token_modalities(vocab: Vocabulary, names: list[str] | None, device) -> torch.Tensor | None:
    """(V,) bool of the ids token-by-token decoding may emit: those of ``names`` (default:
    all), never a continuous modality's (its spans come from ``sample_value_span``)."""
    continuous = [n for n in vocab.names if vocab.modalities[n].input_dim is not None]
    if names is None and not continuous:
        return None
    allowed = torch.zeros(vocab.size, dtype=torch.bool, device=device)
    for name in names if names is not None else vocab.names:
        if name not in continuous:
            off = vocab.offsets[name]
            allowed[off : off + vocab.modalities[name].vocab_size] = True
    return allowed


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
    prompt_values: list[dict[int, torch.Tensor]] | None = None,
) -> list[list[int]]:
    """Continue each prompt (global ids) by up to ``max_new_tokens`` tokens.

    Args:
        stop_ids: global ids that end a row (not included in its output).
        allowed_modalities: restrict generation outside spans to these modalities' tokens.
        unconditional_prompts: enable classifier-free guidance with ``params.cfg_scale``.
        prompt_values: continuous values of prompts that hold continuous positions (marked
            ``-1 - m`` in the prompt), per row: modality index -> (V, input_dim).
    Returns:
        the generated global ids of each row.
    """
    model.eval()
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    grammar = _Grammar(vocab, device)
    restrict = _token_modalities(vocab, allowed_modalities, device)
    cond = _Stream(model, vocab, prompts, max_new_tokens, prompt_values)
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
        if _collect(token, stop, finished, outputs):
            break
        slot, count = grammar.advance(slot, count, token)
        logits = cond.step(token)
        if uncond is not None:
            uncond.step(token)
    return outputs


@torch.no_grad()
def sample_value_span(
    model,
    vocab: Vocabulary,
    prompts: list[list[int]],
    span_modality: str,
    params: SamplingParams = SamplingParams(),
    unconditional_prompts: list[list[int]] | None = None,
    prompt_values: list[dict[int, torch.Tensor]] | None = None,
    then: list[int] | None = None,
    max_new_tokens: int = 0,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    allowed_modalities: list[str] | None = None,
    seed: int = 0,
    count: int | None = None,
) -> tuple[torch.Tensor, list[list[int]]]:
    """One span of a continuous modality after each prompt (global ids ending with the span's
    begin marker; ``-1 - m`` marks continuous positions of modality m, whose values are in
    ``prompt_values``), generated by the modality's ``sample_values``, with guidance when
    ``unconditional_prompts`` are given and ``params.cfg_scale`` != 1. The clean values then
    enter the cache, followed by the ``then`` ids (the end marker), and up to
    ``max_new_tokens`` tokens are decoded after them, as ``generate`` would. ``count``: the
    span's positions (default: its ``value_span().length``; required for an open-ended span).

    Returns (values (B, count, input_dim), generated ids of each row after ``then``)."""
    model.eval()
    index = vocab.index(span_modality)
    modality = vocab.modalities[span_modality]
    guided = unconditional_prompts is not None and params.cfg_scale != 1.0
    rows = list(prompts)
    values_in = list(prompt_values) if prompt_values is not None else None
    if guided:
        if len(unconditional_prompts) != len(prompts):
            raise MotError("classifier-free guidance needs one unconditional prompt per prompt")
        rows += unconditional_prompts
        if values_in is not None:
            values_in += [{}] * len(unconditional_prompts)
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    count = count if count is not None else span_length(modality, span_modality)
    capacity = len(then or []) + max_new_tokens + count
    stream = _Stream(model, vocab, rows, capacity, values_in)
    where = f"{origin(modality)}: modality '{span_modality}', sample_values"
    runner = _SpanRunner(stream, index, guided, count, modality.input_dim, where)
    with plugin_boundary(where):
        values = modality.sample_values(runner, params, generator)
    check_sampled_values(values, len(prompts), count, modality.input_dim, where)
    if runner.appended_count:  # autoregressive: the sampler has put the values in the sequence itself
        appended = torch.cat(runner.appended, dim=1)
        if runner.appended_count != count or not torch.equal(appended, values.to(appended.device, appended.dtype)):
            raise MotError(f"{where}: appended {runner.appended_count} of the span's {count} positions with "
                           "runner.append but returned other values: return exactly the values appended (all of them)")
        if then is None and not max_new_tokens:
            return values, [[] for _ in prompts]
        logits = stream.logits
    elif then is None and not max_new_tokens:
        return values, [[] for _ in prompts]
    else:
        logits = stream.append_span(index, torch.cat([values, values]) if guided else values)
    for token in then or []:
        logits = stream.step(torch.full((len(rows),), token, dtype=torch.long, device=device))
    outputs: list[list[int]] = [[] for _ in prompts]
    restrict = _token_modalities(vocab, allowed_modalities, device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits = logits[: len(prompts)]  # after the span, the conditional rows lead: no guidance
    for _ in range(max_new_tokens):
        if restrict is not None:
            logits = logits.masked_fill(~restrict, float("-inf"))
        token = sample(logits, params, generator)
        if _collect(token, stop, finished, outputs):
            break
        logits = stream.step(torch.cat([token, token]) if guided else token)[: len(prompts)]
    return values, outputs


def _collect(token: torch.Tensor, stop: torch.Tensor, finished: torch.Tensor, outputs: list[list[int]]) -> bool:
    """Append each unfinished row's new token (a stop id finishes its row, unrecorded);
    True once every row has finished."""
    finished |= torch.isin(token, stop)
    for row, value in enumerate(token.tolist()):
        if not finished[row]:
            outputs[row].append(value)
    return bool(finished.all())


def check_sampled_values(values, rows: int, count: int, input_dim: int, where: str) -> None:
    """``sample_values`` must return (rows, count, input_dim) finite floats: one value per
    position of the span, for every conditional row."""
    expected = (rows, count, input_dim)
    if not isinstance(values, torch.Tensor):
        raise MotError(f"{where} returned {type(values).__name__}, expected a tensor of shape {expected}")
    if tuple(values.shape) != expected:
        raise MotError(f"{where} returned shape {tuple(values.shape)}, expected {expected} (rows, the span's "
                       "positions runner.count, input_dim)")
    if not values.is_floating_point():
        raise MotError(f"{where} returned dtype {values.dtype}, expected floating-point values")
    if not bool(torch.isfinite(values).all()):
        raise MotError(f"{where} returned NaN or inf values (a diverged sampler, or too few denoising steps?)")


def span_length(modality, name: str) -> int:
    """The positions of one generated span of a continuous modality: its ``value_span().length``."""
    span = modality.value_span()
    if span is None or span.length is None:
        raise MotError(f"{origin(modality)}: modality '{name}' declares no fixed span length "
                       "(value_span().length); give the span's positions (max_tokens)")
    return span.length
