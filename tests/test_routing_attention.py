"""Routing plans, grouped per-modality matmuls, attention masks and attention backends (CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from mot_core.model.attention import AttentionLayout, MaskCache, dense_mask, make_backend
from mot_core.errors import MotError
from mot_core.model.transformer import ModelArgs, MoTTransformer
from mot_core.model.routing import _GroupedLinearLoop, build_routing, grouped_linear


def literal_mask(document: torch.Tensor, span: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, S, S) bool by a plain double loop over
    allowed(i, j) = doc[i] == doc[j] and (j <= i or (span[i] >= 0 and span[i] == span[j]))."""
    batch, seq = document.shape
    doc = document.tolist()
    spn = span.tolist() if span is not None else [[-1] * seq for _ in range(batch)]
    allowed = torch.zeros(batch, 1, seq, seq, dtype=torch.bool)
    for b in range(batch):
        for i in range(seq):
            for j in range(seq):
                bidirectional = spn[b][i] >= 0 and spn[b][i] == spn[b][j]
                allowed[b, 0, i, j] = doc[b][i] == doc[b][j] and (j <= i or bidirectional)
    return allowed


def packed_layout() -> AttentionLayout:
    """Two rows: packed documents, bidirectional spans, a span at a document start, and a span
    id reused in two documents of one row."""
    document = torch.tensor([
        [0] * 9 + [1] * 12 + [2] * 11,
        [0] * 20 + [1] * 12,
    ])
    span = torch.full((2, 32), -1)
    span[0, 3:8] = 0
    span[0, 9:14] = 1  # starts a document
    span[0, 25:31] = 2
    span[1, 5:12] = 0
    span[1, 20:26] = 0  # same span id as in document 0: must not connect the documents
    return AttentionLayout.build(document, span)


# --------------------------------------------------------------------------------------------
# build_routing
# --------------------------------------------------------------------------------------------


def test_build_routing_is_a_stable_sort_with_right_counts():
    """order is the stable sort by modality; counts, offsets, bounds and sorted ids agree."""
    gen = torch.Generator().manual_seed(0)
    modality = torch.randint(0, 4, (3, 17), generator=gen)
    modality[modality == 2] = 3  # modality 2 absent
    plan = build_routing(modality, 4)
    flat = modality.reshape(-1).tolist()

    expected_order = sorted(range(len(flat)), key=lambda i: flat[i])  # Python's sort is stable
    assert plan.order.tolist() == expected_order
    assert plan.sorted_modality.tolist() == sorted(flat)
    assert plan.counts == tuple(flat.count(m) for m in range(4))
    assert plan.counts[2] == 0 and plan.num_modalities == 4
    assert plan.offsets.dtype == torch.int32
    assert plan.offsets.tolist() == torch.tensor(plan.counts).cumsum(0).tolist()

    for m in range(4):
        start, end = plan.bounds(m)
        assert (start, end) == (sum(plan.counts[:m]), sum(plan.counts[: m + 1]))
        assert torch.all(plan.sorted_modality[start:end] == m)
        original = plan.order[start:end]  # original indices of modality m, in original order
        assert original.tolist() == [i for i, x in enumerate(flat) if x == m]
    assert plan.bounds(2)[0] == plan.bounds(2)[1]


def test_sort_and_unsort_are_inverse_permutations():
    gen = torch.Generator().manual_seed(1)
    modality = torch.randint(0, 3, (2, 21), generator=gen)
    plan = build_routing(modality, 3)
    n = modality.numel()
    x = torch.randn(n, 5, generator=gen)
    assert torch.equal(plan.unsort(plan.sort(x)), x)
    assert torch.equal(plan.sort(plan.unsort(x)), x)
    assert torch.equal(plan.inverse[plan.order], torch.arange(n))
    assert torch.equal(plan.sort(modality.reshape(-1)), plan.sorted_modality)
    # A flat (N,) input gives the same plan; .to() keeps it intact.
    flat_plan = build_routing(modality.reshape(-1), 3).to("cpu")
    assert torch.equal(flat_plan.order, plan.order) and flat_plan.counts == plan.counts


def test_build_routing_rejects_out_of_range_modality():
    with pytest.raises(ValueError, match="modality id 3"):
        build_routing(torch.tensor([[0, 1, 3]]), 3)


def test_build_routing_absent_modality_has_zero_count():
    plan = build_routing(torch.tensor([[0, 0, 2, 2, 0]]), 3)
    assert plan.counts == (3, 0, 2)
    assert plan.bounds(1) == (3, 3)
    assert plan.offsets.tolist() == [3, 3, 5]


# --------------------------------------------------------------------------------------------
# grouped_linear
# --------------------------------------------------------------------------------------------


def loop_linear(x: torch.Tensor, weight: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """Reference: F.linear per contiguous row group, concatenated."""
    outs, start = [], 0
    for g, n in enumerate(counts):
        outs.append(F.linear(x[start : start + n], weight[g]))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("modality_ids", [[0] * 5 + [2] * 7 + [3] * 3, [1] * 6, [0] * 4 + [1] * 9 + [2] * 2 + [3] * 5])
def test_grouped_linear_matches_per_group_loop(modality_ids):
    """Forward and backward (wrt x and weight), including empty groups (zero weight grad)."""
    gen = torch.Generator().manual_seed(2)
    plan = build_routing(torch.tensor(modality_ids), 4)
    x = torch.randn(len(modality_ids), 6, generator=gen, requires_grad=True)
    weight = torch.randn(4, 5, 6, generator=gen, requires_grad=True)
    grad_out = torch.randn(len(modality_ids), 5, generator=gen)

    out = grouped_linear(x, weight, plan)
    gx, gw = torch.autograd.grad(out, (x, weight), grad_out)
    ref = loop_linear(x, weight, plan.counts)
    rx, rw = torch.autograd.grad(ref, (x, weight), grad_out)

    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gx, rx, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-6)
    for g, n in enumerate(plan.counts):
        if n == 0:
            assert torch.all(gw[g] == 0), f"empty group {g} must get an exactly zero gradient"


def test_grouped_linear_gradcheck():
    """Float64 finite-difference check of the custom autograd function."""
    gen = torch.Generator().manual_seed(3)
    counts = (2, 0, 3)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _GroupedLinearLoop.apply(a, w, counts), (x, weight))


def test_grouped_linear_shared_weight_is_plain_linear():
    """G == 1: exactly F.linear with the single slice, with or without a plan."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 6, generator=gen, requires_grad=True)
    weight = torch.randn(1, 5, 6, generator=gen, requires_grad=True)
    out = grouped_linear(x, weight, None)
    assert torch.equal(out, F.linear(x, weight[0]))
    assert torch.equal(grouped_linear(x, weight, build_routing(torch.zeros(7, dtype=torch.long), 3)), out)
    out.sum().backward()
    torch.testing.assert_close(weight.grad[0], torch.ones(5, 7) @ x.detach())


def test_grouped_linear_needs_a_matching_plan():
    weight = torch.randn(3, 4, 2)
    with pytest.raises(ValueError):
        grouped_linear(torch.randn(5, 2), weight, None)
    with pytest.raises(ValueError):
        grouped_linear(torch.randn(5, 2), weight, build_routing(torch.tensor([0, 1, 1, 0, 1]), 2))


# --------------------------------------------------------------------------------------------
# Masks and layouts
# --------------------------------------------------------------------------------------------


def random_layout(seed: int, contiguous_docs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random document ids and span ids (span ids may repeat across documents)."""
    gen = torch.Generator().manual_seed(seed)
    document = torch.randint(0, 3, (2, 19), generator=gen)
    if contiguous_docs:
        document = document.sort(dim=1).values
    span = torch.randint(-1, 3, (2, 19), generator=gen)
    return document, span


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("contiguous_docs", [True, False])
def test_dense_mask_follows_the_rule(seed, contiguous_docs):
    document, span = random_layout(seed, contiguous_docs)
    layout = AttentionLayout.build(document, span)
    assert torch.equal(dense_mask(layout), literal_mask(document, span))
    no_spans = AttentionLayout.build(document)
    assert torch.equal(dense_mask(no_spans), literal_mask(document, None))


def test_dense_mask_span_does_not_cross_documents():
    """A span id reused in the next document grants no attention across the boundary."""
    layout = AttentionLayout.build(torch.tensor([[0, 0, 0, 1, 1, 1]]), torch.tensor([[-1, 0, 0, 0, 0, -1]]))
    mask = dense_mask(layout)[0, 0]
    assert not mask[1, 3] and not mask[3, 1]  # same span id, different documents
    assert mask[1, 2] and mask[3, 4] and mask[4, 3]  # bidirectional within each document
    assert torch.equal(mask, literal_mask(layout.document, layout.span)[0, 0])


def test_plain_causal_detection():
    one_doc = torch.zeros(2, 8, dtype=torch.long)
    assert AttentionLayout.build(one_doc).plain_causal
    assert AttentionLayout.build(torch.stack([one_doc[0], one_doc[1] + 4])).plain_causal  # one doc per row
    no_span = AttentionLayout.build(one_doc, torch.full((2, 8), -1))
    assert no_span.plain_causal and no_span.span is None
    span = torch.full((2, 8), -1)
    span[1, 2:5] = 0
    assert not AttentionLayout.build(one_doc, span).plain_causal
    packed = one_doc.clone()
    packed[0, 4:] = 1
    assert not AttentionLayout.build(packed).plain_causal


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def qkv(seq: int, heads: int = 4, kv_heads: int = 2, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, seq, 8, generator=gen)
    k = torch.randn(2, kv_heads, seq, 8, generator=gen)
    v = torch.randn(2, kv_heads, seq, 8, generator=gen)
    return q, k, v


def explicit_attention(q, k, v, allowed):
    """softmax(QK^T/sqrt(d) + mask) V with GQA by repeat_interleave."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def test_sdpa_backend_matches_explicit_attention():
    """Masked path and is_causal fast path both equal an explicit softmax with GQA."""
    sdpa = make_backend("sdpa")
    layout = packed_layout()
    q, k, v = qkv(32)
    out = sdpa.attend(q, k, v, sdpa.build_mask(layout))
    torch.testing.assert_close(out, explicit_attention(q, k, v, literal_mask(layout.document, layout.span)))

    causal = AttentionLayout.build(torch.zeros(2, 32, dtype=torch.long))
    assert sdpa.build_mask(causal) is None
    out = sdpa.attend(q, k, v, None)
    torch.testing.assert_close(out, explicit_attention(q, k, v, literal_mask(causal.document, None)))


def test_flex_backend_matches_sdpa_forward():
    """flex_attention's block mask gives the same forward as SDPA's dense mask (no grad)."""
    flex, sdpa = make_backend("flex"), make_backend("sdpa")
    layout = packed_layout()
    q, k, v = qkv(32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out_flex = flex.attend(q, k, v, flex.build_mask(layout))
    out_sdpa = sdpa.attend(q, k, v, sdpa.build_mask(layout))
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)


def tiny_model(backend: str) -> MoTTransformer:
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=32, num_modalities=2, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     ffn_hidden=48, max_seq_len=64, attention_backend=backend)
    return MoTTransformer(args)


def model_inputs(layout: AttentionLayout):
    gen = torch.Generator().manual_seed(6)
    modality = (layout.span >= 0).long()  # span tokens are "images"
    tokens = modality * 16 + torch.randint(0, 16, modality.shape, generator=gen)
    positions = torch.zeros_like(tokens)
    for b in range(tokens.shape[0]):
        for i in range(1, tokens.shape[1]):
            same = layout.document[b, i] == layout.document[b, i - 1]
            positions[b, i] = positions[b, i - 1] + 1 if same else 0
    return tokens, positions, modality, build_routing(modality, 2), layout


def test_flex_model_forward_equals_sdpa_and_refuses_cpu_training():
    """A whole MoT forward agrees across backends; training with flex on CPU is a MotError."""
    sdpa_model, flex_model = tiny_model("sdpa"), tiny_model("flex")
    flex_model.load_state_dict(sdpa_model.state_dict())
    inputs = model_inputs(packed_layout())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_flex = flex_model(*inputs)
        out_sdpa = sdpa_model(*inputs)
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)
    with pytest.raises(MotError, match="flex"):
        flex_model(*inputs)


def test_mask_cache_builds_once_per_layout():
    cache = MaskCache()
    sdpa = make_backend("sdpa")
    layout = packed_layout()
    same = AttentionLayout.build(layout.document.clone(), layout.span.clone())  # equal content
    first = cache.get(sdpa, layout)
    assert cache.get(sdpa, same) is first
    assert cache.builds == 1
    assert torch.equal(first, dense_mask(layout))

    other_doc = layout.document.clone()
    other_doc[1, 25:] = 2
    other = AttentionLayout.build(other_doc, layout.span)
    assert torch.equal(cache.get(sdpa, other), dense_mask(other))
    assert cache.builds == 2
    cache.get(sdpa, layout)
    assert cache.builds == 2

    # Masks are per backend: the same layout builds a flex block mask separately.
    flex_mask = cache.get(make_backend("flex"), layout)
    assert cache.builds == 3 and not isinstance(flex_mask, torch.Tensor)

    # The model reuses one mask across layers and across batches with the same layout.
    model = tiny_model("sdpa")
    inputs = model_inputs(layout)
    with torch.no_grad():
        model(*inputs)
        model(*inputs[:-1], AttentionLayout.build(layout.document.clone(), layout.span.clone()))
    assert model.mask_cache.builds == 1


def test_mask_cache_evicts_least_recently_used():
    cache = MaskCache(capacity=2)
    sdpa = make_backend("sdpa")
    layouts = [AttentionLayout.build(torch.tensor([[0] * k + [1] * (6 - k)])) for k in (2, 3, 4)]
    for layout in layouts:
        cache.get(sdpa, layout)
    assert cache.builds == 3
    cache.get(sdpa, layouts[2])  # still cached
    assert cache.builds == 3
    cache.get(sdpa, layouts[0])  # evicted: rebuilt
    assert cache.builds == 4


def test_make_backend_unknown_name_lists_available():
    with pytest.raises(MotError) as info:
        make_backend("nope")
    message = str(info.value)
    assert "nope" in message
    for name in ("sdpa", "flex", "xformers"):
        assert name in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only failure mode")
def test_make_backend_xformers_fails_loudly_without_cuda():
    with pytest.raises(MotError, match="xformers.*CUDA"):
        make_backend("xformers")


# --------------------------------------------------------------------------------------------
# GPU: fused torch._grouped_mm path
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_bf16_matches_loop_on_gpu():
    """bf16 torch._grouped_mm path vs the per-group loop: forward, grad x, grad W (empty group)."""
    from mot_core.model.routing import _grouped_mm_usable

    gen = torch.Generator().manual_seed(7)
    modality = torch.tensor([0] * 37 + [2] * 91 + [3] * 20)  # group 1 empty
    plan = build_routing(modality, 4).to("cuda")
    x = torch.randn(modality.numel(), 64, generator=gen).to("cuda", torch.bfloat16)
    weight = (torch.randn(4, 128, 64, generator=gen) / 8).to("cuda", torch.bfloat16)
    grad_out = torch.randn(modality.numel(), 128, generator=gen).to("cuda", torch.bfloat16)
    assert _grouped_mm_usable(x, weight)

    def run(fn):
        xi = x.clone().requires_grad_()
        wi = weight.clone().requires_grad_()
        out = fn(xi, wi)
        out.backward(grad_out)
        return out.float(), xi.grad.float(), wi.grad.float()

    fused = run(lambda a, w: grouped_linear(a, w, plan))
    loop = run(lambda a, w: _GroupedLinearLoop.apply(a, w, plan.counts))
    for got, want in zip(fused, loop):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert torch.all(fused[2][1] == 0), "an empty group must get an exactly zero weight gradient"
