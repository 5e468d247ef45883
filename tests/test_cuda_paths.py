"""The CUDA paths, each against a reference: a whole MoT training step (fp32 and bf16
autocast, where bf16 takes the fused ``torch._grouped_mm``, with a modality that has no tokens
in the batch), KV-cache decoding, flex attention compiled on CUDA, and xformers.

Every test taking ``device`` also runs on the CPU (so CI checks the test itself); the CUDA
variants are marked ``gpu`` and run in the GPU check (``make gpu-check``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mot_core.model.attention import AttentionLayout, make_backend
from mot_core.model.routing import build_routing
from mot_core.model.transformer import ModelArgs, MoTTransformer
from test_generation import full_logits
from test_routing_attention import explicit_attention, literal_mask, packed_layout, qkv

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
MODALITIES = 4  # modality 2 never appears in the batch: its towers get exactly zero gradient


def _model(dim: int = 64) -> MoTTransformer:
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=4 * 32, num_modalities=MODALITIES, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2,
                     max_seq_len=128, qk_norm=(False, True, False, True))
    return MoTTransformer(args)


def _batch(seq: int = 96) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    modality = torch.tensor([[0] * 30 + [1] * 40 + [3] * 26, [3] * 10 + [0] * 50 + [1] * 36])[:, :seq]
    tokens = modality * 32 + torch.randint(0, 32, modality.shape, generator=gen)
    document = torch.tensor([[0] * 60 + [1] * 36, [0] * 96])[:, :seq]
    span = torch.full_like(tokens, -1)
    span[0, 30:70] = 0  # an "image" span: bidirectional inside
    positions = torch.arange(seq).expand(2, -1).contiguous()
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -100
    return {"tokens": tokens, "modality": modality, "positions": positions, "targets": targets,
            "layout": AttentionLayout.build(document, span)}


def _train_step(model: MoTTransformer, batch: dict, device: str, bf16: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients (fp32, on the CPU) of one forward/backward on ``device``."""
    model = model.to(device)
    model.zero_grad(set_to_none=True)
    plan = build_routing(batch["modality"], MODALITIES).to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        hidden = model(batch["tokens"].to(device), batch["positions"].to(device), batch["modality"].to(device), plan,
                       batch["layout"].to(device))
        logits = F.linear(hidden, model.head_weight)
        loss = F.cross_entropy(logits.float(), plan.sort(batch["targets"].reshape(-1).to(device)), ignore_index=-100)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
def test_a_training_step_on_the_device_equals_the_cpu_reference(device):
    """fp32 on the device equals fp32 on the CPU; bf16 autocast (the grouped-matmul kernel on
    CUDA) is within bf16 error of it; the absent modality's towers get zero gradient."""
    batch = _batch()
    reference_loss, reference = _train_step(_model(), batch, "cpu", bf16=False)
    loss, grads = _train_step(_model(), batch, device, bf16=False)
    assert loss == pytest.approx(reference_loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], atol=2e-4, rtol=1e-3, msg=name)
    loss, grads = _train_step(_model(), batch, device, bf16=True)
    assert loss == pytest.approx(reference_loss, rel=2e-2)
    for name, grad in grads.items():
        want = reference[name]
        if want.norm() > 1e-3:  # bf16 gradients point the same way as fp32's
            cosine = F.cosine_similarity(grad.flatten(), want.flatten(), dim=0)
            assert cosine > 0.98, (name, float(cosine))
    for name in ("layers.0.wqkv.weight", "layers.1.ffn.w13.weight", "layers.0.ffn.w2.weight"):
        assert torch.all(grads[name][2] == 0), f"{name}: the absent modality's tower got a gradient"
        assert grads[name][0].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_kv_cache_decoding_on_the_device_equals_full_recomputation(device):
    from test_generation import _Grid, _Words, GRID  # noqa: F401  (the fixture's modalities)
    from mot_core.data import Vocabulary
    from mot_core.generate.decoding import _Stream

    torch.manual_seed(0)
    vocab = Vocabulary({"words": _Words(None, None), "grid": _Grid(None, None)})
    args = ModelArgs(vocab_size=vocab.size, num_modalities=2, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     qk_norm=(False, True), max_seq_len=64)
    model = MoTTransformer(args).eval()
    off = vocab.offsets["grid"]
    prompt = [3, 7, 1, 12, off + 10, off + 4, off + 2]
    continuation = [off + 5, off + 9, off + 0, off + 1, off + 11, 5, 8]
    reference = full_logits(model, vocab, prompt + continuation)[len(prompt) - 1:]
    model = model.to(device)
    stream = _Stream(model, vocab, [prompt], capacity=len(continuation))
    cached = [stream.logits[0]]
    for token in continuation:
        cached.append(stream.step(torch.tensor([token], device=device))[0])
    torch.testing.assert_close(torch.stack(cached).float().cpu(), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_attention_compiled_on_cuda_matches_the_literal_mask_with_gradients():
    """The flex backend on CUDA (compiled, block-sparse) against an explicit softmax over the
    literal mask: outputs and gradients of q, k, v, for GQA, packed documents and spans."""
    flex = make_backend("flex")
    layout = packed_layout().to("cuda")
    q, k, v = (t.to("cuda").requires_grad_() for t in qkv(32))
    out = flex.attend(q, k, v, flex.build_mask(layout))
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [out.detach(), q.grad, k.grad, v.grad]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want_out = explicit_attention(q2, k2, v2, literal_mask(layout.document.cpu(), layout.span.cpu()).cuda())
    want_out.backward(grad)
    for a, b in zip(got, [want_out.detach(), q2.grad, k2.grad, v2.grad]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_xformers_backend_matches_sdpa_on_cuda():
    from mot_core.model.attention import xformers_capability

    reason = xformers_capability()
    if reason is not None:
        pytest.skip(reason)
    xformers, sdpa = make_backend("xformers"), make_backend("sdpa")
    layout = packed_layout().to("cuda")
    q, k, v = (t.to("cuda", torch.bfloat16) for t in qkv(32))
    torch.testing.assert_close(xformers.attend(q, k, v, xformers.build_mask(layout)).float(),
                               sdpa.attend(q, k, v, sdpa.build_mask(layout)).float(), atol=2e-2, rtol=2e-2)
