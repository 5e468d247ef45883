"""Building a module without allocating its parameters: each parameter lands on the meta
device, so a worker that will only hold shards of a model (FSDP2) never holds the whole model
(``mot_core.training.parallelism.materialize`` allocates the shards afterwards)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory), buffers as
    usual (RoPE tables, index maps: small, and computed at build). A parameter is allocated
    for a moment, one at a time, then replaced by its meta twin."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register
