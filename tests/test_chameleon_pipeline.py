"""The Chameleon setting end to end through the CLI, on real captioned images:
data prepare -> tokenizer fit -> train (text + VQ image tokens) -> eval -> generate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mot_core.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


def tiny_chameleon(root: Path, tokenizer: Path, run: Path, **model) -> dict:
    return {
        "run": {"dir": str(run), "device": "cpu"},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 160, **model},
        "train": {"steps": 4, "batch_size": 2, "seq_len": 160, "eval_every": 2, "eval_batches": 1,
                  "checkpoint_every": 2, "log_every": 2, "progress": False},
        "mixture": {
            "modalities": {
                "text": {"options": {"vocab_size": 300}},
                "image": {"options": {
                    "tokenizer_dir": str(tokenizer),
                    "architecture": {"ch": 32, "ch_mult": [1, 2, 2], "z_channels": 16, "embed_dim": 16, "n_embed": 64},
                    "fit": {"steps": 30, "batch_size": 32, "feature_net_steps": 20},
                }},
            },
            "datasets": {"captioned_images": {"options": {"root": str(root), "max_images_per_source": 400}}},
        },
    }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prepared_vq):
    """Real data prepared and a tiny tokenizer fitted (once per session), and a tiny MoT
    trained once for the module."""
    base = tmp_path_factory.mktemp("chameleon")
    for name, folder in zip(("data", "tok"), prepared_vq):
        (base / name).symlink_to(folder, target_is_directory=True)
    config = base / "mot.yaml"
    data = tiny_chameleon(base / "data", base / "tok", base / "run")
    config.write_text(yaml.safe_dump(data))
    assert main(["train", str(config)]) == 0
    return base, config, data


def write_config(base: Path, name: str, data: dict) -> Path:
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_tokenizer_fit_reports_quality_and_is_kept_on_rerun(pipeline, capsys):
    base, config, _ = pipeline
    report = json.loads((base / "tok" / "vqgan.json").read_text())["report"]
    assert report["val_psnr"] > 12 and report["codes_used"] > 16
    assert main(["tokenizer", "fit", str(config)]) == 0
    assert "keeping it" in capsys.readouterr().out


def test_training_logs_both_modalities_and_their_validation(pipeline):
    base, _, _ = pipeline
    records = [json.loads(line) for line in (base / "run" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["step"] == 4
    for key in ("loss/text", "loss/image", "val/text/loss", "val/image/loss", "val/text/bits_per_byte"):
        assert math.isfinite(last[key]), key
    global_vocab = json.loads((base / "run" / "checkpoints" / "step_0000004" / "meta.json").read_text())["model_args"]["vocab_size"]
    assert last["val/image/loss"] < math.log(global_vocab) + 0.1  # logits span the whole global vocabulary


def test_eval_reports_reconstruction_and_fid(pipeline, capsys):
    base, _, _ = pipeline
    capsys.readouterr()
    assert main(["eval", str(base / "run"), "--samples", "6", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["val/image/recon_psnr"] > 12
    assert metrics["val/image/codebook_perplexity"] > 4
    assert math.isfinite(metrics["val/image/fid_local"]) and metrics["val/image/fid_local"] >= 0


def test_generate_writes_a_grid_and_captions_images(pipeline, capsys):
    base, _, _ = pipeline
    out = base / "grid.png"
    digit = next((base / "data" / "mnist" / "images").glob("*.png"))
    capsys.readouterr()
    code = main(["generate", str(base / "run"), "--prompt", "handwritten digit seven", "--prompt", "grinning face",
                 "--samples", "2", "--out", str(out), "--image", str(digit), "--top-k", "20"])
    assert code == 0
    printed = capsys.readouterr().out
    assert out.is_file() and Image.open(out).size[0] > 64
    assert f"{digit}: " in printed


def assert_one_line_error(code, err, *fragments):
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_bad_generation_inputs(pipeline, capsys, tmp_path):
    base, _, _ = pipeline
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png at all")
    capsys.readouterr()
    code = main(["generate", str(base / "run"), "--image", str(corrupt)])
    assert_one_line_error(code, capsys.readouterr().err, "corrupt.png")
    big = tmp_path / "big.png"  # not the model's size: read as a user folder's images are (resized, cropped)
    Image.new("RGB", (60, 40), "white").save(big)
    assert main(["generate", str(base / "run"), "--image", str(big), "--max-tokens", "4"]) == 0
    assert f"{big}: " in capsys.readouterr().out
    code = main(["generate", str(base / "run"), "--prompt", "a cat <|endoftext|> and a dog"])
    assert_one_line_error(code, capsys.readouterr().err, "special token")


def test_tokenizer_that_does_not_match_the_config(pipeline, capsys):
    base, _, data = pipeline
    changed = json.loads(json.dumps(data))
    changed["run"]["dir"] = str(base / "other_run")
    changed["mixture"]["modalities"]["image"]["options"]["architecture"]["n_embed"] = 128
    capsys.readouterr()
    code = main(["train", str(write_config(base, "mismatch", changed))])
    assert_one_line_error(code, capsys.readouterr().err, "does not match the config", "n_embed")


def test_chameleon_configs_differ_only_in_tower_settings(capsys):
    loaded = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(CONFIGS.glob("chameleon_*.yaml"))}
    families = {
        "chameleon": {"chameleon_dense", "chameleon_mot", "chameleon_mot_ffn", "chameleon_mot_ffn_attn",
                      "chameleon_moe4x", "chameleon_mot_text_moe"},
        "chameleon_speech": {"chameleon_speech_dense", "chameleon_speech_mot", "chameleon_speech_leave_text_out"},
    }
    assert set(loaded) == set().union(*families.values())
    for family, names in families.items():
        stripped = []
        for name in sorted(names):
            data = loaded[name]
            assert data["run"]["dir"] == f"runs/{name}"
            assert data["model"]["norm_placement"] == "post"  # the paper's Chameleon setting
            data = json.loads(json.dumps(data))
            del data["run"]["dir"], data["model"]["untie"]
            data["model"].pop("ffn", None)  # the towers: untie, FFN kinds and groups
            for entry in data["mixture"]["modalities"].values():
                entry.pop("tower", None)
            stripped.append(data)
        assert all(s == stripped[0] for s in stripped), family
        assert loaded[f"{family}_dense"]["model"]["untie"] == {"ffn": False, "attention": False, "norm": False}
        assert loaded[f"{family}_mot"]["model"]["untie"] == {"ffn": True, "attention": True, "norm": True}
    assert loaded["chameleon_moe4x"]["model"]["ffn"]["type"] == "moe"
    assert loaded["chameleon_mot_text_moe"]["mixture"]["modalities"]["text"]["tower"]["ffn"]["type"] == "moe"
    capsys.readouterr()
    assert main(["config", "show", str(CONFIGS / "chameleon_mot.yaml")]) == 0
    towers = {m: e["tower"] for m, e in yaml.safe_load(capsys.readouterr().out)["mixture"]["modalities"].items()}
    assert towers["image"]["qk_norm"] is True and towers["text"]["qk_norm"] is False  # image plugin's default
    # The resolved config shows the effective towers: each FFN and group.
    assert towers["text"]["ffn"] == {"type": "swiglu"} and towers["image"]["group"] == "image"
    assert main(["config", "show", str(CONFIGS / "chameleon_speech_leave_text_out.yaml")]) == 0
    towers = {m: e["tower"] for m, e in yaml.safe_load(capsys.readouterr().out)["mixture"]["modalities"].items()}
    assert [towers[m]["group"] for m in ("text", "image", "speech")] == ["text", "image", "image"]
