"""The Transfusion setting end to end through the CLI, on real captioned images:
data prepare -> VAE fit -> train (text by next-token loss, latent patches by diffusion) ->
eval (diffusion loss, FID/CLIP-style scores, CIDEr) -> generate, and its bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mot_core.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
TINY_VAE = {"block_out_channels": [8, 16, 16], "norm_num_groups": 4}


def tiny_transfusion(root: Path, vae: Path, run: Path, untie: bool = True) -> dict:
    return {
        "run": {"dir": str(run), "device": "cpu"},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 96, "norm_placement": "pre",
                  "untie": {"ffn": untie, "attention": untie, "norm": untie}},
        "train": {"steps": 6, "batch_size": 2, "seq_len": 96, "eval_every": 3, "eval_batches": 1,
                  "checkpoint_every": 3, "log_every": 3, "progress": False},
        "mixture": {
            "modalities": {
                "text": {"options": {"vocab_size": 300}},
                "image_diffusion": {"loss_weight": 5.0, "options": {
                    "tokenizer_dir": str(vae), "vae": TINY_VAE,
                    "fit": {"steps": 8, "batch_size": 16, "feature_net_steps": 10, "clip_steps": 10},
                    "diffusion": {"inference_steps": 3},
                }},
            },
            "datasets": {"captioned_images": {"options": {
                "root": str(root), "max_images_per_source": 200, "image_modality": "image_diffusion",
            }}},
        },
    }


def write(base: Path, name: str, data: dict) -> Path:
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    base = tmp_path_factory.mktemp("transfusion")
    data = tiny_transfusion(base / "data", base / "vae", base / "run")
    config = write(base, "mot", data)
    assert main(["data", "prepare", str(config)]) == 0
    assert main(["tokenizer", "fit", str(config)]) == 0
    assert main(["train", str(config)]) == 0
    return base, config, data


def test_examples_are_twins_that_differ_only_in_towers():
    dense = yaml.safe_load((CONFIGS / "transfusion_dense.yaml").read_text())
    mot = yaml.safe_load((CONFIGS / "transfusion_mot.yaml").read_text())
    assert mot["model"]["norm_placement"] == "pre" == dense["model"]["norm_placement"]
    assert mot["mixture"]["modalities"]["image_diffusion"]["loss_weight"] == 5.0
    for cfg in (dense, mot):
        cfg["run"].pop("dir")
        cfg["model"].pop("untie")
    assert dense == mot
    assert main(["config", "show", str(CONFIGS / "transfusion_mot.yaml")]) == 0


def test_training_logs_text_and_diffusion_losses_and_saves_the_image_modules(pipeline):
    base, _, _ = pipeline
    records = [json.loads(line) for line in (base / "run" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["step"] == 6
    for key in ("loss/text", "loss/image_diffusion", "val/text/loss", "val/image_diffusion/loss"):
        assert math.isfinite(last[key]), key
    # Zero-initialised head: the first diffusion loss is the mean square of N(0, 1) noise.
    assert 0.5 < records[0]["loss/image_diffusion"] < 1.5
    from safetensors.torch import load_file

    weights = load_file(base / "run" / "checkpoints" / "step_0000006" / "model.safetensors")
    assert any(k.startswith("modality_modules.image_diffusion.adapter.") for k in weights)
    assert any(k.startswith("modality_modules.image_diffusion.head.") for k in weights)


def test_eval_reports_diffusion_loss_fid_clip_and_cider(pipeline, capsys):
    base, _, _ = pipeline
    capsys.readouterr()
    assert main(["eval", str(base / "run"), "--samples", "4", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("val/image_diffusion/loss", "val/image_diffusion/vae_psnr", "val/image_diffusion/fid_local",
                "val/image_diffusion/clip_local", "val/image_diffusion/cider"):
        assert math.isfinite(metrics[key]), key


def test_generate_draws_captions_into_a_grid_and_captions_an_image(pipeline, capsys):
    base, _, _ = pipeline
    out = base / "grid.png"
    assert main(["generate", str(base / "run"), "--prompt", "handwritten digit seven", "--samples", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 64
    digit = next((base / "data" / "mnist" / "images").glob("*.png"))
    capsys.readouterr()
    assert main(["generate", str(base / "run"), "--image", str(digit), "--temperature", "0"]) == 0
    assert str(digit) in capsys.readouterr().out


def test_dense_twin_resumes_and_warm_starts_nothing_special(pipeline):
    base, _, data = pipeline
    dense = tiny_transfusion(base / "data", base / "vae", base / "dense", untie=False)
    dense["train"]["steps"] = 3
    config = write(base, "dense", dense)
    assert main(["train", str(config)]) == 0
    dense["train"]["steps"] = 6
    write(base, "dense", dense)
    assert main(["train", str(config)]) == 0  # resumes at step 3: the noise draws are the stream's
    records = [json.loads(line) for line in (base / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 6


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["mixture"]["modalities"]["image_diffusion"].update(loss_weight=-1.0), "loss_weight"),
    (lambda d: d["mixture"]["modalities"]["image_diffusion"]["options"].update(vae={"block_out_channels": [8, 16, 32], "norm_num_groups": 4}),
     "does not match"),
    (lambda d: d["mixture"]["modalities"]["image_diffusion"]["options"].update(patch_size=3), "patch_size 3"),
    (lambda d: d["mixture"]["modalities"]["image_diffusion"]["options"]["diffusion"].update(prediction="x0"), "prediction"),
    (lambda d: d["mixture"]["modalities"]["image_diffusion"].update(loss_options={"cap_before_text": 2}), "cap_before_text"),
    (lambda d: d["mixture"]["modalities"]["image_diffusion"]["options"].update(text_modality="speech"), "speech"),
])
def test_bad_transfusion_configs_are_one_line_errors(pipeline, capsys, edit, message):
    base, _, data = pipeline
    bad = json.loads(json.dumps(data))
    bad["run"]["dir"] = str(base / "bad_run")
    edit(bad)
    config = write(base, "bad", bad)
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (base / "bad_run" / "checkpoints").exists()  # nothing trained on a bad setting
