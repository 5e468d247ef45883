"""Token routing by modality: one stable sort per batch, grouped matmuls, inverse permutation.

MoT routing is MoE routing with a fixed top-1 assignment (expert = modality), so it needs no
router network: the permutation is known as soon as the batch is built. ``RoutingPlan`` is
therefore computed once per batch (on the host, alongside the batch) and shared by every layer.

Inside the model the residual stream lives in *modality-sorted* order: every per-token op
(norms, Q/K/V/O, FFN, heads, losses) then sees each modality as one contiguous slice, and only
global attention needs the original order (one gather of Q/K/V in, one gather of the output
back per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RoutingPlan:
    """How the N = B*S tokens of a batch map to contiguous modality groups.

    Attributes:
        order: (N,) long. ``sorted = flat[order]``: stable sort of tokens by modality id.
        inverse: (N,) long. ``flat = sorted[inverse]``.
        counts: tokens per modality, length M, as Python ints (known on the host when the
            batch is built, so slicing never synchronises with the device).
        offsets: (M,) int32 cumulative counts on the model's device, for ``torch._grouped_mm``.
        sorted_modality: (N,) long modality id of each token in sorted order.
        value_counts: per modality, how many of its tokens carry continuous values; they come
            last in the modality's slice (the sort key is (modality, carries a value)), so an
            input adapter reads one contiguous block. Empty when no token carries a value.
    """

    order: torch.Tensor
    inverse: torch.Tensor
    counts: tuple[int, ...]
    offsets: torch.Tensor
    sorted_modality: torch.Tensor
    value_counts: tuple[int, ...] = ()

    def num_values(self, modality: int) -> int:
        """Tokens of ``modality`` that carry continuous values (the end of its slice)."""
        return self.value_counts[modality] if self.value_counts else 0

    @property
    def num_modalities(self) -> int:
        return len(self.counts)

    def bounds(self, modality: int) -> tuple[int, int]:
        """[start, end) of one modality's contiguous slice in sorted order."""
        start = sum(self.counts[:modality])
        return start, start + self.counts[modality]

    def sort(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, ...) in original order -> (N, ...) modality-sorted."""
        return _Permute.apply(flat, self.order, self.inverse)

    def unsort(self, flat_sorted: torch.Tensor) -> torch.Tensor:
        """(N, ...) modality-sorted -> (N, ...) original order."""
        return _Permute.apply(flat_sorted, self.inverse, self.order)

    def to(self, device: torch.device | str) -> "RoutingPlan":
        return RoutingPlan(
            order=self.order.to(device, non_blocking=True),
            inverse=self.inverse.to(device, non_blocking=True),
            counts=self.counts,
            offsets=self.offsets.to(device, non_blocking=True),
            sorted_modality=self.sorted_modality.to(device, non_blocking=True),
            value_counts=self.value_counts,
        )


class _Permute(torch.autograd.Function):
    """Row permutation whose backward is the inverse permutation: a gather, where
    ``index_select``'s generic backward would scatter-add."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _SegmentScale(torch.autograd.Function):
    """out[rows of group g] = x[rows of group g] * gains[g], over contiguous row groups: the
    per-modality RMSNorm gain without materialising an (N, D) tensor of gathered gains."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gains: torch.Tensor, counts: tuple[int, ...]):
        out = torch.empty_like(x)
        start = 0
        for g, n in enumerate(counts):
            torch.mul(x[start : start + n], gains[g], out=out[start : start + n])
            start += n
        ctx.save_for_backward(x, gains)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, gains = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_gains = torch.empty_like(gains)
        start = 0
        for g, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            torch.mul(grad_out[rows], gains[g], out=grad_x[rows])
            torch.sum(grad_out[rows] * x[rows], dim=0, out=grad_gains[g])
            start += n
        return grad_x, grad_gains, None


def scale_by_group(x_sorted: torch.Tensor, gains: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """(N, D) modality-sorted rows times their tower's gain vector, gains: (G, D)."""
    return _SegmentScale.apply(x_sorted, gains, plan.counts)


def build_routing(modality_ids: torch.Tensor, num_modalities: int, is_value: torch.Tensor | None = None) -> RoutingPlan:
    """Sort once. ``modality_ids``: (B, S) or (N,) long in [0, num_modalities); ``is_value``:
    same shape, bool, True where the token carries a continuous value (sorted last within its
    modality).

    Call this where the batch is built (CPU) so ``counts`` costs no device sync.
    """
    flat = modality_ids.reshape(-1)
    value_counts: tuple[int, ...] = ()
    if is_value is not None and bool(is_value.any()):
        value_flat = is_value.reshape(-1)
        order = torch.argsort(flat * 2 + value_flat.long(), stable=True)
        value_counts = tuple(int(c) for c in torch.bincount(flat[value_flat], minlength=num_modalities).tolist())
    else:
        order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts_t = torch.bincount(flat, minlength=num_modalities)
    if counts_t.numel() > num_modalities:
        raise ValueError(f"modality id {int(flat.max())} >= number of modalities {num_modalities}")
    counts = tuple(int(c) for c in counts_t.tolist())
    offsets = torch.cumsum(counts_t, 0).to(torch.int32)
    return RoutingPlan(order, inverse, counts, offsets, flat.index_select(0, order), value_counts)


class _GroupedLinearLoop(torch.autograd.Function):
    """y_g = x_g @ W_g^T over contiguous row groups, writing straight into one output buffer.

    Avoids the concatenation copies that ``torch.cat([F.linear(x_g, W_g) ...])`` makes in the
    forward and backward passes. Groups with zero rows cost nothing and give W_g a zero grad.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: tuple[int, ...]):
        out = x.new_empty(x.shape[0], weight.shape[1])
        start = 0
        for g, n in enumerate(counts):
            if n:
                torch.mm(x[start : start + n], weight[g].t(), out=out[start : start + n])
            start += n
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        start = 0
        for g, n in enumerate(ctx.counts):
            go = grad_out[start : start + n]
            if grad_x is not None and n:
                torch.mm(go, weight[g], out=grad_x[start : start + n])
            if grad_w is not None:  # an empty group's product is a zero matrix
                torch.mm(go.t(), x[start : start + n], out=grad_w[g])
            start += n
        return grad_x, grad_w, None


def _grouped_mm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # torch._grouped_mm is the fused kernel on CUDA (bf16, Hopper+); its CPU path exists but its
    # backward rejects expanded gradients, so the loop serves the CPU.
    return (
        x.is_cuda
        and hasattr(torch, "_grouped_mm")
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and (x.shape[1] * x.element_size()) % 16 == 0
        and (weight.shape[1] * weight.element_size()) % 16 == 0
    )


def grouped_linear(
    x_sorted: torch.Tensor, weight: torch.Tensor, plan: RoutingPlan | None
) -> torch.Tensor:
    """Per-modality linear map over modality-sorted rows.

    Args:
        x_sorted: (N, in) rows sorted by modality (or in any order when ``weight`` is shared).
        weight: (G, out, in). G == 1 means the projection is shared (tied) by all modalities.
        plan: routing plan; required when G > 1.
    Returns:
        (N, out).
    """
    if weight.shape[0] == 1:
        return F.linear(x_sorted, weight[0])
    if plan is None or plan.num_modalities != weight.shape[0]:
        raise ValueError("an untied projection needs a routing plan with one group per tower")
    device_type = x_sorted.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach into custom Functions or out= matmuls: cast here, explicitly,
        # exactly as it would cast F.linear's operands.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _grouped(x_sorted.to(dtype), weight.to(dtype), plan)
    return _grouped(x_sorted, weight, plan)


def _grouped(x_sorted: torch.Tensor, weight: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    if _grouped_mm_usable(x_sorted, weight):
        return torch._grouped_mm(x_sorted, weight.transpose(-2, -1), offs=plan.offsets)
    return _GroupedLinearLoop.apply(x_sorted, weight, plan.counts)


def group_plan(plan: RoutingPlan, groups: tuple[int, ...]) -> RoutingPlan:
    """The plan of towers shared by groups of modalities: ``groups[m]`` is modality m's tower,
    non-decreasing in m, so each tower's rows stay one contiguous block of the sorted stream
    (the engine orders the modalities of a group next to each other)."""
    if not groups or list(groups) == list(range(len(plan.counts))):
        return plan
    n_groups = max(groups) + 1
    counts = [0] * n_groups
    for m, g in enumerate(groups):
        counts[g] += plan.counts[m]
    table = torch.tensor(groups, device=plan.sorted_modality.device)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32).to(plan.offsets.device)
    return RoutingPlan(plan.order, plan.inverse, tuple(counts), offsets, table[plan.sorted_modality])
