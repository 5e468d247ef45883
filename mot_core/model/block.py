"""The MoT transformer block (paper Algorithm 1, Eq. 2-3), with either norm placement.

    pre (Llama, Transfusion)                  post (paper Algorithm 1, Chameleon's reordering)
    q,k,v = W_qkv[m] norm_attn[m](h)          q,k,v = W_qkv[m] h
    a     = Attention(q, k, v)                a     = Attention(q, k, v)
    h     = h + W_o[m] a                      h     = h + norm_attn[m](W_o[m] a)
    h     = h + FFN[m](norm_ffn[m](h))        h     = h + norm_ffn[m](FFN[m](h))

m is each token's modality; every per-token product is a grouped matmul over modality-sorted
rows, and the attention is ONE global attention over the whole sequence in original order.
Optional per-modality QK-norm (over head_dim) applies in both placements.

``h`` is the residual stream in stream order: modality-sorted when the model routes (some
component untied), original order for the dense baseline. Only Q/K/V and the attention output
cross between the two orders, one gather each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mot_core.model.attention import AttentionBackend
from mot_core.model.frozen import assembled, split_rows
from mot_core.model.kv_cache import KVCache
from mot_core.model.rope import apply_rotary
from mot_core.model.routing import RoutingPlan
from mot_core.model.moe import MoEArgs
from mot_core.model.towers import TowerLinear, TowerRMSNorm, TowerSwiGLU, build_ffn


@dataclass
class ForwardContext:
    """What every layer of one forward pass shares (built once per forward).

    Attributes:
        plan: routing plan, or None for the dense baseline (stream stays in original order).
        tower_plan: the plan over tower groups (modalities sharing a tower merged), the one
            untied components use; ``plan`` itself when every modality has its own tower.
        modality: (B, S) long modality ids in original order (for QK-norm gains).
        batch, seq: B and S.
        cos, sin: (B, 1, S, head_dim/2) RoPE tables.
        backend, mask: attention backend and its cached mask for this batch layout.
        cache: KV cache when decoding incrementally (then mask covers new queries x all keys).
    """

    plan: RoutingPlan | None
    modality: torch.Tensor
    batch: int
    seq: int
    cos: torch.Tensor
    sin: torch.Tensor
    backend: AttentionBackend
    mask: Any
    cache: KVCache | None = None
    tower_plan: RoutingPlan | None = None

    @property
    def towers(self) -> RoutingPlan | None:
        return self.tower_plan if self.tower_plan is not None else self.plan

    @property
    def row_modality(self) -> torch.Tensor:
        """(N,) modality id of each row of the stream, in stream order."""
        return self.plan.sorted_modality if self.plan is not None else self.modality.reshape(-1)


@dataclass(frozen=True)
class BlockArgs:
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    norm_eps: float
    ffn_towers: int  # 1 = shared, M = untied by modality
    attention_towers: int
    norm_towers: int
    qk_norm: tuple[bool, ...]  # per modality; empty/all False = off
    norm_placement: str = "pre"  # "pre" or "post" (see the module docstring)
    groups: tuple[int, ...] = ()  # tower group of each modality; () = one per modality
    ffn_kinds: tuple[MoEArgs | None, ...] = ()  # per FFN tower: None = SwiGLU, else MoE; () = all SwiGLU


class MoTBlock(nn.Module):
    def __init__(self, args: BlockArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        if args.dim % args.n_heads or args.n_heads % args.n_kv_heads:
            raise ValueError("dim must divide by n_heads and n_heads by n_kv_heads")
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        qkv_out = (args.n_heads + 2 * args.n_kv_heads) * self.head_dim
        self.attn_norm = TowerRMSNorm(args.norm_towers, args.dim, args.norm_eps)
        self.wqkv = TowerLinear(args.attention_towers, args.dim, qkv_out)
        self.wo = TowerLinear(args.attention_towers, args.dim, args.dim)
        self.ffn_norm = TowerRMSNorm(args.norm_towers, args.dim, args.norm_eps)
        self.ffn = build_ffn(args.ffn_towers, args.dim, args.ffn_hidden, args.ffn_kinds, len(args.qk_norm) or 1)
        self.mixed_ffn = not isinstance(self.ffn, TowerSwiGLU)
        self.norm_eps = args.norm_eps
        if args.norm_placement not in ("pre", "post"):
            raise ValueError(f"norm_placement must be 'pre' or 'post', got {args.norm_placement!r}")
        self.post_norm = args.norm_placement == "post"
        self.uses_qk_norm = any(args.qk_norm)
        self.qk_norm_everywhere = all(args.qk_norm)
        if self.uses_qk_norm:
            # QK-norm gains belong to the attention tower; per-modality switch as a buffer.
            self.q_norm = nn.Parameter(torch.ones(args.attention_towers, self.head_dim))
            self.k_norm = nn.Parameter(torch.ones(args.attention_towers, self.head_dim))
            self.register_buffer("qk_norm_on", torch.tensor(args.qk_norm), persistent=False)
            groups = args.groups or tuple(range(len(args.qk_norm)))
            self.register_buffer("tower_of", torch.tensor(groups, dtype=torch.long), persistent=False)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """h: (N, dim) residual stream in stream order -> (N, dim)."""
        plan = ctx.towers
        qkv = self.wqkv(h if self.post_norm else self.attn_norm(h, plan), plan)
        if plan is not None:
            qkv = plan.unsort(qkv)  # global attention runs in original token order
        q, k, v = qkv.view(ctx.batch, ctx.seq, -1, self.head_dim).transpose(1, 2).split(
            [self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1
        )
        if self.uses_qk_norm:
            q = self._qk_norm(q, assembled(self, "q_norm"), ctx)
            k = self._qk_norm(k, assembled(self, "k_norm"), ctx)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_id, k, v)
        attn = ctx.backend.attend(q, k, v, ctx.mask)  # (B, H, S, hd)
        attn = attn.transpose(1, 2).reshape(ctx.batch * ctx.seq, -1)
        if plan is not None:
            attn = plan.sort(attn)
        if self.post_norm:
            h = h + self.attn_norm(self.wo(attn, plan), plan)
            return h + self.ffn_norm(self._ffn(h, ctx), plan)
        h = h + self.wo(attn, plan)
        return h + self._ffn(self.ffn_norm(h, plan), ctx)

    def _ffn(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.mixed_ffn:
            return self.ffn(x, ctx.towers, ctx.row_modality, ctx.cache is not None)
        return self.ffn(x, ctx.towers)

    def _qk_norm(self, x: torch.Tensor, gain: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, heads, S, hd) in original order; per-token gain and on/off by modality."""
        tower = self.tower_of[ctx.modality] if gain.shape[0] > 1 else torch.zeros_like(ctx.modality)
        normed = F.rms_norm(x, (self.head_dim,), eps=self.norm_eps) * gain[tower].unsqueeze(1)
        if self.qk_norm_everywhere:
            return normed
        on = self.qk_norm_on[ctx.modality].view(ctx.batch, 1, ctx.seq, 1)
        return torch.where(on, normed, x)

    def active_parameters(self) -> int:
        """Parameters one token uses in this block: one tower of each component."""
        stacked = [self.attn_norm.weight, self.ffn_norm.weight, self.wqkv.weight, self.wo.weight]
        if self.uses_qk_norm:
            stacked += [self.q_norm, self.k_norm]
        return sum(p.numel() // p.shape[0] for p in stacked) + self.ffn.active_parameters()

    def freeze_towers(self, attention: tuple[int, ...], ffn: tuple[int, ...], norm: tuple[int, ...]) -> None:
        """Stop training these towers (indices of each component's towers)."""
        self.attn_norm.freeze_towers(norm)
        self.ffn_norm.freeze_towers(norm)
        self.wqkv.freeze_towers(attention)
        self.wo.freeze_towers(attention)
        self.ffn.freeze_towers(ffn)
        if self.uses_qk_norm:
            split_rows(self, "q_norm", attention)
            split_rows(self, "k_norm", attention)

    def reset_parameters(self, std: float, out_std: float) -> None:
        self.attn_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.wqkv.reset_parameters(std)
        self.wo.reset_parameters(out_std)
        self.ffn.reset_parameters(std, out_std)
        for name, gain in self.named_parameters(recurse=False):  # q_norm, k_norm (and frozen parts)
            nn.init.ones_(gain)
