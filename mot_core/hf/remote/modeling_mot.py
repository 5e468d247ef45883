"""An exported Mixture-of-Transformers model (arXiv 2411.04996) for ``transformers``.

Self-contained: this file is copied into every exported folder and needs only ``torch`` and
``transformers``. It reproduces the trained model's forward pass:

    m      = the modality that owns each token's id (a marker: the modality that hosts it)
    pre:   h = h + W_o[m] Attn(W_qkv[m] norm_attn[m](h));  h = h + FFN[m](norm_ffn[m](h))
    post:  h = h + norm_attn[m](W_o[m] Attn(W_qkv[m] h));  h = h + norm_ffn[m](FFN[m](h))
    logits = lm_head(norm_final[m](h))

Attention is one causal self-attention over the whole interleaved sequence; every other
weight is chosen per token by its modality's tower (``config.tower_groups``). An FFN tower may
be a mixture of experts, routed token-choice top-k as the trained model is at inference.

Shapes: ``B`` batch, ``S`` new positions, ``K`` cached + new positions, ``N = B*S`` rows,
``G`` towers of a component.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # a copied folder imports its sibling as a package member; a checkout imports it by name
    from .configuration_mot import MoTConfig
except ImportError:  # pragma: no cover - only when this file is run outside a package
    from configuration_mot import MoTConfig


# The output's cache field: ``cache`` from transformers 5, ``past_key_values`` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def token_modality(ids: torch.Tensor, config: MoTConfig) -> torch.Tensor:
    """(...) global ids -> (...) index of the modality whose tower processes each id."""
    starts = torch.tensor([m["start"] for m in config.modalities[1:]], device=ids.device)
    owner = torch.bucketize(ids.contiguous(), starts, right=True)
    hosts = torch.tensor([m["host"] for m in config.modalities], device=ids.device)
    return hosts[owner]


def by_tower(x: torch.Tensor, tower: torch.Tensor, towers: int, fn) -> torch.Tensor:
    """Rows ``x`` (N, d_in) through ``fn(rows, g)`` of their tower ``tower`` (N,) -> (N, d_out)."""
    if towers == 1:
        return fn(x, 0)
    out = None
    for g in range(towers):
        rows = (tower == g).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        y = fn(x.index_select(0, rows), g)
        if out is None:
            out = x.new_zeros(x.shape[0], y.shape[-1], dtype=y.dtype)
        out.index_copy_(0, rows, y)
    return out


class TowerRMSNorm(nn.Module):
    """RMSNorm with one gain per tower. weight: (G, dim)."""

    def __init__(self, towers: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(towers, dim))

    def forward(self, x: torch.Tensor, tower: torch.Tensor) -> torch.Tensor:
        """x: (N, dim), tower: (N,) -> (N, dim)."""
        if self.weight.shape[0] == 1:
            return F.rms_norm(x, (x.shape[-1],), weight=self.weight[0], eps=self.eps)
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight[tower]


class TowerLinear(nn.Module):
    """G bias-free linear maps. weight: (G, out, in)."""

    def __init__(self, towers: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(towers, out_features, in_features))

    def forward(self, x: torch.Tensor, tower: torch.Tensor) -> torch.Tensor:
        """x: (N, in), tower: (N,) -> (N, out)."""
        return by_tower(x, tower, self.weight.shape[0], lambda rows, g: F.linear(rows, self.weight[g]))


class TowerSwiGLU(nn.Module):
    """SwiGLU per tower, w2(silu(gate) * up) with [gate; up] = w13 x."""

    def __init__(self, towers: int, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w13 = TowerLinear(towers, dim, 2 * hidden)
        self.w2 = TowerLinear(towers, hidden, dim)

    def forward(self, x: torch.Tensor, tower: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x, tower).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up, tower)


class MoEFeedForward(nn.Module):
    """E SwiGLU experts behind a router, token-choice top-k: each token goes to its k best
    experts (scores plus the balance bias when trained with one), weighted by their softmax
    probabilities. router: (E, dim); w13: (E, 2*hidden, dim); w2: (E, dim, hidden)."""

    def __init__(self, dim: int, hidden: int, kind: dict):
        super().__init__()
        experts = int(kind["experts"])
        self.hidden, self.top_k, self.bias = hidden, int(kind["top_k"]), kind.get("balance") == "bias"
        self.router = nn.Parameter(torch.empty(experts, dim))
        self.w13 = nn.Parameter(torch.empty(experts, 2 * hidden, dim))
        self.w2 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.register_buffer("balance_bias", torch.zeros(experts))

    def forward(self, x: torch.Tensor, tower: torch.Tensor | None = None) -> torch.Tensor:
        """x: (n, dim) -> (n, dim)."""
        logits = F.linear(x, self.router.to(x.dtype)).float()
        probs = logits.softmax(dim=-1)
        scores = logits + self.balance_bias if self.bias else logits
        expert = scores.topk(self.top_k, dim=-1).indices  # (n, k)
        weight = probs.gather(1, expert)
        out = torch.zeros_like(x)
        for e in range(self.router.shape[0]):
            hit = expert == e
            rows = hit.any(dim=1).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            gate, up = F.linear(x[rows], self.w13[e]).split(self.hidden, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[e])
            out.index_add_(0, rows, y * (weight * hit)[rows].sum(1, keepdim=True).to(y.dtype))
        return out


class MixedTowerFFN(nn.Module):
    """One FFN module per tower, some of them mixtures of experts."""

    def __init__(self, dim: int, hidden: int, kinds: list):
        super().__init__()
        self.towers = nn.ModuleList(TowerSwiGLU(1, dim, hidden) if kind is None else MoEFeedForward(dim, hidden, kind)
                                    for kind in kinds)

    def forward(self, x: torch.Tensor, tower: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(tower)
        return by_tower(x, tower, len(self.towers), lambda rows, g: self.towers[g](rows, zero[: rows.shape[0]]))


def rotary_tables(positions: torch.Tensor, config: MoTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) positions -> cos, sin (B, 1, S, head_dim/2), computed in float64 as trained."""
    head_dim = config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float64,
                                                       device=positions.device) / head_dim)
    scaling = config.rope_frequency_scaling
    if scaling:
        inv_freq = scaled_frequencies(inv_freq, scaling)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().float().unsqueeze(1), angles.sin().float().unsqueeze(1)


def scaled_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """RoPE frequency scaling: "linear" divides every frequency; "llama3" (Llama 3.1) divides
    the low ones, keeps the high ones and blends between."""
    factor = float(scaling["factor"])
    if scaling["kind"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position"])
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, S, head_dim), halves rotated, in at least fp32."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class MoTBlock(nn.Module):
    def __init__(self, config: MoTConfig, layer_idx: int):
        super().__init__()
        dim, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.layer_idx, self.heads, self.kv_heads, self.head_dim = layer_idx, heads, kv, dim // heads
        self.eps, self.post_norm = config.rms_norm_eps, config.norm_placement == "post"
        self.attn_norm = TowerRMSNorm(config.norm_towers, dim, config.rms_norm_eps)
        self.wqkv = TowerLinear(config.attention_towers, dim, (heads + 2 * kv) * self.head_dim)
        self.wo = TowerLinear(config.attention_towers, dim, dim)
        self.ffn_norm = TowerRMSNorm(config.norm_towers, dim, config.rms_norm_eps)
        kinds = config.ffn_kinds
        if all(kind is None for kind in kinds):
            self.ffn = TowerSwiGLU(config.ffn_towers, dim, config.intermediate_size)
        else:
            self.ffn = MixedTowerFFN(dim, config.intermediate_size, kinds)
        self.qk_norm = list(config.qk_norm)
        if any(self.qk_norm):
            self.q_norm = nn.Parameter(torch.ones(config.attention_towers, self.head_dim))
            self.k_norm = nn.Parameter(torch.ones(config.attention_towers, self.head_dim))

    def forward(self, h: torch.Tensor, route: dict, batch: int, seq: int, cos, sin, mask, cache) -> torch.Tensor:
        """h: (N, dim) rows in batch order -> (N, dim)."""
        attention, ffn, norm = route["attention"], route["ffn"], route["norm"]
        qkv = self.wqkv(h if self.post_norm else self.attn_norm(h, norm), attention)
        q, k, v = qkv.view(batch, seq, -1, self.head_dim).transpose(1, 2).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=1)
        if any(self.qk_norm):
            q, k = self._qk_norm(q, self.q_norm, route), self._qk_norm(k, self.k_norm, route)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.heads != self.kv_heads:  # grouped-query attention: each key/value head serves a group
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        if mask is None:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attn = attn.transpose(1, 2).reshape(batch * seq, -1)
        if self.post_norm:
            h = h + self.attn_norm(self.wo(attn, attention), norm)
            return h + self.ffn_norm(self.ffn(h, ffn), norm)
        h = h + self.wo(attn, attention)
        return h + self.ffn(self.ffn_norm(h, norm), ffn)

    def _qk_norm(self, x: torch.Tensor, gain: torch.Tensor, route: dict) -> torch.Tensor:
        """x: (B, heads, S, head_dim); each token's tower gain, where its modality has QK-norm."""
        batch, _, seq, _ = x.shape
        tower = route["attention"].view(batch, seq)
        normed = F.rms_norm(x, (self.head_dim,), eps=self.eps) * gain[tower].unsqueeze(1)
        on = torch.tensor(self.qk_norm, device=x.device)[route["modality"]].view(batch, 1, seq, 1)
        return torch.where(on, normed, x)


class MoTPreTrainedModel(PreTrainedModel):
    config_class = MoTConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoTBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Every weight comes from the checkpoint; fresh models draw as the trainer does."""
        std = 0.02
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, TowerLinear):
            nn.init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std)
        elif isinstance(module, MoEFeedForward):
            for weight in (module.router, module.w13, module.w2):
                nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std)
            nn.init.zeros_(module.balance_bias)
        elif isinstance(module, TowerRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MoTBlock) and any(module.qk_norm):
            nn.init.ones_(module.q_norm)
            nn.init.ones_(module.k_norm)


class MoTModel(MoTPreTrainedModel):
    """Embeddings, MoT blocks and the per-tower final norm."""

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTBlock(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = TowerRMSNorm(config.norm_towers, config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def route(self, input_ids: torch.Tensor) -> dict:
        """Each row's modality and its tower of every component, (N,) each."""
        config = self.config
        modality = token_modality(input_ids.reshape(-1), config)
        group = torch.tensor(config.tower_groups, device=input_ids.device)[modality]
        pick = lambda towers: group if towers > 1 else torch.zeros_like(group)  # noqa: E731
        return {"modality": modality, "attention": pick(config.attention_towers), "ffn": pick(config.ffn_towers),
                "norm": pick(config.norm_towers)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool | None = None,
                **kwargs) -> tuple[torch.Tensor, object]:
        """input_ids: (B, S) -> ((B, S, dim) final hidden states, the cache or None).

        ``attention_mask`` (B, K): 0 marks padding (left padding, as ``generate`` uses): a real
        position attends to the real positions before it, a pad only to pads, as in training
        where padding is a document of its own. Positions restart at each row's first real token."""
        batch, seq = input_ids.shape
        if use_cache and past_key_values is None:
            try:
                past_key_values = DynamicCache(config=self.config)
            except TypeError:  # transformers before 4.56 builds it without the config
                past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + seq > self.config.max_position_embeddings:
            raise ValueError(f"{past + seq} positions exceed max_position_embeddings="
                             f"{self.config.max_position_embeddings}, the longest the model was trained on")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(batch, -1)
        mask = self._mask(attention_mask, batch, seq, past, input_ids.device)
        cos, sin = rotary_tables(position_ids, self.config)
        route = self.route(input_ids)
        h = self.embed(input_ids).reshape(batch * seq, -1)
        for layer in self.layers:
            h = layer(h, route, batch, seq, cos, sin, mask, past_key_values if use_cache or past else None)
        return self.final_norm(h, route["norm"]).view(batch, seq, -1), past_key_values

    @staticmethod
    def _mask(attention_mask, batch: int, seq: int, past: int, device) -> torch.Tensor | None:
        """(B, 1, S, K) bool: key <= query and both real or both padding; None for the plain
        causal case (no cache, no padding)."""
        if attention_mask is None and not past:
            return None
        keys = past + seq
        if attention_mask is None:
            attention_mask = torch.ones(batch, keys, dtype=torch.long, device=device)
        if not past and bool(attention_mask.all()):
            return None
        doc = attention_mask[:, -keys:].bool()
        query_pos = torch.arange(past, keys, device=device)
        causal = torch.arange(keys, device=device)[None, :] <= query_pos[:, None]  # (S, K)
        same = doc[:, -seq:, None] == doc[:, None, :]  # (B, S, K)
        return (causal[None] & same).unsqueeze(1)


class GenerationRulesLogitsProcessor(LogitsProcessor):
    """The trained model's decoding rules, as ``mot generate`` applies them. Spans are
    generated whole: after a begin marker only the span's body ids until it holds ``length``
    of them, then only its end marker; outside a span no body or end id of any span, and,
    when ``allowed`` (vocab,) bool is given, only those ids (a caption after an image: text)."""

    def __init__(self, grammars: list, vocab_size: int, allowed: torch.Tensor | None = None):
        self.grammars = grammars
        self.outside = torch.ones(vocab_size, dtype=torch.bool)
        self.bodies, self.ends = [], []
        for g in grammars:
            body = torch.zeros(vocab_size, dtype=torch.bool)
            body[g["body_lo"] : g["body_hi"]] = True
            end = torch.zeros(vocab_size, dtype=torch.bool)
            end[g["end"]] = True
            self.outside &= ~body & ~end
            self.bodies.append(body)
            self.ends.append(end)
        if allowed is not None:
            self.outside &= allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """input_ids: (B, L) the sequences so far; scores: (B, vocab) -> the same, -inf where not allowed."""
        device = scores.device
        allowed = self.outside.to(device).expand(scores.shape[0], -1)
        if self.grammars:
            positions = torch.arange(input_ids.shape[1], device=device)
            ends = torch.tensor([g["end"] for g in self.grammars], device=device)
            last_end = torch.where(torch.isin(input_ids, ends), positions, -1).max(dim=1).values
            for g, body, end in zip(self.grammars, self.bodies, self.ends):
                last_begin = torch.where(input_ids == g["begin"], positions, -1).max(dim=1).values
                inside = last_begin > last_end
                count = input_ids.shape[1] - 1 - last_begin  # body ids since the begin marker
                in_span = torch.where((count < g["length"])[:, None], body.to(device), end.to(device))
                allowed = torch.where(inside[:, None], in_span, allowed)
        return scores.masked_fill(~allowed, float("-inf"))


class MoTForCausalLM(MoTPreTrainedModel, GenerationMixin):
    """The MoT model with its output head over the whole vocabulary (every modality's ids)."""

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.model = MoTModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                          bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, past_key_values=None,
                **kwargs) -> CausalLMOutputWithPast:
        """input_ids: (B, S) global ids -> logits (B, S, vocab) in fp32; ``labels`` (B, S), -100
        ignored, gives the mean next-token cross-entropy. The KV cache comes as ``cache``
        (transformers 5) or ``past_key_values`` (transformers 4)."""
        cache = cache if cache is not None else past_key_values
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache, use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        weight = self.model.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})

    def modality_ids(self, names: list) -> torch.Tensor:
        """(vocab,) bool: the ids of the named modalities."""
        known = {m["name"]: m for m in self.config.modalities}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"no modality {unknown[0]!r}; this model has: {', '.join(known)}")
        allowed = torch.zeros(self.config.vocab_size, dtype=torch.bool)
        for name in names:
            allowed[known[name]["start"] : known[name]["start"] + known[name]["size"]] = True
        return allowed

    def generate(self, *args, allowed_modalities: list | None = None, constrain_spans: bool = True,
                 logits_processor: LogitsProcessorList | None = None, **kwargs):
        """``GenerationMixin.generate`` with the trained model's rules: spans (an image) are
        generated whole between their markers unless ``constrain_spans=False``;
        ``allowed_modalities`` restricts what is generated outside spans (e.g. ["text"])."""
        processors = LogitsProcessorList(logits_processor or [])
        grammars = self.config.span_grammars if constrain_spans else []
        allowed = self.modality_ids(list(allowed_modalities)) if allowed_modalities else None
        if grammars or allowed is not None:
            processors.append(GenerationRulesLogitsProcessor(grammars, self.config.vocab_size, allowed))
        return super().generate(*args, logits_processor=processors, **kwargs)
