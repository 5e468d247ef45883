"""KV-cache decoding equals full recomputation; span grammars and sampling filters hold."""

from __future__ import annotations

import pytest
import torch

from mot_core.generate import decoding as generation
from mot_core.model.attention import AttentionLayout
from mot_core.data import Vocabulary
from mot_core.generate.decoding import SamplingParams, _Stream, filter_logits, generate
from mot_core.plugin_api import SpanGrammar
from mot_core.model.transformer import ModelArgs, MoTTransformer
from mot_core.plugin_api import Modality
from mot_core.model.routing import build_routing

GRID = 6  # body tokens per "image" span


class _Words(Modality):
    name = "words"

    def prepare(self, train_payloads):
        pass

    @property
    def vocab_size(self):
        return 20

    def encode(self, payload):
        return torch.tensor(payload)

    @property
    def stop_token(self):
        return 19


class _Grid(Modality):
    """Codes 0..9 plus begin (10) and end (11) markers."""

    name = "grid"

    def prepare(self, train_payloads):
        pass

    @property
    def vocab_size(self):
        return 12

    def encode(self, payload):
        return torch.tensor([10, *payload, 11])

    def span_grammar(self):
        return SpanGrammar(begin=10, end=11, body_lo=0, body_hi=10, length=GRID)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    vocab = Vocabulary({"words": _Words(None, None), "grid": _Grid(None, None)})
    args = ModelArgs(vocab_size=vocab.size, num_modalities=2, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     qk_norm=(False, True), max_seq_len=64)
    model = MoTTransformer(args).eval()
    return model, vocab


def full_logits(model, vocab, ids: list[int]) -> torch.Tensor:
    """Logits at every position by one uncached forward: (L, V)."""
    tokens = torch.tensor([ids])
    modality = vocab.token_modality()[tokens]
    plan = build_routing(modality, 2)
    layout = AttentionLayout.build(torch.zeros_like(tokens))
    positions = torch.arange(len(ids))[None]
    hidden = plan.unsort(model(tokens, positions, modality, plan, layout))
    return hidden @ model.head_weight.T


@torch.no_grad()
def test_kv_cache_equals_full_recomputation_across_a_modality_boundary(setup):
    model, vocab = setup
    grid_off = vocab.offsets["grid"]
    # text prompt, then begin-of-image and two codes: the prompt crosses text -> image.
    prompt = [3, 7, 1, 12, grid_off + 10, grid_off + 4, grid_off + 2]
    continuation = [grid_off + 5, grid_off + 9, grid_off + 0, grid_off + 1, grid_off + 11, 5, 8]
    stream = _Stream(model, vocab, [prompt], capacity=len(continuation))
    cached = [stream.logits[0]]
    for token in continuation:
        cached.append(stream.step(torch.tensor([token]))[0])
    reference = full_logits(model, vocab, prompt + continuation)[len(prompt) - 1 :]
    torch.testing.assert_close(torch.stack(cached), reference, atol=1e-5, rtol=0)


@torch.no_grad()
def test_left_padded_batch_matches_single_prompts(setup):
    model, vocab = setup
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    batched = _Stream(model, vocab, prompts, capacity=2)
    step = batched.step(torch.tensor([8, 9]))
    for row, prompt in enumerate(prompts):
        single = _Stream(model, vocab, [prompt], capacity=2)
        torch.testing.assert_close(batched.logits[row], step[row])  # sanity: same tensor
        torch.testing.assert_close(single.step(torch.tensor([[8, 9][row]]))[0], step[row], atol=1e-5, rtol=0)


def test_image_span_is_emitted_whole(setup):
    model, vocab = setup
    off = vocab.offsets["grid"]
    out = generate(model, vocab, [[1, 2, off + 10]] * 3, max_new_tokens=GRID + 1,
                   params=SamplingParams(temperature=1.5), seed=1)
    for row in out:
        assert len(row) == GRID + 1
        assert all(off <= t < off + 10 for t in row[:GRID]), row
        assert row[GRID] == off + 11


def test_outside_spans_no_body_or_end_tokens_and_stop(setup):
    model, vocab = setup
    off = vocab.offsets["grid"]
    out = generate(model, vocab, [[1, 2]] * 4, max_new_tokens=30, params=SamplingParams(temperature=2.0),
                   stop_ids={19}, seed=3)
    for row in out:
        state_inside = False
        count = 0
        for token in row:
            if state_inside:
                count += 1
                if count <= GRID:
                    assert off <= token < off + 10
                else:
                    assert token == off + 11
                    state_inside, count = False, 0
            else:
                assert not (off <= token < off + 10) and token != off + 11 and token != 19
                state_inside = token == off + 10


def test_allowed_modalities_restricts_free_text(setup):
    model, vocab = setup
    out = generate(model, vocab, [[1]] * 4, max_new_tokens=12, params=SamplingParams(temperature=3.0),
                   allowed_modalities=["words"], seed=0)
    assert all(0 <= t < 20 for row in out for t in row)


def test_classifier_free_guidance_mixes_logits(setup, monkeypatch):
    model, vocab = setup
    off = vocab.offsets["grid"]
    prompts, uncond = [[4, 5, 6, off + 10]], [[off + 10]]
    seen = []
    real_sample = generation.sample
    monkeypatch.setattr(generation, "sample", lambda logits, p, g: seen.append(logits) or real_sample(logits, p, g))
    scale = 3.0
    generate(model, vocab, prompts, 1, SamplingParams(temperature=0, cfg_scale=scale), unconditional_prompts=uncond)
    c = _Stream(model, vocab, prompts, 1).logits
    u = _Stream(model, vocab, uncond, 1).logits
    expected = u + scale * (c - u)
    body = slice(off, off + 10)  # only image codes are allowed right after begin-of-image
    torch.testing.assert_close(seen[0][:, body], expected[:, body], atol=1e-5, rtol=0)
    assert torch.isinf(seen[0][:, :off]).all()
    seen.clear()
    generate(model, vocab, prompts, 1, SamplingParams(temperature=0, cfg_scale=1.0), unconditional_prompts=uncond)
    torch.testing.assert_close(seen[0][:, body], c[:, body])  # scale 1 is no guidance


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.4)).tolist() == [[True, False, False, False]]
