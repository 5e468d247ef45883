"""Runs that do what they say: settings changed on resume take effect (or are refused before
anything changes), a diverging run with skipped updates stops at its limit, and ``mot compare``
of a run without validation says so."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from conftest import nan_losses_on
from mot_core.cli import main
from mot_core.training.state import lr_factor


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "train.lock"}


def test_a_lower_learning_rate_on_resume_takes_effect_and_is_recorded(write_config, tmp_path, capsys):
    config = write_config("run", steps=6, checkpoint_every=3, warmup_steps=2)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["train", str(config), "train.steps=9", "train.lr=1e-4", "train.weight_decay=0",
                 "train.beta2=0.99"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("changed on resume"))
    assert line.startswith("changed on resume, in effect from step 7: ")
    for change in ("train.lr: 0.003 -> 0.0001", "train.steps: 6 -> 9", "train.weight_decay: 0.1 -> 0.0",
                   "train.beta2: 0.95 -> 0.99"):
        assert change in line, line
    records = {r["step"]: r for r in _records(tmp_path / "run")}
    for step in (7, 8, 9):  # the logged lr is the one after the step's scheduler update
        assert records[step]["lr"] == pytest.approx(1e-4 * lr_factor(step, 2, 9, 0.1), rel=1e-9)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    saved = yaml.safe_load((tmp_path / "run" / "checkpoints" / "step_0000009" / "config.yaml").read_text())
    for conf in (recorded, saved):
        assert conf["train"]["lr"] == 1e-4 and conf["train"]["weight_decay"] == 0.0 and conf["train"]["steps"] == 9


def test_the_optimizer_uses_the_new_settings_from_the_resumed_step(write_config, tmp_path):
    import torch

    from mot_core.training import checkpoint as ckpt

    config = write_config("opt", steps=3, checkpoint_every=3)
    assert main(["train", str(config)]) == 0
    assert main(["train", str(config), "train.steps=4", "train.lr=2e-4", "train.weight_decay=0.5",
                 "train.beta1=0.8"]) == 0
    state = ckpt.load_trainer_state(tmp_path / "opt" / "checkpoints" / "step_0000004")
    groups = state["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] == 0.5 and groups[1]["weight_decay"] == 0.0
    assert all(g["betas"] == (0.8, 0.95) and g["initial_lr"] == 2e-4 for g in groups)
    assert state["scheduler"]["base_lrs"] == [2e-4, 2e-4]
    assert torch.isfinite(torch.tensor(groups[0]["lr"]))


@pytest.mark.parametrize("override, key", [
    ("model.dim=64", "model.dim"),
    ("train.seq_len=32", "train.seq_len"),
    ("mixture.datasets.text_files.weight=2.0", "mixture.datasets.text_files.weight"),
    ("run.seed=3", "run.seed"),
])
def test_a_setting_that_defines_the_run_is_refused_on_resume_and_nothing_changes(write_config, tmp_path, capsys,
                                                                                  override, key):
    config = write_config("fixed", steps=3, checkpoint_every=3)
    assert main(["train", str(config)]) == 0
    before = _folder_digest(tmp_path / "fixed")
    capsys.readouterr()
    code = main(["train", str(config), "train.steps=6", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {key} was ") and "it cannot change when a run resumes" in err, err
    assert _folder_digest(tmp_path / "fixed") == before


@pytest.fixture
def nan_from_step_3(monkeypatch):
    """The text loss is NaN on every training forward pass from the 3rd on: a diverged run."""
    nan_losses_on(monkeypatch, lambda call: call >= 3)


def test_skipped_updates_stop_at_their_limit(write_config, tmp_path, capsys, nan_from_step_3):
    config = write_config("diverged", steps=20, checkpoint_every=2, on_nonfinite="skip", max_consecutive_skips=3)
    code = main(["train", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    # the checkpoint of step 4 was saved after updates were skipped: the good one is step 2's
    good = tmp_path / "diverged" / "checkpoints" / "step_0000002"
    assert ("error: 4 consecutive updates skipped for a non-finite gradient at step 6 (train.max_consecutive_skips=3): "
            f"the run diverged; the last good checkpoint is step 2 (saved before the first skipped update) in {good}: "
            f"train from it with a lower train.lr, as a new run (model.warm_start={good})") in err, err
    assert good.is_dir() and (tmp_path / "diverged" / "checkpoints" / "step_0000004").is_dir()
    records = _records(tmp_path / "diverged")
    assert [r["step"] for r in records if r.get("skipped")] == [3, 4, 5]


def test_total_skipped_updates_have_a_limit_too(write_config, tmp_path, capsys, nan_from_step_3):
    config = write_config("total", steps=20, checkpoint_every=2, on_nonfinite="skip", max_consecutive_skips=10,
                          max_total_skips=2)
    code = main(["train", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "3 total updates skipped for a non-finite gradient at step 5 (train.max_total_skips=2)" in err


def test_compare_of_a_run_without_validation_is_one_line(write_config, tmp_path, capsys):
    run = tmp_path / "noval"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "loss/text": 3.0}) + "\n")
    code = main(["compare", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("error: run noval has no validation metrics in its metrics.jsonl (it logs them every "
                                 "train.eval_every steps and at its last step): let it reach one, or run `mot eval` on it")


def test_a_folder_listed_twice_under_two_spellings_is_refused(tmp_path):
    from mot_core.errors import MotError
    from mot_core.config import validate_section
    from plugins.images.data import CaptionedImagesOptions

    (tmp_path / "x").mkdir()
    with pytest.raises(MotError, match=r"'.*/x' and '.*/x/' are the same folder .*; list it once"):
        validate_section(CaptionedImagesOptions, {"folders": [str(tmp_path / "x"), f"{tmp_path / 'x'}/"]},
                         "mixture.datasets.captioned_images.options")


def test_a_tampered_meta_json_is_damage_and_an_unchecksummed_checkpoint_is_reported(write_config, tmp_path, capsys):
    from mot_core.training import checkpoint as ckpt

    config = write_config("meta", steps=4, checkpoint_every=2)
    assert main(["train", str(config)]) == 0
    newest = tmp_path / "meta" / "checkpoints" / "step_0000004"
    meta = json.loads((newest / "meta.json").read_text())
    meta["step"] = 40
    (newest / "meta.json").write_text(json.dumps(meta))
    assert ckpt.damage(newest) == "meta.json does not match its checksum"
    lines: list[str] = []
    assert ckpt.latest_intact(tmp_path / "meta", report=lines.append).name == "step_0000002"
    assert lines == ["checkpoint step_0000004 is damaged (meta.json does not match its checksum); using step_0000002 "
                     "instead"]
    older = tmp_path / "meta" / "checkpoints" / "step_0000002"
    old_meta = json.loads((older / "meta.json").read_text())
    for key in ("sha256", "meta_sha256"):  # as written before checksums existed
        old_meta.pop(key)
    (older / "meta.json").write_text(json.dumps(old_meta))
    lines.clear()
    assert ckpt.latest_intact(tmp_path / "meta", report=lines.append).name == "step_0000002"
    assert lines[-1] == (f"checkpoint {older} has no checksums (written by an earlier version): its files could only "
                         "be checked for presence")


def test_flex_attention_training_on_cpu_is_one_line_without_torch_warnings(write_config, capsys):
    config = write_config("flex")
    code = main(["train", str(config), "model.attention_backend=flex"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("error: attention backend 'flex' has no backward pass on CPU in this torch; train with "
                                 "model.attention_backend=sdpa (flex works on CPU for eval and generation)")


def test_a_setting_added_since_the_checkpoint_at_its_default_is_no_change():
    """A run checkpointed by an earlier version (its config.yaml lacks a key added since)
    resumes when the key is at its default, which is what ran; another value is refused."""
    import pytest as _pytest

    from mot_core.errors import MotError as _MotError
    from mot_core.training.resume import resume_changes

    saved = "data:\n  shard_tokens: 16777216\ntrain:\n  lr: 0.003\n"
    assert resume_changes(saved, saved.replace("data:\n", "data:\n  on_bad_record: error\n"), "step_3") == []
    with _pytest.raises(_MotError, match=r"data.on_bad_record was '<unset>' when step_3 was saved and is 'skip' now"):
        resume_changes(saved, saved.replace("data:\n", "data:\n  on_bad_record: skip\n"), "step_3")
