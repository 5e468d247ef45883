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

from mot_core.model.routing import RoutingPlan, grouped_linear, scale_by_group


class TowerLinear(nn.Module):
    """G stacked bias-free linear maps. weight: (G, out_features, in_features)."""

    def __init__(self, towers: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(towers, out_features, in_features))

    @property
    def towers(self) -> int:
        return self.weight.shape[0]

    def forward(self, x_sorted: torch.Tensor, plan: RoutingPlan | None) -> torch.Tensor:
        """x_sorted: (N, in) -> (N, out)."""
        return grouped_linear(x_sorted, self.weight, plan if self.towers > 1 else None)

    def reset_parameters(self, std: float) -> None:
        nn.init.trunc_normal_(self.weight, std=std, a=-3 * std, b=3 * std)


class TowerRMSNorm(nn.Module):
    """RMSNorm with one gain vector per tower. weight: (G, dim)."""

    def __init__(self, towers: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(towers, dim))

    def forward(self, x_sorted: torch.Tensor, plan: RoutingPlan | None) -> torch.Tensor:
        """x_sorted: (N, dim) -> (N, dim). The RMS statistic is per token, so only the gain
        depends on the modality: each contiguous modality slice is scaled by its tower's gain."""
        shape = (x_sorted.shape[-1],)
        if self.weight.shape[0] == 1:
            return F.rms_norm(x_sorted, shape, weight=self.weight[0], eps=self.eps)
        return scale_by_group(F.rms_norm(x_sorted, shape, eps=self.eps), self.weight, plan)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


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


def default_ffn_hidden(dim: int, multiple_of: int = 64) -> int:
    """Llama's 8/3 * dim rounded up: SwiGLU's three matrices cost what a 4x MLP's two do."""
    hidden = int(8 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)
