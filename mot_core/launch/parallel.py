"""Data parallelism for the MoT transformer: DDP replicas or FSDP2 shards (torch only).

FSDP2 (``fully_shard``) shards every block on its own, so each block's towers (one weight
tensor per component, stacked over modalities) are all-gathered just before the block runs
and freed after it; the root keeps the embedding, the final norm, the LM head and the
modules plugins own. The root is not resharded after its forward, so its parameters stay
gathered until the backward pass ends: that lets losses use ``model.head_weight`` and plugin
heads after ``forward`` returns.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

def apply_ddp(model: torch.nn.Module) -> Callable:
    """Replicate ``model``; returns the wrapper whose call runs the forward (gradients are
    averaged over workers during the backward pass)."""
    from torch.nn.parallel import DistributedDataParallel

    # device_ids=None: the model sits on one device already and batches arrive there, so DDP
    # need not move (or copy) the batch's routing plan and layout.
    # broadcast_buffers=False: buffers are RoPE tables and MoE selection biases, kept equal on
    # every worker by construction (biases update from loads summed over workers).
    return DistributedDataParallel(model, device_ids=None, broadcast_buffers=False)


def apply_fsdp2(model: torch.nn.Module, device_type: str, param_dtype: torch.dtype | None,
                reshard_after_forward: bool = True) -> Callable:
    """Shard ``model`` in place with FSDP2 over all workers (one mesh dimension); returns
    ``model``, whose forward now gathers each block's shards when it runs.

    ``param_dtype``: bf16 computes in bf16 with fp32 master weights and fp32 gradient
    reduction; None keeps fp32 (CPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root stays gathered after its forward: losses read its LM head and plugin heads then.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip the gradient norm over all parameters, sharded (DTensor) or not; returns the
    global norm before clipping, the same on every worker."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)
