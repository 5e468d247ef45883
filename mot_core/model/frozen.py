"""Rows of a parameter that do not train: frozen towers (LMFusion keeps a pretrained text tower
fixed while new towers learn beside it) and frozen vocabulary rows of the shared embedding and
head.

Towers are stacked on a leading axis, so a frozen tower is a block of rows of one tensor.
Autograd and optimizers work per tensor, so the frozen rows move into a tensor of their own:
``<name>`` keeps the trainable rows and ``<name>_frozen`` (``requires_grad=False``) the frozen
ones. The frozen tensor gets no gradient, no optimizer state and no weight decay; DDP does not
reduce it and FSDP2 shards it like any parameter. ``assembled`` puts the rows back in their
order for the forward pass (one copy of the weight per use, small beside the matmul it feeds).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def split_rows(module: nn.Module, name: str, frozen: Sequence[int]) -> None:
    """Freeze rows ``frozen`` (indices along dim 0) of ``module.<name>`` (R, ...). All rows
    frozen: the parameter itself stops training. No rows: nothing changes."""
    full = getattr(module, name)
    rows = full.shape[0]
    frozen = sorted({int(r) for r in frozen})
    if not frozen:
        return
    if frozen[0] < 0 or frozen[-1] >= rows:
        raise ValueError(f"{name}: frozen rows {frozen} outside 0..{rows - 1}")
    if len(frozen) == rows:
        full.requires_grad_(False)
        return
    keep = [r for r in range(rows) if r not in set(frozen)]
    with torch.no_grad():
        trainable = nn.Parameter(full[keep].clone())
        fixed = nn.Parameter(full[frozen].clone(), requires_grad=False)
    del module._parameters[name]
    module.register_parameter(name, trainable)
    module.register_parameter(f"{name}_frozen", fixed)
    # position of each original row in cat([trainable, frozen])
    order = torch.empty(rows, dtype=torch.long)
    order[torch.tensor(keep + frozen)] = torch.arange(rows)
    module.register_buffer(f"{name}_order", order, persistent=False)


def is_split(module: nn.Module, name: str) -> bool:
    return f"{name}_frozen" in module._parameters


def assembled(module: nn.Module, name: str) -> torch.Tensor:
    """The whole (R, ...) tensor, rows in their original order."""
    own = getattr(module, name)
    if not is_split(module, name):
        return own
    stacked = torch.cat([own, getattr(module, f"{name}_frozen")])
    return stacked.index_select(0, getattr(module, f"{name}_order"))


def total_rows(module: nn.Module, name: str) -> int:
    own = getattr(module, name).shape[0]
    return own + (getattr(module, f"{name}_frozen").shape[0] if is_split(module, name) else 0)


def _local_part(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(the part of ``param`` this process holds, the sharded dim, the global index of its
    first entry along that dim). FSDP2 shards one dim (``Shard(d)``) in torch.chunk's split:
    rank r holds [r * ceil(n / world), ...); a tensor that is not sharded is held whole."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param, 0, 0
    (placement,) = param.placements
    if not isinstance(placement, Shard):
        raise ValueError(f"writing rows of a DTensor needs one Shard placement, got {param.placements}")
    dim = placement.dim
    world, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = -(-param.shape[dim] // world)
    return param.to_local(), dim, min(rank * chunk, param.shape[dim])


def _write(param: torch.Tensor, rows: torch.Tensor, value: torch.Tensor) -> None:
    """param[rows] = value for the entries this process holds (all of them unless sharded)."""
    local, dim, first = _local_part(param)
    if dim == 0:
        held = (rows >= first) & (rows < first + local.shape[0])
        if bool(held.any()):
            local[(rows[held] - first).to(local.device)] = value[held].to(local.device, local.dtype)
        return
    if local.shape[dim] == 0:
        return
    part = value.narrow(dim, first, local.shape[dim])
    local[rows.to(local.device)] = part.to(local.device, local.dtype)


@torch.no_grad()
def write_rows(module: nn.Module, name: str, rows: Sequence[int], value: torch.Tensor) -> None:
    """Copy ``value`` (len(rows), ...) or (1, ...) (broadcast) into rows ``rows`` of the whole
    tensor, wherever they are stored: the trainable or the frozen part, and under FSDP2 only
    the rows this process holds (loading pretrained weights into a sharded model)."""
    rows = torch.as_tensor(list(rows), dtype=torch.long)
    value = value.expand(len(rows), *value.shape[1:]) if value.shape[0] == 1 else value
    if not is_split(module, name):
        _write(getattr(module, name), rows, value)
        return
    own, fixed = getattr(module, name), getattr(module, f"{name}_frozen")
    places = getattr(module, f"{name}_order").cpu()[rows]
    in_own = places < own.shape[0]
    _write(own, places[in_own], value[in_own])
    _write(fixed, places[~in_own] - own.shape[0], value[~in_own])


def read_rows(module: nn.Module, name: str, rows: Sequence[int]) -> torch.Tensor:
    """(len(rows), ...) copy of rows ``rows`` of the whole tensor (exporting a tower)."""
    with torch.no_grad():
        return assembled(module, name)[list(rows)].detach().clone()
