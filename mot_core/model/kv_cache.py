"""Key/value cache for incremental decoding over interleaved sequences.

Holds, per layer, the post-RoPE keys and values of every token seen so far, and the document
and span ids of those tokens so the attention rule of ``mot_core.model.attention`` applies unchanged
to new queries. New tokens are routed to their modality's towers like any batch: only the
cached K/V (already projected by the right tower) are reused.
"""

from __future__ import annotations

import contextlib

import torch


class KVCache:
    """k, v: (layers, B, Hkv, capacity, head_dim); document, span: (B, capacity)."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.document = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.span = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.capacity = capacity
        self.length = 0
        self._pending = 0
        self._keep = True

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, capacity: int) -> "KVCache":
        args = model.args
        head_dim = args.dim // args.n_heads
        param = model.embed.weight
        return cls(args.n_layers, batch, args.n_kv_heads or args.n_heads, head_dim, capacity, param.dtype, param.device)

    def begin(self, document: torch.Tensor, span: torch.Tensor | None) -> torch.Tensor:
        """Register T new tokens' layout ((B, T) ids) and return the boolean attention mask
        of the new queries over all tokens, (B, 1, T, length + T)."""
        new = document.shape[1]
        end = self.length + new
        if end > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded ({end} tokens)")
        self.document[:, self.length : end] = document
        self.span[:, self.length : end] = -1 if span is None else span
        self._pending = new
        doc, spn = self.document[:, :end], self.span[:, :end]
        q_doc, q_span = doc[:, self.length :], spn[:, self.length :]
        q_idx = torch.arange(self.length, end, device=doc.device)
        k_idx = torch.arange(end, device=doc.device)
        causal = (k_idx[None, :] <= q_idx[:, None]).unsqueeze(0)
        same_span = (q_span[:, :, None] >= 0) & (q_span[:, :, None] == spn[:, None, :])
        same_doc = q_doc[:, :, None] == doc[:, None, :]
        return ((causal | same_span) & same_doc).unsqueeze(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v ((B, Hkv, T, hd)); return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self) -> None:
        """Called once all layers have seen the new tokens; inside ``scratch`` they are dropped."""
        if self._keep:
            self.length += self._pending
        self._pending = 0

    @contextlib.contextmanager
    def scratch(self):
        """Forward passes inside attend to the cache and to themselves but leave nothing in it
        (each denoising step of a span sees the prompt and its current candidates only)."""
        self._keep = False
        try:
            yield self
        finally:
            self._keep = True
