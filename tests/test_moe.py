"""MoE towers, hybrids and tower groups, against literal references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mot_core.cli import main
from mot_core.model.attention import AttentionLayout
from mot_core.model.moe import MoEArgs, MoEFeedForward
from mot_core.model.routing import build_routing
from mot_core.model.transformer import ModelArgs, MoTTransformer


def moe(router="top_k", experts=4, top_k=2, dim=16, hidden=24, **kw) -> MoEFeedForward:
    torch.manual_seed(0)
    layer = MoEFeedForward(dim, hidden, MoEArgs(experts=experts, router=router, top_k=top_k, **kw))
    layer.reset_parameters(0.2, 0.2)
    return layer


def expert(layer: MoEFeedForward, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, layer.w13[e]).split(layer.hidden, dim=-1)
    return F.linear(F.silu(gate) * up, layer.w2[e])


def literal_top_k(layer: MoEFeedForward, x: torch.Tensor, k: int) -> torch.Tensor:
    """Token by token, expert by expert: y_t = sum over t's top-k experts of p_e * E_e(x_t)."""
    probs = F.linear(x, layer.router).softmax(-1)
    out = []
    for t in range(x.shape[0]):
        top = probs[t].topk(k).indices
        out.append(sum(probs[t, e] * expert(layer, int(e), x[t : t + 1])[0] for e in top))
    return torch.stack(out)


def literal_expert_choice(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Expert by expert: each takes its C best tokens by router probability."""
    probs = F.linear(x, layer.router).softmax(-1)
    n, experts = probs.shape
    capacity = math.ceil(layer.args.capacity_factor * n / experts)
    out = torch.zeros_like(x)
    for e in range(experts):
        for t in probs[:, e].topk(capacity).indices.tolist():
            out[t] = out[t] + probs[t, e] * expert(layer, e, x[t : t + 1])[0]
    return out


@pytest.mark.parametrize("router", ["top_k", "expert_choice"])
def test_grouped_experts_equal_a_literal_per_expert_loop_with_gradients(router):
    layer = moe(router)
    layer.train()
    x = torch.randn(37, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    fast = layer(x)
    grads_fast = torch.autograd.grad(fast.pow(2).sum(), [x, layer.w13, layer.w2, layer.router])
    slow = literal_top_k(layer, x, 2) if router == "top_k" else literal_expert_choice(layer, x)
    grads_slow = torch.autograd.grad(slow.pow(2).sum(), [x, layer.w13, layer.w2, layer.router])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
def test_expert_choice_respects_capacity(capacity_factor):
    layer = moe("expert_choice", capacity_factor=capacity_factor)
    layer.train()
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    layer(x)
    per_expert = layer.stats["assignments"][0]
    assert per_expert.tolist() == [math.ceil(capacity_factor * 50 / 4)] * 4
    if capacity_factor < 1:
        assert float(layer.stats["dropped"][0]) >= 50 - 4 * math.ceil(capacity_factor * 50 / 4)


def test_top_k_with_every_expert_and_a_uniform_router_is_the_average_of_the_experts():
    layer = moe("top_k", top_k=4)
    with torch.no_grad():
        layer.router.zero_()
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(3))
    average = sum(expert(layer, e, x) for e in range(4)) / 4
    torch.testing.assert_close(layer(x), average, atol=1e-5, rtol=1e-5)


def test_bias_balancing_moves_load_towards_under_used_experts():
    layer = moe("top_k", top_k=1, balance="bias", bias_rate=0.1)
    with torch.no_grad():
        layer.router[0] += 0.2  # expert 0 wins (almost) everything at first
    layer.train()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4)).abs()
    first = layer.stats if layer(x) is not None else None
    for _ in range(100):
        layer(x)
    assert layer.balance_bias[0] < 0 < layer.balance_bias[1:].max()
    assert float(layer.stats["assignments"][0, 0]) < float(first["assignments"][0, 0])


def model(groups=(), ffn_kinds=(), untie=True, modalities=3, seed=0) -> MoTTransformer:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=60, num_modalities=modalities, dim=16, n_layers=2, n_heads=2, max_seq_len=32,
                     untie_ffn=untie, untie_attention=untie, untie_norm=untie, groups=groups, ffn_kinds=ffn_kinds,
                     qk_norm=(True,) * modalities)
    return MoTTransformer(args)


def batch(modalities=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    modality = torch.randint(0, modalities, (2, 12), generator=g)
    tokens = torch.randint(0, 20, (2, 12), generator=g) + 20 * modality
    positions = torch.arange(12).expand(2, 12)
    plan = build_routing(modality, modalities)
    layout = AttentionLayout.build(torch.zeros(2, 12, dtype=torch.long))
    return tokens, positions, modality, plan, layout


def test_a_group_partition_shares_exactly_the_weights_it_declares():
    """Modalities 0 and 1 share a tower, 2 has its own: the same as full MoT whose towers 0 and
    1 hold identical weights."""
    grouped, full = model(groups=(0, 0, 1)), model()
    assert grouped.layers[0].wqkv.weight.shape[0] == 2 and grouped.layers[0].ffn.w13.weight.shape[0] == 2
    state = full.state_dict()
    for name, value in grouped.state_dict().items():
        if value.shape == state[name].shape:
            state[name] = value
        else:  # (2, ...) towers -> (3, ...): tower of group 0 twice, then group 1
            state[name] = value[[0, 0, 1]]
    full.load_state_dict(state)
    inputs = batch()
    torch.testing.assert_close(grouped(*inputs), full(*inputs), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="groups"):
        model(groups=(0, 1, 0))


def test_hybrid_routes_text_through_its_moe_and_images_through_their_dense_tower():
    kinds = (MoEArgs(experts=4, router="expert_choice"), None)
    hybrid = model(ffn_kinds=kinds, modalities=2)
    tokens, positions, modality, plan, layout = batch(modalities=2)
    hidden = hybrid(tokens, positions, modality, plan, layout)
    text_rows = slice(*plan.bounds(0))
    hidden[text_rows].pow(2).sum().backward(retain_graph=True)
    text_moe, image_ffn = hybrid.layers[-1].ffn.towers
    assert text_moe.w13.grad is not None and text_moe.w13.grad.abs().sum() > 0
    assert image_ffn.w13.weight.grad is None or image_ffn.w13.weight.grad.abs().sum() == 0  # last layer: no path
    stats = hybrid.router_stats(["text", "image"])
    assert "router/text/expert0" in stats and not any(k.startswith("router/image") for k in stats)
    counts = hybrid.parameter_counts()
    assert counts["total"] > model(modalities=2).parameter_counts()["total"]


def test_expert_choice_evaluation_with_top_k_is_causal():
    kinds = (MoEArgs(experts=4, router="expert_choice"),) * 2
    moe4x = model(ffn_kinds=kinds, modalities=2, untie=False).eval()
    tokens, positions, modality, plan, layout = batch(modalities=2)
    first = moe4x(tokens, positions, modality, plan, layout).detach()
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 20 + 20 * modality[:, -1]  # only the last token differs
    second = moe4x(changed, positions, modality, plan, layout).detach()
    order = plan.order.view(-1)
    last = torch.tensor([11, 23])
    keep = torch.ones(24, dtype=torch.bool)
    keep[last] = False
    torch.testing.assert_close(plan.unsort(first)[keep], plan.unsort(second)[keep], atol=1e-6, rtol=1e-6)
    assert order.numel() == 24


BAD = [
    ("mixture.modalities.text.tower.ffn.router=switch", "mixture.modalities.text.tower.ffn.router"),
    ("mixture.modalities.text.tower.ffn.experts=0", "mixture.modalities.text.tower.ffn.experts"),
    ("mixture.modalities.text.tower.ffn.capacity_factor=0", "mixture.modalities.text.tower.ffn.capacity_factor"),
    ("mixture.modalities.text.tower.ffn.top_k=5", "top_k=5 exceeds experts=4"),
    ("mixture.modalities.image.tower.group=speech", "tower.group names 'speech'"),
    ("mixture.modalities.sound.tower.ffn.type=moe", "sound"),
    ("model.ffn.type=mlp", "model.ffn.type"),
]


@pytest.mark.parametrize("override, message", BAD)
def test_bad_tower_configs_are_one_line_errors_naming_the_key(override, message, capsys):
    config = "examples/configs/chameleon_mot_text_moe.yaml"
    assert main(["config", "show", config, "mixture.modalities.text.tower.ffn.type=moe", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
