"""Refuse a run that cannot fit in training before anything is allocated: its parameters,
gradients and AdamW moments, its buffers and a lower bound of its activations are computed
arithmetically from the shapes (no tensor and no module is built: a million layers are a
product, not a million modules) and compared with what the device has free."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch

from mot_core.config import RunConfig
from mot_core.errors import MotError
from mot_core.experiment.build import model_args
from mot_core.model.memory import available_bytes, gigabytes
from mot_core.model.towers import default_ffn_hidden
from mot_core.model.transformer import ModelArgs

BYTES_PER_TRAINED_PARAMETER = 16  # fp32 weight, gradient and two AdamW moments
BYTES_PER_FROZEN_PARAMETER = 4  # the fp32 weight alone: no gradient, no optimizer state
INDEX_BYTES = 8  # a long: the row order of a partly frozen tensor, a tower index


class _Count:
    """Parameters (trainable and frozen) and buffer bytes, added up tensor by tensor."""

    def __init__(self) -> None:
        self.trained = self.frozen = self.buffers = 0

    def stacked(self, rows: int, frozen_rows: Sequence[int] | int, per_row: int) -> None:
        """A (rows, ...) tensor of ``per_row`` elements a row, ``frozen_rows`` of whose rows do
        not train (``mot_core.model.frozen.split_rows``: a partly frozen one keeps its row order)."""
        frozen = frozen_rows if isinstance(frozen_rows, int) else len(set(frozen_rows))
        self.trained += (rows - frozen) * per_row
        self.frozen += frozen * per_row
        if 0 < frozen < rows:
            self.buffers += rows * INDEX_BYTES

    @property
    def params(self) -> int:
        return self.trained + self.frozen

    @property
    def state(self) -> int:
        return self.trained * BYTES_PER_TRAINED_PARAMETER + self.frozen * BYTES_PER_FROZEN_PARAMETER


def _count(args: ModelArgs) -> _Count:
    """``MoTTransformer(args)``'s tensors, from its shapes (mirrors its constructor: one more
    tensor there is one more term here; ``tests/test_bad_inputs.py`` compares the two)."""
    count = _Count()
    dim, layers = args.dim, args.n_layers
    head_dim = dim // args.n_heads
    kv_heads = args.n_kv_heads or args.n_heads
    hidden = args.ffn_hidden or default_ffn_hidden(dim)
    attention, ffn, norm = (args.towers(u) for u in (args.untie_attention, args.untie_ffn, args.untie_norm))
    frozen_attention, frozen_ffn, frozen_norm = (
        args.frozen_towers(u) for u in (args.untie_attention, args.untie_ffn, args.untie_norm))
    frozen_rows = sum(end - start for start, end in args.frozen_rows)

    layer = _Count()
    layer.stacked(norm, frozen_norm, 2 * dim)  # attn_norm and ffn_norm: (towers, dim) each
    layer.stacked(attention, frozen_attention, (args.n_heads + 2 * kv_heads) * head_dim * dim + dim * dim)  # wqkv, wo
    if len(frozen_attention) and len(frozen_attention) < attention:  # wqkv and wo: one row order each
        layer.buffers += attention * INDEX_BYTES
    if len(frozen_norm) and len(frozen_norm) < norm:
        layer.buffers += norm * INDEX_BYTES
    qk_norm = args.qk_norm or (False,) * args.num_modalities
    if any(qk_norm):
        layer.stacked(attention, frozen_attention, 2 * head_dim)  # q_norm, k_norm
        if len(frozen_attention) and len(frozen_attention) < attention:
            layer.buffers += attention * INDEX_BYTES
        layer.buffers += len(qk_norm) * (1 + INDEX_BYTES)  # qk_norm_on (bool), tower_of (long)
    kinds = args.ffn_tower_kinds()
    if all(kind is None for kind in kinds):  # stacked SwiGLU towers: w13 (2 hidden x dim), w2 (dim x hidden)
        layer.stacked(ffn, frozen_ffn, 3 * hidden * dim)
        if len(frozen_ffn) and len(frozen_ffn) < ffn:
            layer.buffers += ffn * INDEX_BYTES
    else:  # one module per tower, a frozen one frozen whole
        for tower, kind in enumerate(kinds):
            size = 3 * hidden * dim if kind is None else kind.experts * (dim + 3 * hidden * dim)  # + the router
            layer.stacked(1, 1 if tower in frozen_ffn else 0, size)
            if kind is not None:
                layer.buffers += kind.experts * 4  # balance_bias
    count.trained, count.frozen, count.buffers = (layers * n for n in (layer.trained, layer.frozen, layer.buffers))

    count.stacked(args.vocab_size, frozen_rows, dim)  # the shared embedding
    if not args.tie_embeddings:
        count.stacked(args.vocab_size, frozen_rows, dim)  # the head
    count.stacked(norm, frozen_norm, dim)  # the final norm
    count.buffers += 2 * args.max_seq_len * (head_dim // 2) * 4  # the RoPE tables: cos and sin, fp32
    return count


def training_bytes(args: ModelArgs) -> tuple[int, int, int]:
    """(parameters, bytes of their training state (frozen ones: the weight alone), bytes of
    buffers such as the RoPE tables for ``max_seq_len``) of the engine, computed from its
    shapes: nothing is built or allocated. Activations come on top (``activation_bytes``)."""
    count = _count(args)
    return count.params, count.state, count.buffers


def activation_bytes(args: ModelArgs, positions: int) -> int:
    """A lower bound of the activations of a training step over ``positions`` positions (rows x
    seq_len of one process): the fp32 input of every layer, which the backward pass needs
    whether or not the layers are recomputed (activation checkpointing keeps just these)."""
    return positions * args.n_layers * args.dim * 4


def check_training_fits(args: ModelArgs, device: torch.device, shards: int = 1, rows: int = 0,
                        seq_len: int = 0) -> None:
    """A one-line MotError when the model's training state (split over ``shards`` FSDP2
    workers), its buffers (held whole by every worker) and the activations of ``rows`` rows of
    ``seq_len`` positions (this process's share of the batch) exceed what ``device`` has free."""
    params, state, buffers = training_bytes(args)
    activations = activation_bytes(args, rows * seq_len)
    need = state // shards + buffers + activations
    free = available_bytes(device)
    if free is None or need <= free:
        return
    where = "this GPU" if device.type == "cuda" else "this machine"
    split = f" per worker over {shards} FSDP2 workers" if shards > 1 else ""
    terms = [  # (bytes, what they hold, what lowers them)
        (state // shards, f"the weights, gradients and AdamW state of {params / 1e6:,.1f}M parameters",
         "use a smaller model, or FSDP2 over more workers (mot launch)"),
        (buffers, f"buffers (RoPE tables for max_seq_len={args.max_seq_len})", "lower model.max_seq_len"),
        (activations, f"activations (each layer's fp32 input for {rows:,} rows x {seq_len:,} positions, kept for "
         "the backward pass)", "lower train.batch_size or train.seq_len"),
    ]
    largest = max(terms, key=lambda term: term[0])
    parts = [f"{gigabytes(size)} for {what}" for size, what, _ in terms if size > need // 10 or size == largest[0]]
    raise MotError(
        f"the model does not fit (model.dim={args.dim}, n_layers={args.n_layers}, ffn_hidden={args.ffn_hidden or 'default'}, "
        f"max_seq_len={args.max_seq_len}; {rows:,} rows x {seq_len:,} positions a step): it needs at least "
        f"{gigabytes(need)}{split} ({'; '.join(parts)}) and {where} has {gigabytes(free)} free; {largest[2]}")


def check_config_fits(config: RunConfig, device: torch.device, shards: int = 1, workers: int = 1) -> None:
    """``check_training_fits`` before the tokenizers exist (before they are fitted, or any file
    is written): the model without its vocabulary rows, a lower bound of the one trained.
    ``workers``: the data-parallel processes the batch's rows are split over."""
    names = list(config.mixture.modalities)
    no_rows = SimpleNamespace(names=names, size=0, offsets=dict.fromkeys(names, 0),
                              modalities={name: SimpleNamespace(vocab_size=0) for name in names})
    args = model_args(config, no_rows)  # type: ignore[arg-type]  # what model_args reads of a vocabulary
    check_training_fits(args, device, shards, -(-config.train.batch_size // workers), config.train.seq_len)
