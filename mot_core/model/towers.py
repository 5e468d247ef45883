"""Per-modality ("untied") layers that run on the modality-sorted residual stream.

Every layer stores its towers stacked on a leading axis G: G == num_modalities when the
component is untied, G == 1 when it is shared. The dense baseline is therefore the same code
with G == 1 everywhere, and a dense checkpoint warm-starts every tower by broadcasting its
single slice (see ``mot_core.model.warm_start_from_dense``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mot_core.model.frozen import assembled, split_rows, total_rows
from mot_core.model.moe import MoEArgs, MoEFeedForward
from mot_core.model.routing import RoutingPlan, grouped_linear, scale_by_group


class TowerLinear(nn.Module):
    """G stacked bias-free linear maps. weight: (G, out_features, in_features)."""

    def __init__(self, towers: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(towers, out_features, in_features))

    @property
    def towers(self) -> int:
        return total_rows(self, "weight")

    def forward(self, x_sorted: torch.Tensor, plan: RoutingPlan | None) -> torch.Tensor:
        """x_sorted: (N, in) -> (N, out)."""
        return grouped_linear(x_sorted, assembled(self, "weight"), plan if self.towers > 1 else None)

    def reset_parameters(self, std: float) -> None:
        for weight in self.parameters():
            nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std)

    def freeze_towers(self, towers: tuple[int, ...]) -> None:
        split_rows(self, "weight", towers)


class TowerRMSNorm(nn.Module):
    """RMSNorm with one gain vector per tower. weight: (G, dim)."""

    def __init__(self, towers: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(towers, dim))

    def forward(self, x_sorted: torch.Tensor, plan: RoutingPlan | None) -> torch.Tensor:
        """x_sorted: (N, dim) -> (N, dim) in its dtype. The RMS statistic is per token, so only
        the gain depends on the modality: each contiguous modality slice is scaled by its
        tower's gain. Computed in fp32 by design (the gains are fp32 master weights): under bf16
        autocast the input is bf16, and a bf16 input with an fp32 gain has no fused kernel."""
        shape = (x_sorted.shape[-1],)
        weight = assembled(self, "weight")
        x = x_sorted.float()
        if weight.shape[0] == 1:
            out = F.rms_norm(x, shape, weight=weight[0].float(), eps=self.eps)
        else:
            out = scale_by_group(F.rms_norm(x, shape, eps=self.eps), weight.float(), plan)
        return out.to(x_sorted.dtype)

    def reset_parameters(self) -> None:
        for weight in self.parameters():
            nn.init.ones_(weight)

    def freeze_towers(self, towers: tuple[int, ...]) -> None:
        split_rows(self, "weight", towers)


class TowerSwiGLU(nn.Module):
    """SwiGLU FFN per tower: w2(silu(w1 x) * w3 x). w1 and w3 are fused into one matmul."""

    def __init__(self, towers: int, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w13 = TowerLinear(towers, dim, 2 * hidden)
        self.w2 = TowerLinear(towers, hidden, dim)

    def forward(self, x_sorted: torch.Tensor, plan: RoutingPlan | None) -> torch.Tensor:
        """x_sorted: (N, dim) -> (N, dim)."""
        gate, up = self.w13(x_sorted, plan).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up, plan)

    def reset_parameters(self, std: float, out_std: float) -> None:
        self.w13.reset_parameters(std)
        self.w2.reset_parameters(out_std)

    def active_parameters(self) -> int:
        return (self.w13.weight[0].numel() + self.w2.weight[0].numel())

    def freeze_towers(self, towers: tuple[int, ...]) -> None:
        self.w13.freeze_towers(towers)
        self.w2.freeze_towers(towers)


class MixedTowerFFN(nn.Module):
    """One FFN per tower where some towers are MoE (a hybrid "MoT + text MoE-4x", or the
    MoE-4x baseline's single shared tower). Each tower runs on its contiguous slice of the
    sorted stream; a tower with no rows in the batch costs nothing."""

    def __init__(self, dim: int, hidden: int, kinds: tuple[MoEArgs | None, ...], num_modalities: int):
        super().__init__()
        self.num_modalities = num_modalities
        self.towers = nn.ModuleList(
            TowerSwiGLU(1, dim, hidden) if kind is None else MoEFeedForward(dim, hidden, kind) for kind in kinds
        )

    def forward(self, x_sorted: torch.Tensor, plan: RoutingPlan | None, modality: torch.Tensor | None = None,
                decoding: bool = False) -> torch.Tensor:
        """x_sorted: (N, dim) rows in tower order; modality: (N,) their modality ids;
        decoding: incremental decoding with a KV cache (MoE routers must then be causal)."""
        counts = plan.counts if plan is not None and len(self.towers) > 1 else (x_sorted.shape[0],)
        pieces, start = [], 0
        for tower, n in zip(self.towers, counts):
            rows = slice(start, start + n)
            start += n
            if not n:
                if isinstance(tower, MoEFeedForward):
                    tower.aux_loss, tower.stats = None, {}
                continue
            if isinstance(tower, MoEFeedForward):
                pieces.append(tower(x_sorted[rows], None if modality is None else modality[rows], self.num_modalities,
                                    decoding))
            else:
                pieces.append(tower(x_sorted[rows], None))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def reset_parameters(self, std: float, out_std: float) -> None:
        for tower in self.towers:
            tower.reset_parameters(std, out_std)

    def active_parameters(self) -> int:
        """A token goes through one tower: the largest tower's active parameters."""
        return max(t.active_parameters() for t in self.towers)

    def freeze_towers(self, towers: tuple[int, ...]) -> None:
        for index in towers:  # each tower is a module of its own here
            self.towers[index].requires_grad_(False)


def build_ffn(towers: int, dim: int, hidden: int, kinds: tuple[MoEArgs | None, ...], num_modalities: int) -> nn.Module:
    """Stacked SwiGLU towers (grouped matmul) when no tower is MoE, else one module per tower."""
    if not kinds or all(kind is None for kind in kinds):
        return TowerSwiGLU(towers, dim, hidden)
    if len(kinds) != towers:
        raise ValueError(f"{towers} FFN towers but {len(kinds)} FFN kinds")
    return MixedTowerFFN(dim, hidden, kinds, num_modalities)


def default_ffn_hidden(dim: int, multiple_of: int = 64) -> int:
    """Llama's 8/3 * dim rounded up: SwiGLU's three matrices cost what a 4x MLP's two do."""
    hidden = int(8 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)
