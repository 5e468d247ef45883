"""The Transfusion setting's maths on tiny modules: image layout (markers read by the text
tower, bidirectional patches, whole images in packing), masks of both backends, the noise
process against its sampler, the noise cap, and KV-cache generation through an image."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from mot_core.data import IGNORE, PackedStream, Vocabulary
from mot_core.errors import MotError
from mot_core.generate.decoding import _Stream
from mot_core.model.attention import AttentionLayout, dense_mask, make_backend
from mot_core.model.routing import build_routing
from mot_core.model.transformer import ContinuousInputs, ModalityModules, ModelArgs, MoTTransformer
from mot_core.plugin_api import RawDocument, RawSegment
from plugins.image_diffusion.loss import DiffusionLoss, DiffusionLossOptions
from plugins.image_diffusion.modality import ImageDiffusion, ImageDiffusionOptions
from plugins.image_diffusion.process import DiffusionOptions, DiffusionProcess
from plugins.text.modality import Text, TextOptions

CAPTIONS = ["handwritten digit seven", "a red apple", "number sign", "handwritten digit zero", "smiling face"]
TEXT = " ".join(CAPTIONS * 4) + " the quick brown fox jumps over the lazy dog " * 20


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A text modality and an image_diffusion modality on a tiny published-format VAE (8x8
    images -> 4x4x4 latents -> 2x2 patches of 16 values, 4 per image)."""
    base = tmp_path_factory.mktemp("transfusion")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=8)
    vae.save_pretrained(base / "vae")
    text = Text(TextOptions(vocab_size=300, min_frequency=1), base / "state" / "text")
    text.prepare([TEXT])
    image = ImageDiffusion(ImageDiffusionOptions(pretrained_vae=str(base / "vae"), tokenizer_dir=str(base / "tok"),
                                                 image_size=8, patch_size=2), base / "state" / "image_diffusion")
    image.prepare([])
    vocab = Vocabulary({"text": text, "image_diffusion": image})
    return vocab, text, image


def picture(seed: int) -> torch.Tensor:
    return torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def documents(count: int) -> list[RawDocument]:
    docs = []
    for i in range(count):
        caption, image = RawSegment("text", CAPTIONS[i % len(CAPTIONS)]), RawSegment("image_diffusion", picture(i))
        docs.append(RawDocument((caption, image) if i % 3 else (image, caption)))
        if i % 4 == 0:
            docs.append(RawDocument((RawSegment("text", TEXT[: 40 + 7 * i]),)))
    return docs


def test_markers_go_to_the_text_tower_and_only_patches_attend_both_ways(setting):
    vocab, _, image = setting
    caption, picture_ = RawSegment("text", CAPTIONS[0]), RawSegment("image_diffusion", picture(0))
    caption_first, image_first = vocab.tokenize([RawDocument((caption, picture_)), RawDocument((picture_, caption))], "t")
    text_index, image_index = vocab.index("text"), vocab.index("image_diffusion")
    for doc in (caption_first, image_first):
        values = np.flatnonzero(doc.is_value)
        assert values.size == image.patches_per_image == 4
        assert (doc.modality[values] == image_index).all() and (doc.modality[~doc.is_value] == text_index).all()
        assert (doc.span[values] >= 0).all() and (doc.span[~doc.is_value] == -1).all()
        boi, eoi = values[0] - 1, values[-1] + 1
        assert doc.ids[boi] == vocab.offsets["image_diffusion"] and doc.ids[eoi] == vocab.offsets["image_diffusion"] + 1
        assert doc.next_ids[boi] == IGNORE  # BOI precedes a value: nothing to predict
    # The end-of-image marker predicts the caption's first token (text loss), and only an
    # image followed by its caption is "followed".
    eoi = np.flatnonzero(image_first.is_value)[-1] + 1
    assert image_first.next_ids[eoi] == image_first.ids[eoi + 1]
    assert image_first.followed[image_first.is_value].all() and caption_first.followed is not None
    assert not caption_first.followed[caption_first.is_value].any()


def packed_batch(vocab, seq_len=24, rows=6):
    docs = vocab.tokenize(documents(12), "t")
    stream = PackedStream([docs], [1.0], seq_len, seed=0, lanes=rows)
    return stream.next_batch(len(vocab.names)), docs


def test_packing_never_cuts_an_image_and_padding_has_no_targets(setting):
    vocab, _, image = setting
    batch, _ = packed_batch(vocab)
    for row in range(batch.tokens.shape[0]):
        values = batch.is_value[row]
        segments = batch.segment[row][values]
        for seg in segments.unique():
            assert int((segments == seg).sum()) == image.patches_per_image  # every image whole
        # Padding: its own document at the row end, token 0, no target, not a value.
        doc = batch.document[row]
        last = doc == doc[-1]
        if not bool((batch.targets[row][last] != IGNORE).any()) and not bool(values[last].any()):
            assert (batch.tokens[row][last] == 0).all()
    assert sum(len(v) for v in batch.values.values()) % image.patches_per_image == 0


def test_a_document_that_fits_a_row_is_never_split(setting):
    vocab, _, _ = setting
    docs = vocab.tokenize(documents(12), "t")
    whole_docs = {tuple(d.ids.tolist()) for d in docs if d.whole is not None}
    assert all(len(d) <= 40 for d in docs if d.whole is not None)
    stream = PackedStream([docs], [1.0], 40, seed=1, lanes=8)
    batch = stream.next_batch(len(vocab.names))
    seen = 0
    for row in range(8):
        for chunk in batch.document[row].unique():
            where = batch.document[row] == chunk
            if bool(batch.is_value[row][where].any()):  # a chunk with an image is a whole document
                assert tuple(batch.tokens[row][where].tolist()) in whole_docs
                seen += 1
    assert seen >= 8
    with pytest.raises(MotError, match="packed whole"):
        PackedStream([docs], [1.0], 3, seed=0, lanes=8).next_batch(2)


def test_flex_and_dense_masks_agree_on_a_packed_batch_of_images_and_text(setting):
    vocab, _, _ = setting
    batch, _ = packed_batch(vocab, seq_len=32, rows=3)
    layout = batch.layout
    assert layout.span is not None and not layout.plain_causal
    dense = dense_mask(layout)[:, 0]
    doc, span = layout.document, layout.span
    q = torch.arange(32)[:, None]
    k = torch.arange(32)[None, :]
    for b in range(3):  # the rule written out, as flex's mask_mod states it
        rule = (k <= q) & (doc[b][q] == doc[b][k])
        rule |= (span[b][q] >= 0) & (span[b][q] == span[b][k]) & (doc[b][q] == doc[b][k])
        assert torch.equal(dense[b], rule)
    flex, sdpa = make_backend("flex"), make_backend("sdpa")
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(3, 2, 32, 8, generator=g) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_flex = flex.attend(*qkv, flex.build_mask(layout))
    torch.testing.assert_close(out_flex, sdpa.attend(*qkv, sdpa.build_mask(layout)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "flow"])
def test_noise_maths_target_and_sampler_are_consistent(prediction):
    """The exact noised latent with its true noise gives x0 back, and a sampler driven by an
    oracle that returns the training target of (x, t) for a known x0 ends at that x0."""
    process = DiffusionProcess(DiffusionOptions(prediction=prediction))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    t = torch.tensor([0.0, 10, 250, 500, 900, 990])
    x_t = process.add_noise(x0, noise, t)
    if process.flow:
        s = (t / process.T)[:, None]
        recovered = (x_t - s * noise) / (1 - s)
    else:
        abar = process.ddpm.alphas_cumprod[t.long()][:, None]
        recovered = (x_t - (1 - abar).sqrt() * noise) / abar.sqrt()
    torch.testing.assert_close(recovered, x0, atol=1e-4, rtol=1e-4)

    def oracle(x, step_t):
        tt = torch.full((x.shape[0],), float(step_t))
        if process.flow:
            s = tt[:, None] / process.T
            eps = (x - (1 - s) * x0) / s
        else:
            abar = process.ddpm.alphas_cumprod[tt.long()][:, None]
            eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return process.target(x0, eps, tt)

    scheduler = process.sampler(20)
    x = torch.randn(6, 16, generator=g) * getattr(scheduler, "init_noise_sigma", 1.0)
    for step_t in scheduler.timesteps:
        x = process.step(scheduler, oracle(x, step_t), step_t, x, g)
    torch.testing.assert_close(x, x0, atol=1e-3, rtol=1e-3)


def test_noise_is_capped_for_images_before_their_caption_and_loss_is_per_image(setting):
    vocab, _, image = setting
    loss = DiffusionLoss(DiffusionLossOptions())
    loss.modality = image
    docs = vocab.tokenize(documents(30), "t")
    stream = PackedStream([docs], [1.0], 48, seed=0, lanes=4)
    followed_t, free_t = [], []
    for _ in range(20):
        slices = stream.next_batch(2).modality_slices(vocab)
        if "image_diffusion" not in slices:
            continue
        _, _, piece = slices["image_diffusion"]
        extras = loss.sample_extras(piece, torch.Generator().manual_seed(len(followed_t)))
        first = len(piece) - piece.num_values
        t, followed = extras["t"][first:], piece.followed[first:]
        for seg in piece.segment[first:].unique():
            rows = piece.segment[first:] == seg
            assert t[rows].unique().numel() == 1  # one timestep per image
        followed_t += t[followed].tolist()
        free_t += t[~followed].tolist()
    assert followed_t and max(followed_t) <= 500 and max(free_t) > 500
    # The head starts at zero: the epsilon loss is then the mean square of the noise, per patch.
    piece.extras = loss.sample_extras(piece, torch.Generator().manual_seed(0))
    piece.head = image.build_head(8)
    losses, valid = loss.per_token(None, torch.randn(len(piece), 8), piece)
    first = len(piece) - piece.num_values
    assert valid[first:].all() and not valid[:first].any()
    torch.testing.assert_close(losses[first:], piece.extras["noise"][first:].pow(2).mean(-1))


def tiny_model(vocab, image, untied=True):
    torch.manual_seed(0)
    head = image.build_head(32)
    args = ModelArgs(vocab_size=vocab.size, num_modalities=2, dim=32, n_layers=2, n_heads=2, max_seq_len=64,
                     untie_ffn=untied, untie_attention=untied, untie_norm=untied)
    owned = {"image_diffusion": ModalityModules(1, image.build_adapter(32), head)}
    model = MoTTransformer(args, owned).eval()
    with torch.no_grad():  # a non-zero head, so head outputs are compared for real
        last = head.proj if hasattr(head, "proj") else head.out
        torch.nn.init.normal_(last.weight, std=0.5)
    return model


@pytest.mark.parametrize("untied, adapter", [(True, "linear"), (False, "linear"), (True, "unet")])
def test_kv_cache_caption_image_caption_equals_full_recomputation(setting, untied, adapter):
    vocab, text, image = setting
    if adapter != "linear":
        image = ImageDiffusion(image.options.model_copy(update={"adapter": adapter, "unet_width": 8}), image.state_dir)
        image.prepare([])
        vocab = Vocabulary({"text": text, "image_diffusion": image})
    model = tiny_model(vocab, image, untied)
    t_off, i_off = vocab.offsets["text"], vocab.offsets["image_diffusion"]
    caption = [t_off + int(i) for i in text.encode_prompt("handwritten digit seven")]
    boi, eoi = i_off, i_off + 1
    continuation = [t_off + int(i) for i in text.encode_prompt("a red apple")]
    values = torch.randn(1, image.patches_per_image, image.input_dim)

    stream = _Stream(model, vocab, [caption + [boi]], 32)
    candidate = stream.predict_span(1, torch.randn_like(values), {"t": torch.full((1, 4), 700.0)})
    assert candidate.shape == (1, 4, image.input_dim) and stream.cache.length == len(caption) + 1  # nothing kept
    cached = [stream.append_span(1, values)]
    for token in [eoi] + continuation:
        cached.append(stream.step(torch.tensor([token])))

    # Full recomputation of the same sequence in one forward pass (clean image: no extras).
    P = image.patches_per_image
    ids = caption + [boi] + [0] * P + [eoi] + continuation
    seq = len(ids)
    is_value = torch.zeros(1, seq, dtype=torch.bool)
    is_value[0, len(caption) + 1 : len(caption) + 1 + P] = True
    tokens = torch.tensor([ids])
    modality = torch.where(is_value, 1, vocab.token_modality()[tokens])
    span = torch.where(is_value, 5, -1)
    plan = build_routing(modality, 2, is_value)
    layout = AttentionLayout.build(torch.zeros(1, seq, dtype=torch.long), span)
    hidden = plan.unsort(model(tokens, torch.arange(seq)[None], modality, plan, layout,
                               continuous={1: ContinuousInputs(values[0], {})}))
    logits = torch.nn.functional.linear(hidden, model.head_weight)
    first = len(caption) + P  # the last patch: its logits are the first returned after the span
    for k, got in enumerate(cached):
        torch.testing.assert_close(got[0], logits[first + k], atol=1e-5, rtol=1e-5)
    # A denoising prediction through the cache equals the same span recomputed in full.
    fresh = _Stream(model, vocab, [caption + [boi]], 32)
    noisy, t = torch.randn(1, P, image.input_dim), torch.full((1, P), 300.0)
    predicted = fresh.predict_span(1, noisy, {"t": t})
    full_ids = caption + [boi] + [0] * P
    n = len(full_ids)
    is_value = torch.zeros(1, n, dtype=torch.bool)
    is_value[0, -P:] = True
    tokens = torch.tensor([full_ids])
    modality = torch.where(is_value, 1, vocab.token_modality()[tokens])
    plan = build_routing(modality, 2, is_value)
    layout = AttentionLayout.build(torch.zeros(1, n, dtype=torch.long), torch.where(is_value, 5, -1))
    hidden = plan.unsort(model(tokens, torch.arange(n)[None], modality, plan, layout,
                               continuous={1: ContinuousInputs(noisy[0], {"t": t[0]})}))
    head = model.modality_modules["image_diffusion"].head
    torch.testing.assert_close(predicted[0], head(hidden[-P:]), atol=1e-5, rtol=1e-5)


def test_bad_image_inputs_are_one_line_errors(setting):
    vocab, _, image = setting
    with pytest.raises(MotError, match=r"must be a \(3, 8, 8\) tensor.*NoneType"):
        image.encode(None)
    with pytest.raises(MotError, match=r"must be a \(3, 8, 8\) tensor.*\(3, 16, 16\)"):
        image.encode(torch.zeros(3, 16, 16))
    with pytest.raises(MotError, match="latent patches of shape"):
        image.values_to_payloads(torch.zeros(1, 5, image.input_dim))
    wrong_patch = ImageDiffusion(ImageDiffusionOptions(pretrained_vae=image.options.pretrained_vae, image_size=8,
                                                       patch_size=3), image.state_dir)
    with pytest.raises(MotError, match="patch_size 3 does not divide"):
        wrong_patch.prepare([])


def test_denoising_from_an_untrained_model_stays_within_the_clamp(setting):
    """With the cosine schedule abar(T) ~ 1e-9: an epsilon model's clean-latent estimates
    divide by ~1e-5 at the first steps, so the sampler clamps them (``clip_denoised``)."""
    from mot_core.generate.decoding import sample_value_span
    from mot_core.plugin_api import SamplingParams

    vocab, text, image = setting
    model = tiny_model(vocab, image)
    prompt = [vocab.offsets["text"] + int(i) for i in text.encode_prompt("a red apple")] + [vocab.offsets["image_diffusion"]]
    values, _ = sample_value_span(model, vocab, [prompt] * 2, "image_diffusion", SamplingParams(cfg_scale=3.0, denoising_steps=5),
                                  unconditional_prompts=[[vocab.offsets["image_diffusion"]]] * 2)
    assert values.shape == (2, image.patches_per_image, image.input_dim)
    assert values.abs().max() <= image.options.diffusion.clip_denoised + 1e-4
    images = image.values_to_payloads(values)
    assert len(images) == 2 and images[0].shape == (3, 8, 8)
