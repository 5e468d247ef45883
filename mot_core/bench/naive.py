"""The naive MoT a user would otherwise write (the official tutorial's pattern): a Python loop
over modalities with boolean masks, gathering and scattering each modality's tokens for every
projection. Kept only as the benchmark's reference point; the maths equals MoTTransformer."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mot_core.model.transformer import ModelArgs
from mot_core.model.rope import RotaryEmbedding, apply_rotary
from mot_core.model.towers import default_ffn_hidden


class _PerModality(nn.Module):
    """One module per modality, applied by masked gather/scatter."""

    def __init__(self, make, modalities: int):
        super().__init__()
        self.towers = nn.ModuleList(make() for _ in range(modalities))

    def forward(self, x: torch.Tensor, modality: torch.Tensor, out_features: int) -> torch.Tensor:
        out = None
        for m, tower in enumerate(self.towers):
            mask = modality == m
            result = tower(x[mask])
            if out is None:  # under autocast a Linear returns bf16 while x (a norm's output) is fp32
                out = x.new_zeros(*x.shape[:-1], out_features, dtype=result.dtype)
            out[mask] = result
        return out


class NaiveMoTBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, m = args.dim, args.num_modalities
        self.heads, self.kv_heads = args.n_heads, args.n_kv_heads or args.n_heads
        self.head_dim = d // args.n_heads
        hidden = args.ffn_hidden or default_ffn_hidden(d)
        kv = self.kv_heads * self.head_dim
        self.dims = (d, kv, hidden)
        self.attn_norm = _PerModality(lambda: nn.RMSNorm(d, eps=args.norm_eps), m)
        self.wq = _PerModality(lambda: nn.Linear(d, d, bias=False), m)
        self.wk = _PerModality(lambda: nn.Linear(d, kv, bias=False), m)
        self.wv = _PerModality(lambda: nn.Linear(d, kv, bias=False), m)
        self.wo = _PerModality(lambda: nn.Linear(d, d, bias=False), m)
        self.ffn_norm = _PerModality(lambda: nn.RMSNorm(d, eps=args.norm_eps), m)
        self.w1 = _PerModality(lambda: nn.Linear(d, hidden, bias=False), m)
        self.w3 = _PerModality(lambda: nn.Linear(d, hidden, bias=False), m)
        self.w2 = _PerModality(lambda: nn.Linear(hidden, d, bias=False), m)

    def forward(self, h: torch.Tensor, modality: torch.Tensor, cos, sin) -> torch.Tensor:
        d, kv, hidden = self.dims
        b, s, _ = h.shape
        x = self.attn_norm(h, modality, d)
        q = self.wq(x, modality, d).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x, modality, kv).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x, modality, kv).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
        h = h + self.wo(attn.transpose(1, 2).reshape(b, s, d), modality, d)
        x = self.ffn_norm(h, modality, d)
        gated = F.silu(self.w1(x, modality, hidden)) * self.w3(x, modality, hidden)
        return h + self.w2(gated, modality, d)


class NaiveMoTTransformer(nn.Module):
    """Same sizes and maths as a fully untied MoTTransformer; plain causal attention."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(NaiveMoTBlock(args) for _ in range(args.n_layers))
        self.final_norm = _PerModality(lambda: nn.RMSNorm(args.dim, eps=args.norm_eps), args.num_modalities)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=args.init_std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """-> (B, S, dim) final hidden states in original order."""
        h = self.embed(tokens)
        cos, sin = self.rope.tables(positions)
        for layer in self.layers:
            h = layer(h, modality, cos, sin)
        return self.final_norm(h, modality, self.args.dim)
