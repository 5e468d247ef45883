"""MoTTransformer against a literal, slow reference of the paper's Algorithm 1 (arXiv 2411.04996).

The reference below is written to be obviously right rather than fast: for every modality m it
takes a boolean mask ``modality == m``, applies that modality's weights (read from the model's
stacked tower parameters) to the masked tokens and writes the result into full-size tensors; the
attention is one explicit softmax over the whole interleaved sequence in original token order.
Everything runs on CPU in fp32 with tiny models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from mot_core.model.attention import AttentionLayout
from mot_core.errors import MotError
from mot_core.model.transformer import ModelArgs, MoTTransformer, warm_start_from_dense
from mot_core.model.routing import RoutingPlan, build_routing

VOCAB_PER_MODALITY = 16  # modality m owns global token ids [16 m, 16 (m + 1))


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, S)
    positions: torch.Tensor  # (B, S), restart at every document
    modality: torch.Tensor  # (B, S)
    document: torch.Tensor  # (B, S)
    span: torch.Tensor | None  # (B, S), -1 = causal
    plan: RoutingPlan
    layout: AttentionLayout


def make_batch(
    rows: list[list[tuple]], num_modalities: int, seed: int = 0, positions: torch.Tensor | None = None
) -> Batch:
    """Rows of runs ``(modality, length[, document[, span]])``; every row has the same length.

    Positions restart at 0 in every document unless given explicitly.
    """
    gen = torch.Generator().manual_seed(seed)
    modality, document, span = [], [], []
    for row in rows:
        mod_row, doc_row, span_row = [], [], []
        for run in row:
            m, length, doc, sp = tuple(run) + (0, -1)[len(run) - 2 :]
            mod_row += [m] * length
            doc_row += [doc] * length
            span_row += [sp] * length
        modality.append(mod_row)
        document.append(doc_row)
        span.append(span_row)
    modality_t = torch.tensor(modality)
    document_t = torch.tensor(document)
    span_t = torch.tensor(span)
    if positions is None:
        positions = torch.zeros_like(document_t)
        for b in range(document_t.shape[0]):
            for i in range(1, document_t.shape[1]):
                same = document_t[b, i] == document_t[b, i - 1]
                positions[b, i] = positions[b, i - 1] + 1 if same else 0
    tokens = modality_t * VOCAB_PER_MODALITY + torch.randint(
        0, VOCAB_PER_MODALITY, modality_t.shape, generator=gen
    )
    span_or_none = span_t if bool((span_t >= 0).any()) else None
    return Batch(
        tokens=tokens,
        positions=positions,
        modality=modality_t,
        document=document_t,
        span=span_or_none,
        plan=build_routing(modality_t, num_modalities),
        layout=AttentionLayout.build(document_t, span_or_none),
    )


# text = 0, image = 1, speech = 2
ROWS_TWO_INTERLEAVED = [
    [(0, 4), (1, 6), (0, 3), (1, 5), (0, 6)],
    [(1, 8), (0, 16)],
]
ROWS_THREE_ARBITRARY = [
    [(0, 4), (1, 5), (0, 3), (2, 6), (1, 6)],
    [(2, 5), (0, 7), (1, 4), (0, 2), (2, 6)],
]
ROWS_THREE_ABSENT_MIDDLE = [  # modality 1 never occurs
    [(0, 5), (2, 7), (0, 4), (2, 8)],
    [(2, 9), (0, 15)],
]
ROWS_PACKED_WITH_SPANS = [  # (modality, length, document, span)
    [(0, 5, 0), (1, 6, 0, 0), (0, 2, 0), (1, 4, 1, 1), (0, 7, 1)],
    [(1, 5, 0, 3), (0, 6, 0), (1, 7, 0, 4), (0, 6, 0)],
]
ROWS_THREE_PACKED = [  # 3 modalities, packed documents and bidirectional image/speech spans
    [(0, 3, 0), (1, 5, 0, 0), (0, 2, 0), (2, 4, 1, 1), (0, 3, 1), (1, 4, 2, 2), (0, 3, 2)],
    [(2, 6, 0, 5), (0, 4, 0), (1, 6, 0, 6), (0, 4, 0), (2, 4, 0)],
]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def make_args(num_modalities: int, **overrides) -> ModelArgs:
    """A tiny model: dim 32, 2 layers, 4 heads of 8."""
    base = dict(
        vocab_size=VOCAB_PER_MODALITY * num_modalities,
        num_modalities=num_modalities,
        dim=32,
        n_layers=2,
        n_heads=4,
        ffn_hidden=48,
        max_seq_len=64,
    )
    base.update(overrides)
    return ModelArgs(**base)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every tower distinct, O(1)-scale weights so that routing mistakes become visible.

    The default init makes all norm gains 1 (identical towers) and the attention almost uniform.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:  # RMSNorm and QK-norm gains
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


def build_model(args: ModelArgs, seed: int = 0) -> MoTTransformer:
    torch.manual_seed(seed)
    model = MoTTransformer(args)
    randomize_(model, seed)
    return model


# --------------------------------------------------------------------------------------------
# Literal reference (paper Algorithm 1)
# --------------------------------------------------------------------------------------------


def literal_mask(document: torch.Tensor, span: torch.Tensor | None) -> torch.Tensor:
    """(B, S, S) bool, by a plain double loop over the rule
    allowed(i, j) = doc[i] == doc[j] and (j <= i or (span[i] >= 0 and span[i] == span[j]))."""
    batch, seq = document.shape
    doc = document.tolist()
    spn = span.tolist() if span is not None else [[-1] * seq for _ in range(batch)]
    allowed = torch.zeros(batch, seq, seq, dtype=torch.bool)
    for b in range(batch):
        for i in range(seq):
            for j in range(seq):
                bidirectional = spn[b][i] >= 0 and spn[b][i] == spn[b][j]
                allowed[b, i, j] = doc[b][i] == doc[b][j] and (j <= i or bidirectional)
    return allowed


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """GPT-NeoX RoPE. x: (B, S, heads, hd); the two halves of hd are rotated as pairs."""
    hd = x.shape[-1]
    half = hd // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = positions.double()[..., None] * inv_freq  # (B, S, half)
    cos = angles.cos().to(x.dtype)[:, :, None, :]
    sin = angles.sin().to(x.dtype)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def reference_forward(model: MoTTransformer, batch: Batch, dense: bool = False) -> torch.Tensor:
    """Algorithm 1, literally. Returns (B*S, dim) final hidden states in ORIGINAL token order.

    The component switches are read from ``model.args`` (not from parameter shapes): a shared
    component must have exactly one tower and is applied as tower 0 to every modality; an untied
    one has one tower per modality. ``dense=True`` is a plain dense transformer: every token of
    every modality goes through tower 0.
    """
    args = model.args
    num_mod = args.num_modalities
    heads, kv_heads = args.n_heads, args.n_kv_heads or args.n_heads
    hd = args.dim // heads
    hidden = model.layers[0].ffn.hidden
    eps = args.norm_eps
    qk_flags = args.qk_norm or (False,) * num_mod
    untied = {"norm": args.untie_norm, "attention": args.untie_attention, "ffn": args.untie_ffn}

    def tower(weight: torch.Tensor, component: str, m: int) -> torch.Tensor:
        """Modality m's slice of a stacked (G, ...) parameter."""
        if dense:
            assert weight.shape[0] == 1, "a dense model has exactly one tower"
            return weight[0]
        towers = num_mod if untied[component] and num_mod > 1 else 1
        assert weight.shape[0] == towers, f"{component}: {weight.shape[0]} towers, expected {towers}"
        return weight[m] if towers > 1 else weight[0]

    modality = batch.modality
    groups = [torch.ones_like(modality, dtype=torch.bool)] if dense else [modality == m for m in range(num_mod)]

    def per_modality(x: torch.Tensor, fn, out_dim: int) -> torch.Tensor:
        """out[mask_m] = fn(x[mask_m], m) for every modality m, into a full-size tensor."""
        out = x.new_zeros(*x.shape[:-1], out_dim)
        for m, sel in enumerate(groups):
            if bool(sel.any()):
                out[sel] = fn(x[sel], m)
        return out

    batch_size, seq = batch.tokens.shape
    allowed = literal_mask(batch.document, batch.span)  # (B, S, S)
    h = model.embed.weight[batch.tokens]  # (B, S, dim), shared embedding
    for layer in model.layers:
        post = args.norm_placement == "post"
        attn_norm = lambda t, m, layer=layer: rms_norm(t, tower(layer.attn_norm.weight, "norm", m), eps)  # noqa: E731
        ffn_norm = lambda t, m, layer=layer: rms_norm(t, tower(layer.ffn_norm.weight, "norm", m), eps)  # noqa: E731
        # pre: x = norm_attn[m](h); post: x = h (no norm on the sublayer input). q, k, v = W_qkv[m] x
        x = h if post else per_modality(h, attn_norm, args.dim)
        qkv_dim = (heads + 2 * kv_heads) * hd
        qkv = per_modality(x, lambda t, m: t @ tower(layer.wqkv.weight, "attention", m).T, qkv_dim)
        q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
        q = q.reshape(batch_size, seq, heads, hd)
        k = k.reshape(batch_size, seq, kv_heads, hd)
        v = v.reshape(batch_size, seq, kv_heads, hd)
        if any(qk_flags):  # QK-norm, switched on per modality (by the token's real modality)
            for name in ("q", "k"):
                t = q if name == "q" else k
                gain = getattr(layer, f"{name}_norm")
                out = t.new_zeros(t.shape)
                for m in range(num_mod):
                    sel = modality == m
                    if not bool(sel.any()):
                        continue
                    g = tower(gain, "attention", 0 if dense else m)
                    out[sel] = rms_norm(t[sel], g, eps) if qk_flags[m] else t[sel]
                if name == "q":
                    q = out
                else:
                    k = out
        q = rotary(q, batch.positions, args.rope_theta)
        k = rotary(k, batch.positions, args.rope_theta)
        # ONE global attention over the interleaved sequence, original order, explicit softmax.
        group = heads // kv_heads
        k = k.repeat_interleave(group, dim=2)  # kv head g serves query heads g*group..
        v = v.repeat_interleave(group, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch_size, seq, heads * hd)
        # pre: h = h + W_o[m] a;  post: h = h + norm_attn[m](W_o[m] a)
        out = per_modality(attn, lambda t, m: t @ tower(layer.wo.weight, "attention", m).T, args.dim)
        h = h + (per_modality(out, attn_norm, args.dim) if post else out)
        # pre: h = h + FFN[m](norm_ffn[m](h));  post: h = h + norm_ffn[m](FFN[m](h))
        x = h if post else per_modality(h, ffn_norm, args.dim)

        def ffn(t: torch.Tensor, m: int, layer=layer) -> torch.Tensor:
            w13 = tower(layer.ffn.w13.weight, "ffn", m)
            w2 = tower(layer.ffn.w2.weight, "ffn", m)
            gate, up = t @ w13[:hidden].T, t @ w13[hidden:].T
            return (gate * torch.sigmoid(gate) * up) @ w2.T

        out = per_modality(x, ffn, args.dim)
        h = h + (per_modality(out, ffn_norm, args.dim) if post else out)
    out = per_modality(h, lambda t, m: rms_norm(t, tower(model.final_norm.weight, "norm", m), eps), args.dim)
    return out.reshape(batch_size * seq, args.dim)


def fast_forward(model: MoTTransformer, batch: Batch) -> torch.Tensor:
    """The model under test, brought back to original token order."""
    out = model(batch.tokens, batch.positions, batch.modality, batch.plan, batch.layout)
    return batch.plan.unsort(out)


def output_and_grads(model: MoTTransformer, out: torch.Tensor, weights: torch.Tensor):
    """loss = sum(out * weights); gradients of every parameter (None where unused)."""
    loss = (out * weights).sum()
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return out.detach(), dict(zip([n for n, _ in model.named_parameters()], grads))


def assert_matches_reference(model: MoTTransformer, batch: Batch, atol: float = 1e-5, dense: bool = False):
    """Outputs and all parameter gradients of model vs reference. Returns the gradients."""
    gen = torch.Generator().manual_seed(123)
    shape = (batch.tokens.numel(), model.args.dim)
    # Scaled so that gradients are O(1): fp32 rounding then stays well below atol.
    weights = torch.randn(shape, generator=gen) / math.sqrt(shape[0] * shape[1])
    weights = weights.to(model.embed.weight.dtype)
    out_fast, g_fast = output_and_grads(model, fast_forward(model, batch), weights)
    out_ref, g_ref = output_and_grads(model, reference_forward(model, batch, dense=dense), weights)
    torch.testing.assert_close(out_fast, out_ref, atol=atol, rtol=0)
    for name, gf in g_fast.items():
        gr = g_ref[name]
        if name.startswith("lm_head"):  # the head is applied outside forward
            assert gf is None and gr is None
            continue
        assert gf is not None, f"no gradient for {name}"
        assert gr is not None, f"reference gives no gradient for {name}"
        torch.testing.assert_close(gf, gr, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    return g_fast


# --------------------------------------------------------------------------------------------
# 1. MoT == Algorithm 1
# --------------------------------------------------------------------------------------------

# Positions with gaps and repeats (e.g. an image whose tokens share 2D-derived positions): RoPE is
# relative, so only positions that are not "index + constant" reveal whether they are used at all.
POSITIONS_WITH_GAPS = torch.tensor([
    [0, 1, 2, 3, 9, 9, 9, 10, 10, 10, 11, 11, 12, 13, 14, 20, 21, 22, 22, 23, 30, 40, 41, 42],
    [5, 5, 5, 5, 6, 6, 6, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 30, 31, 63],
])

REFERENCE_CASES = {
    "two_modalities_interleaved": (2, ROWS_TWO_INTERLEAVED, {}),
    "three_modalities_arbitrary_runs": (3, ROWS_THREE_ARBITRARY, {}),
    "three_modalities_one_absent": (3, ROWS_THREE_ABSENT_MIDDLE, {"qk_norm": (True, True, True)}),
    "packed_documents_bidirectional_spans": (2, ROWS_PACKED_WITH_SPANS, {}),
    "gqa": (3, ROWS_THREE_PACKED, {"n_heads": 4, "n_kv_heads": 2}),
    "gqa_single_kv_head": (2, ROWS_TWO_INTERLEAVED, {"n_heads": 4, "n_kv_heads": 1}),
    "qk_norm_some_modalities": (3, ROWS_THREE_PACKED, {"qk_norm": (True, False, True)}),
    "explicit_positions_with_gaps": (2, ROWS_TWO_INTERLEAVED, {}),
}


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_untied_model_matches_algorithm_1(case, placement):
    """Outputs and every parameter gradient equal the literal reference (fp32, atol 1e-5),
    with pre-norm and with the paper's post-norm placement."""
    num_mod, rows, overrides = REFERENCE_CASES[case]
    model = build_model(make_args(num_mod, norm_placement=placement, **overrides), seed=1)
    positions = POSITIONS_WITH_GAPS if case == "explicit_positions_with_gaps" else None
    batch = make_batch(rows, num_mod, seed=2, positions=positions)
    assert model.args.routed
    grads = assert_matches_reference(model, batch)

    if case == "three_modalities_one_absent":
        absent = 1
        assert batch.plan.counts[absent] == 0
        for name, p in model.named_parameters():
            if p.dim() >= 1 and p.shape[0] == num_mod and not name.startswith(("embed", "lm_head")):
                assert grads[name] is not None
                assert torch.all(grads[name][absent] == 0), f"{name}: absent tower got a gradient"
                assert grads[name][0].abs().sum() > 0 and grads[name][2].abs().sum() > 0
        lo, hi = absent * VOCAB_PER_MODALITY, (absent + 1) * VOCAB_PER_MODALITY
        assert torch.all(grads["embed.weight"][lo:hi] == 0)

    if case == "qk_norm_some_modalities":
        for i in range(model.args.n_layers):
            for gain in ("q_norm", "k_norm"):
                g = grads[f"layers.{i}.{gain}"]
                assert torch.all(g[1] == 0), "QK-norm gain of a modality with QK-norm off must be unused"
                assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0


def test_post_norm_is_a_different_function_from_pre_norm():
    """Same weights, the two placements: outputs differ, so each reference test checks its own
    placement (a model ignoring the switch would fail one of them)."""
    batch = make_batch(ROWS_THREE_PACKED, 3, seed=2)
    pre = build_model(make_args(3, norm_placement="pre"), seed=1)
    post = build_model(make_args(3, norm_placement="post"), seed=1)
    post.load_state_dict(pre.state_dict())
    assert (fast_forward(pre, batch) - fast_forward(post, batch)).abs().max() > 1e-2


def test_post_norm_block_applies_norms_to_sublayer_outputs():
    """Post placement: the residual update of each sublayer is normalised per token, so
    ``h_out - h_in`` of the attention half has RMS equal to the norm gain (here 1)."""
    from mot_core.model.block import BlockArgs, ForwardContext, MoTBlock
    from mot_core.model.rope import RotaryEmbedding

    args = BlockArgs(dim=16, n_heads=2, n_kv_heads=2, ffn_hidden=32, norm_eps=1e-6, ffn_towers=1,
                     attention_towers=1, norm_towers=1, qk_norm=(False,), norm_placement="post")
    block = MoTBlock(args)
    block.reset_parameters(0.5, 0.5)
    seq = 5
    h = torch.randn(seq, 16)
    cos, sin = RotaryEmbedding(8, seq, 10000.0).tables(torch.arange(seq)[None])
    layout = AttentionLayout.build(torch.zeros(1, seq, dtype=torch.long))
    from mot_core.model.attention import SDPABackend

    ctx = ForwardContext(None, torch.zeros(1, seq, dtype=torch.long), 1, seq, cos, sin, SDPABackend(), None)
    block.ffn_norm.weight.data.zero_()  # isolate the attention half: the FFN update becomes 0
    delta = block(h, ctx) - h
    torch.testing.assert_close(delta.pow(2).mean(-1).sqrt(), torch.ones(seq), atol=1e-4, rtol=0)
    assert layout.plain_causal


# --------------------------------------------------------------------------------------------
# 2. Untying switches (paper's ablations)
# --------------------------------------------------------------------------------------------

ABLATIONS = {
    "ffn_only": dict(untie_ffn=True, untie_attention=False, untie_norm=False),
    "ffn_and_attention": dict(untie_ffn=True, untie_attention=True, untie_norm=False),
    "ffn_attention_norm": dict(untie_ffn=True, untie_attention=True, untie_norm=True),
}


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_ablation_equals_reference_with_shared_components(ablation, placement):
    """Each partial untying equals the reference with the remaining components shared."""
    flags = ABLATIONS[ablation]
    args = make_args(3, n_kv_heads=2, qk_norm=(True, False, True), norm_placement=placement, **flags)
    model = build_model(args, seed=3)
    layer = model.layers[0]
    expect = {True: 3, False: 1}
    assert layer.ffn.w13.weight.shape[0] == expect[flags["untie_ffn"]]
    assert layer.wqkv.weight.shape[0] == layer.q_norm.shape[0] == expect[flags["untie_attention"]]
    assert layer.attn_norm.weight.shape[0] == model.final_norm.weight.shape[0] == expect[flags["untie_norm"]]
    assert_matches_reference(model, make_batch(ROWS_THREE_PACKED, 3, seed=4))


# --------------------------------------------------------------------------------------------
# 3. Nothing untied == dense transformer
# --------------------------------------------------------------------------------------------


def dense_parameter_count(args: ModelArgs, hidden: int) -> int:
    """Parameters of a plain dense Llama-style transformer with these sizes."""
    kv_heads = args.n_kv_heads or args.n_heads
    hd = args.dim // args.n_heads
    per_layer = (
        2 * args.dim  # attention and FFN RMSNorm gains
        + (args.n_heads + 2 * kv_heads) * hd * args.dim  # Q, K, V
        + args.dim * args.dim  # O
        + 3 * hidden * args.dim  # SwiGLU
        + (2 * hd if any(args.qk_norm) else 0)  # QK-norm gains
    )
    head = 0 if args.tie_embeddings else args.vocab_size * args.dim
    return args.vocab_size * args.dim + head + args.n_layers * per_layer + args.dim


def test_nothing_untied_is_the_dense_transformer():
    """untie_* all False: same function as a literal dense transformer and its exact size."""
    shared = dict(untie_ffn=False, untie_attention=False, untie_norm=False)
    args = make_args(3, n_kv_heads=2, qk_norm=(True, False, True), **shared)
    model = build_model(args, seed=5)
    assert not args.routed
    batch = make_batch(ROWS_THREE_PACKED, 3, seed=6)

    # fp32: outputs and all gradients within 1e-5 (two different kernels round differently).
    assert_matches_reference(model, batch, dense=True)
    # The 1e-6 bound is checked in float64, where only the model's fp32 RoPE arithmetic remains
    # as rounding noise (fp32 differences between SDPA and an explicit softmax are a few 1e-6).
    model64 = build_model(args, seed=5).double()
    with torch.no_grad():
        diff32 = (fast_forward(model, batch) - reference_forward(model, batch, dense=True)).abs().max().item()
        diff64 = (fast_forward(model64, batch) - reference_forward(model64, batch, dense=True)).abs().max().item()
    print(f"max |MoT(untie nothing) - dense reference|: fp32 {diff32:.3e}, fp64 {diff64:.3e}")
    assert diff32 <= 1e-5
    assert diff64 <= 1e-6

    hidden = model.layers[0].ffn.hidden
    dense_count = dense_parameter_count(args, hidden)
    assert sum(p.numel() for p in model.parameters()) == dense_count
    assert model.parameter_counts() == {"total": dense_count, "active_per_token": dense_count}

    # A fully untied MoT with the same sizes activates exactly the dense model's parameters.
    untied = MoTTransformer(make_args(3, n_kv_heads=2, qk_norm=(True, False, True)))
    assert untied.parameter_counts()["active_per_token"] == dense_count
    assert untied.parameter_counts()["total"] > dense_count


# --------------------------------------------------------------------------------------------
# 4. Gradient isolation
# --------------------------------------------------------------------------------------------


def grads_of_modality_loss(model: MoTTransformer, batch: Batch, m: int) -> dict[str, torch.Tensor]:
    """Gradients of a loss on modality m's output positions only."""
    out = fast_forward(model, batch)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    sel = (batch.modality.reshape(-1) == m).to(out.dtype)[:, None]
    return output_and_grads(model, out, weights * sel)[1]


@pytest.mark.parametrize("m", [0, 1, 2])
def test_last_layer_towers_of_other_modalities_get_no_gradient(m):
    """Past the last attention, a modality's output depends only on its own towers."""
    model = build_model(make_args(3), seed=8)
    batch = make_batch(ROWS_THREE_ARBITRARY, 3, seed=9)
    grads = grads_of_modality_loss(model, batch, m)
    last = f"layers.{model.args.n_layers - 1}"
    isolated = [f"{last}.wo.weight", f"{last}.ffn.w13.weight", f"{last}.ffn.w2.weight",
                f"{last}.ffn_norm.weight", "final_norm.weight"]
    for name in isolated:
        g = grads[name]
        assert g is not None
        for other in range(3):
            if other == m:
                assert g[m].abs().sum() > 0, f"{name}[{m}] should be trained by modality {m}"
            else:
                assert torch.all(g[other] == 0), f"{name}[{other}] got gradient from modality {m}"
    # Global attention does mix modalities: other modalities' K/V projections are trained too.
    for other in range(3):
        assert grads[f"{last}.wqkv.weight"][other].abs().sum() > 0


ROWS_SINGLE_MODALITY_DOCUMENTS = [  # every document holds one modality
    [(0, 8, 0), (1, 8, 1), (2, 8, 2)],
    [(2, 6, 0), (0, 10, 1), (1, 8, 2)],
]


@pytest.mark.parametrize("m", [0, 1, 2])
def test_single_modality_documents_isolate_all_towers(m):
    """With no cross-modality attention, modality m trains only its own towers, in every layer."""
    model = build_model(make_args(3, qk_norm=(True, True, True)), seed=10)
    batch = make_batch(ROWS_SINGLE_MODALITY_DOCUMENTS, 3, seed=11)
    grads = grads_of_modality_loss(model, batch, m)
    stacked = [n for n, p in model.named_parameters() if not n.startswith(("embed", "lm_head"))]
    assert len(stacked) == model.args.n_layers * 8 + 1
    for name in stacked:
        g = grads[name]
        assert g is not None and g.shape[0] == 3
        assert g[m].abs().sum() > 0, f"{name}[{m}]"
        for other in set(range(3)) - {m}:
            assert torch.all(g[other] == 0), f"{name}[{other}] got gradient from modality {m}"
    embed = grads["embed.weight"]
    own_ids = batch.tokens[batch.modality == m].unique()
    assert torch.all(embed[own_ids].abs().sum(-1) > 0), "every token of modality m gets a gradient"
    others = batch.tokens[batch.modality != m].unique()
    assert torch.all(embed[others] == 0)


# --------------------------------------------------------------------------------------------
# 5. Warm start from a dense checkpoint
# --------------------------------------------------------------------------------------------


def test_warm_start_from_dense_reproduces_the_dense_model():
    """Every tower starts as the dense layer, so the MoT computes the dense function exactly."""
    common = dict(n_kv_heads=2, qk_norm=(True, False, True))
    dense = build_model(make_args(3, untie_ffn=False, untie_attention=False, untie_norm=False, **common), seed=12)
    mot = build_model(make_args(3, **common), seed=13)
    copied = warm_start_from_dense(mot, dense.state_dict())
    assert set(copied) == set(mot.state_dict())

    dense_state = dense.state_dict()
    for name, p in mot.state_dict().items():
        src = dense_state[name]
        if src.shape != p.shape:  # broadcast tower: every slice is the dense one
            assert src.shape[0] == 1 and p.shape[0] == 3
            for t in range(3):
                assert torch.equal(p[t], src[0]), name
        else:
            assert torch.equal(p, src), name

    batch = make_batch(ROWS_THREE_PACKED, 3, seed=14)
    with torch.no_grad():
        diff = (fast_forward(mot, batch) - fast_forward(dense, batch)).abs().max().item()
    assert diff <= 1e-6, diff


def test_warm_start_rejects_mismatched_checkpoints():
    """Wrong sizes, tower counts or parameter sets raise a user-facing MotError."""
    mot = MoTTransformer(make_args(3))

    wider = MoTTransformer(make_args(3, dim=64, untie_ffn=False, untie_attention=False, untie_norm=False))
    with pytest.raises(MotError, match="shape"):
        warm_start_from_dense(mot, wider.state_dict())

    two_towers = MoTTransformer(make_args(2, vocab_size=mot.args.vocab_size))  # a 2-modality MoT
    with pytest.raises(MotError, match="shape"):
        warm_start_from_dense(mot, two_towers.state_dict())

    with_qk_norm = MoTTransformer(make_args(3, untie_attention=False, qk_norm=(True, True, True)))
    with pytest.raises(MotError, match="does not match"):
        warm_start_from_dense(mot, with_qk_norm.state_dict())


def test_warm_start_key_mismatch_leaves_model_untouched():
    """Missing/unexpected names are detected before anything is copied."""
    mot = MoTTransformer(make_args(2))
    before = {n: p.clone() for n, p in mot.state_dict().items()}
    dense = MoTTransformer(make_args(2, untie_ffn=False, untie_attention=False, untie_norm=False))
    state = dense.state_dict()
    del state["final_norm.weight"]
    with pytest.raises(MotError, match="final_norm"):
        warm_start_from_dense(mot, state)
    for name, p in mot.state_dict().items():
        assert torch.equal(p, before[name]), name
