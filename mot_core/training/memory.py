"""Refuse a model that cannot fit in training before anything is allocated: its parameters,
gradients and AdamW moments are counted on the meta device and compared with what the device
has free."""

from __future__ import annotations

import torch

from mot_core.errors import MotError
from mot_core.model.memory import available_bytes, gigabytes
from mot_core.model.transformer import ModelArgs, MoTTransformer

BYTES_PER_TRAINED_PARAMETER = 16  # fp32 weight, gradient and two AdamW moments


def training_bytes(args: ModelArgs) -> tuple[int, int, int]:
    """(parameters, bytes of their training state (frozen ones: the weight alone), bytes of buffers such as the RoPE tables
    for ``max_seq_len``) of the engine; activations come on top. Counted on the meta device:
    nothing is allocated."""
    with torch.device("meta"):
        model = MoTTransformer(args)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # a frozen tower or row (requires_grad False) holds its fp32 weight only
    state = sum(p.numel() * (BYTES_PER_TRAINED_PARAMETER if p.requires_grad else 4) for p in model.parameters())
    return params, state, buffers


def check_training_fits(args: ModelArgs, device: torch.device, shards: int = 1) -> None:
    """A one-line MotError when the model's training state (split over ``shards`` FSDP2
    workers) and its buffers (held whole by every worker) exceed what ``device`` has free."""
    params, state, buffers = training_bytes(args)
    need = state // shards + buffers
    free = available_bytes(device)
    if free is None or need <= free:
        return
    where = "this GPU" if device.type == "cuda" else "this machine"
    split = f" per worker over {shards} FSDP2 workers" if shards > 1 else ""
    parts = [f"{gigabytes(state // shards)} for the weights, gradients and AdamW state of {params / 1e6:,.1f}M parameters"]
    if buffers > state // (10 * shards):
        parts.append(f"{gigabytes(buffers)} for buffers (RoPE tables for max_seq_len={args.max_seq_len})")
    raise MotError(
        f"the model does not fit (model.dim={args.dim}, n_layers={args.n_layers}, ffn_hidden={args.ffn_hidden or 'default'}, "
        f"max_seq_len={args.max_seq_len}): it needs at least {gigabytes(need)}{split} ({'; '.join(parts)}) and {where} "
        f"has {gigabytes(free)} free; use a smaller model, or FSDP2 over more workers (mot launch)")
