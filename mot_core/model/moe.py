"""Mixture-of-Experts feed-forward: E SwiGLU experts behind a learned router.

Two routers, as in the MoT paper's baselines and common practice:

- **expert choice** (Zhou et al. 2022; the paper's MoE-4x baseline): each expert takes the
  ``capacity = ceil(capacity_factor * n / E)`` tokens it scores highest among the n tokens it
  is offered. Loads are balanced by construction and every expert runs one (C, dim) block, a
  batched matmul; a token picked by no expert is dropped (only the residual carries it). The
  choice depends on every token of the batch, later ones included: it is NOT causal. Training
  uses it; evaluation and generation use ``inference_router`` (default: token-choice top-k with
  the same router, causal), since a decoded token cannot see the tokens after it.
- **token choice top-k** (Switch / Mixtral): each token goes to its k highest-scoring experts,
  weighted by their router probabilities. Balanced by an auxiliary loss (``E * sum_e f_e P_e``,
  Switch Transformer) or without one by a bias added to the scores for selection only,
  nudged after every training batch towards equal loads (DeepSeek-V3). A router z-loss
  (``mean logsumexp(logits)^2``, ST-MoE) keeps the logits small.

Token-choice assignments are sorted by expert once (the same stable-sort routing as the
modalities) and run as grouped matmuls over contiguous expert groups; no Python loop over
tokens. Rows that belong to no present modality are never offered to the router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mot_core.model.routing import build_routing, grouped_linear

ROUTERS = ("expert_choice", "top_k")


@dataclass(frozen=True)
class MoEArgs:
    experts: int = 4
    router: str = "expert_choice"  # "expert_choice" or "top_k"
    top_k: int = 1
    capacity_factor: float = 1.0  # expert choice: average experts per token
    balance: str = "aux_loss"  # top_k: "aux_loss" or "bias"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    bias_rate: float = 0.001
    inference_router: str = "top_k"  # expert-choice models at eval/generation: "top_k" or "expert_choice"
    inference_top_k: int = 1

    def __post_init__(self) -> None:
        if self.router not in ROUTERS or self.inference_router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}")
        if self.experts < 1 or not 1 <= self.top_k <= self.experts or not 1 <= self.inference_top_k <= self.experts:
            raise ValueError("need experts >= 1 and 1 <= top_k <= experts")
        if self.capacity_factor <= 0:
            raise ValueError("capacity_factor must be > 0")

    @property
    def experts_per_token(self) -> float:
        """Experts a token goes through on average in training (its active FFN compute)."""
        return min(self.capacity_factor, self.experts) if self.router == "expert_choice" else self.top_k


class MoEFeedForward(nn.Module):
    """E SwiGLU experts and a router. w13: (E, 2*hidden, dim); w2: (E, dim, hidden);
    router: (E, dim). ``forward`` records the auxiliary losses and routing statistics of its
    last call in ``aux_loss`` and ``stats``."""

    def __init__(self, dim: int, hidden: int, args: MoEArgs):
        super().__init__()
        self.args, self.hidden = args, hidden
        self.router = nn.Parameter(torch.empty(args.experts, dim))
        self.w13 = nn.Parameter(torch.empty(args.experts, 2 * hidden, dim))
        self.w2 = nn.Parameter(torch.empty(args.experts, dim, hidden))
        self.register_buffer("balance_bias", torch.zeros(args.experts))
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def active_parameters(self) -> int:
        """Router + the average number of experts a token uses (training routing)."""
        per_expert = (self.w13[0].numel() + self.w2[0].numel())
        return self.router.numel() + round(self.args.experts_per_token * per_expert)

    def reset_parameters(self, std: float, out_std: float) -> None:
        for weight, s in ((self.router, std), (self.w13, std), (self.w2, out_std)):
            nn.init.trunc_normal_(weight, std=s, a=-3 * s, b=3 * s)
        nn.init.zeros_(self.balance_bias)

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None, num_modalities: int = 1,
                decoding: bool = False) -> torch.Tensor:
        """x: (n, dim) rows offered to this FFN; modality: (n,) their modality ids (for
        per-modality statistics); decoding: tokens arrive one step at a time, so routing must
        be causal (expert choice is replaced by top-k whatever ``inference_router`` says)
        -> (n, dim)."""
        if x.shape[0] == 0:
            return x.clone()
        logits = F.linear(x, self.router.to(x.dtype)).float()  # (n, E)
        probs = logits.softmax(dim=-1)
        router = self.args.router if self.training else self.args.inference_router
        if router == "expert_choice" and not decoding:
            out, chosen = self._expert_choice(x, probs)
        else:
            k = self.args.top_k if self.training or self.args.router == "top_k" else self.args.inference_top_k
            out, chosen = self._top_k(x, logits, probs, k)
        self._record(logits, probs, chosen, modality, num_modalities)
        return out

    def _experts(self, xs: torch.Tensor, plan) -> torch.Tensor:
        """SwiGLU of rows grouped by expert (plan over experts, or None for (E, C, dim) blocks)."""
        if plan is None:  # (E, C, dim): equal-sized blocks, one batched matmul per projection
            gate, up = torch.bmm(xs, self.w13.to(xs.dtype).transpose(1, 2)).split(self.hidden, dim=-1)
            return torch.bmm(F.silu(gate) * up, self.w2.to(xs.dtype).transpose(1, 2))
        gate, up = grouped_linear(xs, self.w13, plan).split(self.hidden, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.w2, plan)

    def _expert_choice(self, x: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert takes its top-C tokens. Returns (out (n, dim), chosen (n, E) bool)."""
        n, experts = probs.shape
        capacity = min(n, math.ceil(self.args.capacity_factor * n / experts))
        weight, index = probs.t().topk(capacity, dim=1)  # (E, C)
        y = self._experts(x[index], None) * weight.unsqueeze(-1).to(x.dtype)  # (E, C, dim)
        out = torch.zeros_like(x).index_add_(0, index.reshape(-1), y.reshape(-1, x.shape[1]))
        chosen = torch.zeros(n, experts, dtype=torch.bool, device=x.device)
        chosen[index, torch.arange(experts, device=x.device)[:, None]] = True
        return out, chosen

    def _top_k(self, x: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token to its k best experts (scores + balance bias), weighted by their probs."""
        n, experts = probs.shape
        scores = logits + self.balance_bias if self.args.balance == "bias" else logits
        expert = scores.topk(k, dim=-1).indices  # (n, k)
        weight = probs.gather(1, expert)
        token = torch.arange(n, device=x.device).repeat_interleave(k)
        plan = build_routing(expert.reshape(-1), experts)
        rows = token.index_select(0, plan.order)
        y = self._experts(x.index_select(0, rows), plan)
        y = y * weight.reshape(-1).index_select(0, plan.order).unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(x).index_add_(0, rows, y)
        chosen = torch.zeros(n, experts, dtype=torch.bool, device=x.device).scatter_(1, expert, True)
        return out, chosen

    def _record(self, logits, probs, chosen, modality, num_modalities) -> None:
        """Auxiliary losses (training) and per-modality routing statistics, kept as tensors
        (no device sync here; the trainer reads them when it logs)."""
        args = self.args
        load = chosen.float()  # (n, E)
        aux = logits.new_zeros(())
        if self.training:
            if args.z_loss_weight:
                aux = aux + args.z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).mean()
            if args.router == "top_k" and args.balance == "aux_loss" and args.aux_loss_weight:
                fraction = load.mean(0) / args.top_k
                aux = aux + args.aux_loss_weight * args.experts * (fraction * probs.mean(0)).sum()
            if args.router == "top_k" and args.balance == "bias":
                with torch.no_grad():  # aux-loss-free balancing: push under-loaded experts up
                    counts = load.sum(0)
                    if dist.is_available() and dist.is_initialized():
                        # the load over every data-parallel worker: the biases stay equal everywhere
                        dist.all_reduce(counts)
                    share = counts / counts.sum()
                    self.balance_bias += args.bias_rate * torch.sign(1.0 / args.experts - share)
        self.aux_loss = aux
        ids = torch.zeros(load.shape[0], dtype=torch.long, device=load.device) if modality is None else modality
        per_modality = torch.zeros(num_modalities, args.experts, device=load.device).index_add_(0, ids, load)
        tokens = torch.zeros(num_modalities, device=load.device).index_add_(0, ids, torch.ones_like(ids, dtype=torch.float))
        dropped = torch.zeros(num_modalities, device=load.device).index_add_(0, ids, (~chosen.any(1)).float())
        self.stats = {"assignments": per_modality.detach(), "tokens": tokens, "dropped": dropped}
