"""Global self-attention over the whole interleaved sequence, behind one backend interface.

Masks are described once per batch by an ``AttentionLayout`` (document ids for packing, and
ids of spans that attend bidirectionally, e.g. Transfusion's image spans). Each backend turns
a layout into its own mask object once, and ``MaskCache`` keeps it for every layer of the
forward pass and for later batches with the same layout.

The rule every backend implements, for query i and key j of the same row:
    allowed(i, j) = doc[i] == doc[j] and (j <= i or (span[i] >= 0 and span[i] == span[j]))
"""

from __future__ import annotations

import abc
import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
import torch.nn.functional as F

from mot_core.errors import MotError


@dataclass(frozen=True)
class AttentionLayout:
    """Who may attend to whom in a (B, S) batch.

    Attributes:
        document: (B, S) long; tokens attend only within their document (sequence packing).
        span: (B, S) long or None; tokens of the same span id >= 0 attend to each other in
            both directions (the rest is causal). None means no bidirectional spans.
        key: hashable summary of the layout for caching, or None to disable caching.
        plain_causal: True when every row is one document with no spans (a pure causal mask).
    """

    document: torch.Tensor
    span: torch.Tensor | None
    key: Hashable | None
    plain_causal: bool

    @staticmethod
    def build(document: torch.Tensor, span: torch.Tensor | None = None) -> "AttentionLayout":
        """Build on the host: the key hashes the ids, which costs no device sync on CPU."""
        if span is not None and not bool((span >= 0).any()):
            span = None
        plain = bool((document == document[:, :1]).all()) and span is None
        key = None
        if document.device.type == "cpu":
            span_bytes = b"" if span is None else span.numpy().tobytes()
            key = (tuple(document.shape), hash(document.numpy().tobytes()), hash(span_bytes))
        return AttentionLayout(document, span, key, plain)

    def to(self, device: torch.device | str) -> "AttentionLayout":
        span = None if self.span is None else self.span.to(device, non_blocking=True)
        return AttentionLayout(self.document.to(device, non_blocking=True), span, self.key, self.plain_causal)


def dense_mask(layout: AttentionLayout) -> torch.Tensor:
    """Boolean (B, 1, S, S) mask, True where attention is allowed."""
    doc = layout.document
    seq = doc.shape[1]
    idx = torch.arange(seq, device=doc.device)
    allowed = (idx[None, :] <= idx[:, None]).unsqueeze(0)  # (1, S, S): key <= query
    if layout.span is not None:
        span = layout.span
        bidir = (span[:, :, None] >= 0) & (span[:, :, None] == span[:, None, :])
        allowed = allowed | bidir
    allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    return allowed.unsqueeze(1)


class AttentionBackend(abc.ABC):
    """Interface: ``build_mask`` once per layout, ``attend`` once per layer."""

    name: str = ""

    @abc.abstractmethod
    def build_mask(self, layout: AttentionLayout) -> Any:
        """The backend's mask object for a layout (built once, then cached)."""

    @abc.abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        """q: (B, H, S, hd); k, v: (B, Hkv, S, hd) -> (B, H, S, hd)."""


class SDPABackend(AttentionBackend):
    """torch's scaled_dot_product_attention; pure causal batches use its is_causal fast path."""

    name = "sdpa"

    def build_mask(self, layout: AttentionLayout) -> torch.Tensor | None:
        return None if layout.plain_causal else dense_mask(layout)

    def attend(self, q, k, v, mask):
        gqa = q.shape[1] != k.shape[1]
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class FlexBackend(AttentionBackend):
    """flex_attention with a block-sparse mask: skips fully masked blocks across documents."""

    name = "flex"

    def build_mask(self, layout: AttentionLayout):
        from torch.nn.attention.flex_attention import create_block_mask

        doc, span = layout.document, layout.span

        def mask_mod(b, h, q_idx, kv_idx):
            visible = (kv_idx <= q_idx) & (doc[b, q_idx] == doc[b, kv_idx])
            if span is None:
                return visible
            same_span = (span[b, q_idx] >= 0) & (span[b, q_idx] == span[b, kv_idx])
            return visible | (same_span & (doc[b, q_idx] == doc[b, kv_idx]))

        batch, seq = doc.shape
        return create_block_mask(mask_mod, batch, None, seq, seq, device=doc.device)

    def attend(self, q, k, v, mask):
        from torch.nn.attention.flex_attention import flex_attention

        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise MotError(
                "attention backend 'flex' has no backward pass on CPU in this torch; "
                "train with model.attention_backend=sdpa (flex works on CPU for eval/generation)"
            )
        # Uncompiled, flex_attention runs a reference path that materialises every score; on
        # CUDA the compiled kernel skips masked blocks (CPU keeps eager: eval and generation).
        attend = _compiled_flex_attention() if q.is_cuda else flex_attention
        return attend(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class XFormersBackend(AttentionBackend):
    """xformers memory-efficient attention (CUDA only; chosen only after a capability check)."""

    name = "xformers"

    def build_mask(self, layout: AttentionLayout):
        # Additive bias in xformers' (B, H, Sq, Sk) layout; H broadcast via expand.
        allowed = dense_mask(layout)
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        return bias.masked_fill_(~allowed, float("-inf"))

    def attend(self, q, k, v, mask):
        import xformers.ops as xops

        heads = q.shape[1]
        if k.shape[1] != heads:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        bias = mask.to(q.dtype).expand(q.shape[0], heads, q.shape[2], k.shape[2])
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
        )
        return out.transpose(1, 2)


@functools.lru_cache(maxsize=1)
def xformers_capability() -> str | None:
    """None if xformers really works here; otherwise the reason it does not.

    Import success is not enough: xformers imports on CPU-only machines and with kernels built
    for another torch, so a tiny attention is run on the GPU and compared with SDPA.
    """
    if not torch.cuda.is_available():
        return "xformers needs CUDA and no CUDA device is available"
    try:
        import xformers.ops as xops

        q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.float16)
        out = xops.memory_efficient_attention(q, q, q)
        ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q))).transpose(1, 2)
        if not torch.allclose(out, ref, atol=1e-2, rtol=1e-2):
            return "xformers' kernel disagrees with SDPA on a test input"
    except Exception as exc:  # any failure means the backend is unusable; the reason is reported
        return f"xformers is not usable: {type(exc).__name__}: {exc}"
    return None


BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "sdpa": SDPABackend,
    "flex": FlexBackend,
    "xformers": XFormersBackend,
}


def make_backend(name: str) -> AttentionBackend:
    """Backend by name, failing loudly (never falling back) when it cannot run here."""
    if name not in BACKENDS:
        raise MotError(f"unknown attention backend '{name}'; available: {', '.join(BACKENDS)}")
    if name == "xformers":
        reason = xformers_capability()
        if reason is not None:
            raise MotError(f"attention backend 'xformers' unavailable: {reason}")
    return BACKENDS[name]()


class MaskCache:
    """Small LRU of backend masks keyed by (layout key, device)."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.builds = 0

    def get(self, backend: AttentionBackend, layout: AttentionLayout) -> Any:
        device = str(layout.document.device)
        if layout.key is None:
            self.builds += 1
            return backend.build_mask(layout)
        key = (backend.name, layout.key, device)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        self.builds += 1
        mask = backend.build_mask(layout)
        self._entries[key] = mask
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return mask
