"""CLIP-style image-text scores (local and published) and CIDEr for captions. Tiny and CPU-only."""

from __future__ import annotations

import json
import math
import string

import pytest
import torch

from mot_core.errors import MotError
from plugins.image_diffusion.captioning import cider_score, references_by_image, tokenize_for_cider
from plugins.image_diffusion.clip_score import (ContrastiveImageText, LocalClipScorer, PublishedClipScorer,
                                                caption_word_ids, fit_contrastive_scorer, image_text_scorer,
                                                load_contrastive_scorer, retrieval_top1, save_contrastive_scorer)

CAPTIONS = ["a red square", "a blue circle", "a green cross", "a yellow stripes"]
COLOURS = [(1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, 1.0, -1.0)]


def shapes(n: int, seed: int = 0, size: int = 16) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """n noisy coloured patterns (n, 3, size, size) in [-1, 1]; the caption (class) determines the image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CAPTIONS)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = (size - 1) / 2
    masks = [
        ((ys - c).abs() < size / 4) & ((xs - c).abs() < size / 4),  # square
        (ys - c) ** 2 + (xs - c) ** 2 < (size / 3) ** 2,  # circle
        ((ys - c).abs() < 2) | ((xs - c).abs() < 2),  # cross
        (ys // 2) % 2 == 0,  # stripes
    ]
    images = torch.full((n, 3, size, size), -1.0)
    for i, label in enumerate(labels.tolist()):
        colour = torch.tensor(COLOURS[label]).view(3, 1, 1)
        images[i] = torch.where(masks[label], colour, images[i])
    images = (images + 0.2 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    return images, [CAPTIONS[k] for k in labels.tolist()], labels


# ----------------------------------------------------------------------------- CIDEr

def test_tokenize_for_cider():
    assert tokenize_for_cider("A Dog's  toy!") == "a dog's toy"
    assert tokenize_for_cider("  Hello,   WORLD... ") == "hello world"
    assert tokenize_for_cider("black-and-white 'quoted' 3 cats") == "black and white quoted 3 cats"
    assert tokenize_for_cider("It\u2019s fine") == "it's fine"
    assert tokenize_for_cider("?!") == ""


def test_cider_ranks_matching_captions_higher():
    refs = [["a red square on black", "a small red square"], ["a blue circle", "one blue circle on black"],
            ["a green cross", "green cross shape"]]
    same = cider_score(refs, ["a red square on black", "a blue circle", "a green cross"])
    unrelated = cider_score(refs, ["two dogs playing", "a bowl of soup", "the sky at night"])
    assert math.isfinite(same) and same > 0
    assert same > unrelated
    assert unrelated == pytest.approx(0.0, abs=1e-9)
    # Punctuation/case go through tokenize_for_cider, so they do not change the score.
    assert cider_score(refs, ["A red square, on black!", "a BLUE circle.", "a green cross"]) == pytest.approx(same)


def test_cider_errors():
    with pytest.raises(MotError, match="hypotheses but"):
        cider_score([["a cat"], ["a dog"]], ["a cat"])
    with pytest.raises(MotError, match="empty"):
        cider_score([], [])
    with pytest.raises(MotError, match="no non-empty reference"):
        cider_score([["a cat"], ["!!"]], ["a cat", "a dog"])


def test_references_by_image_groups_identical_images():
    a, b, c = torch.zeros(3, 4, 4), torch.ones(3, 4, 4), torch.full((3, 4, 4), 0.5)
    images = torch.stack([a, b, a, c, a, b])
    captions = ["cat", "dog", "a cat", "", "cat", " dog "]
    grouped, refs = references_by_image(images, captions)
    assert grouped.shape == (2, 3, 4, 4)  # c has only an empty caption: not a reference
    assert torch.equal(grouped[0], a) and torch.equal(grouped[1], b)
    assert refs == [["cat", "a cat"], ["dog"]]
    with pytest.raises(MotError):
        references_by_image(images, captions[:2])


# ----------------------------------------------------------------------------- local CLIP

@pytest.fixture
def one_thread():
    """Tiny convs gain nothing from a second thread, and on a shared 2-core machine OpenMP threads
    spinning against other processes made this fit 10x slower (3 s -> 30 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_caption_word_ids_drops_unknown_words():
    ids, offsets = caption_word_ids(["Red, SQUARE!", "purple thing", "square"], {"red": 0, "square": 1})
    assert ids.tolist() == [0, 1, 1] and offsets.tolist() == [0, 2, 2]


def test_contrastive_scorer_learns_and_round_trips(tmp_path, one_thread):
    images, captions, labels = shapes(96)
    captions[5] = ""  # skipped by the fit
    report = fit_contrastive_scorer(images, captions, tmp_path, steps=60, batch_size=48, seed=0)
    assert set(report) == {"clip_local_train_loss", "clip_local_top1"}
    assert report["clip_local_top1"] > 0.6  # chance is 0.25
    meta = json.loads((tmp_path / "clip_local.json").read_text())
    assert meta["vocabulary"] == sorted({"a", "red", "square", "blue", "circle", "green", "cross", "yellow", "stripes"})
    assert meta["train_images"] == 95 and meta["image_size"] == [16, 16]

    model = load_contrastive_scorer(tmp_path)
    keep = [i for i, c in enumerate(captions) if c]
    assert retrieval_top1(model, images[keep], [captions[i] for i in keep]) == pytest.approx(report["clip_local_top1"])
    scorer = image_text_scorer(None, tmp_path)
    assert isinstance(scorer, LocalClipScorer) and scorer.metric_name == "clip_local"
    test_images, test_captions, test_labels = shapes(32, seed=1)
    wrong = [CAPTIONS[(k + 1) % len(CAPTIONS)] for k in test_labels.tolist()]  # every pair mismatched
    matching = scorer.score(test_images, test_captions)
    assert matching > scorer.score(test_images, wrong)
    assert -100 <= matching <= 100
    # Another resolution is resized to the training one.
    assert math.isfinite(scorer.score(torch.nn.functional.interpolate(test_images, size=24), test_captions))
    # Save/load of the loaded model is exact.
    save_contrastive_scorer(model, tmp_path / "again")
    assert LocalClipScorer(load_contrastive_scorer(tmp_path / "again")).score(test_images, test_captions) == matching


def test_contrastive_scorer_errors(tmp_path):
    with pytest.raises(MotError, match="mot tokenizer fit"):
        load_contrastive_scorer(tmp_path / "missing")
    with pytest.raises(MotError, match="mot tokenizer fit"):
        image_text_scorer(None, tmp_path / "missing")
    with pytest.raises(MotError, match="empty"):
        fit_contrastive_scorer(torch.zeros(2, 3, 8, 8), ["", "  "], tmp_path, steps=1)
    scorer = LocalClipScorer(ContrastiveImageText(["cat"]))
    with pytest.raises(MotError, match="captions"):
        scorer.score(torch.zeros(2, 3, 8, 8), ["cat"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "clip_local.json").write_text("{not json")
    (tmp_path / "broken" / "clip_local.safetensors").write_bytes(b"")
    with pytest.raises(MotError, match="cannot load"):
        load_contrastive_scorer(tmp_path / "broken")


# ----------------------------------------------------------------------------- published CLIP (format only)

def _tiny_clip_folder(folder):
    transformers = pytest.importorskip("transformers")
    # A character-level BPE vocabulary (no merges): enough for the tokenizer to round-trip offline.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    raw = folder / "raw_tokenizer"
    raw.mkdir(parents=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(raw))
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(str(folder / "clip"))
    tokenizer.save_pretrained(str(folder / "clip"))
    return folder / "clip"


def test_published_clip_scorer_loads_a_local_folder(tmp_path):
    folder = _tiny_clip_folder(tmp_path)
    scorer = image_text_scorer(str(folder), tmp_path / "no_local_model")
    assert isinstance(scorer, PublishedClipScorer) and scorer.metric_name == "clip_score"
    images, captions, _ = shapes(6, size=24)
    assert scorer.pixel_values(images[:, :, :, :20]).shape == (6, 3, 16, 16)  # resize shortest side + centre crop
    value = scorer.score(images, captions)
    assert isinstance(value, float) and math.isfinite(value) and -100 <= value <= 100
    assert scorer.score(images, captions) == value


def test_published_clip_scorer_errors(tmp_path):
    with pytest.raises(MotError, match="not found"):
        image_text_scorer(str(tmp_path / "missing"), tmp_path)
    pytest.importorskip("transformers")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MotError, match="cannot load a CLIP model") as info:
        PublishedClipScorer(tmp_path / "empty")
    assert "\n" not in str(info.value)
