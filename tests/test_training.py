"""End-to-end training on real text: the loss falls, checkpoints resume exactly, eval agrees."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import fail_at_batch

from mot_core.cli import main

COMPARED = ("loss", "loss/text", "lr", "grad_norm", "val/text/loss", "val/text/bits_per_byte")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(records: list[dict]) -> list[dict]:
    """Everything but wall-clock figures."""
    return [{k: r[k] for k in ("step", *COMPARED) if k in r} for r in records]


def test_text_loss_falls_and_run_dir_is_complete(write_config, tmp_path):
    config = write_config(steps=30, lr=1e-2, eval_every=15, checkpoint_every=15)
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = records[0], records[-1]
    assert {"step", "loss", "loss/text", "tokens_per_s"} <= set(first)
    # Single batches swing (some documents are code-heavy): compare averages; the fixed
    # validation batches below are the sharper signal.
    start = sum(r["loss"] for r in records[:3]) / 3
    end = sum(r["loss"] for r in records[-10:]) / 10
    assert end < start - 0.5, (start, end)
    uniform = math.log(300)  # loss of a model that predicts every token equally
    assert records[14]["val/text/loss"] < uniform - 1.0 and last["val/text/loss"] < uniform - 1.0
    assert 0 < last["val/text/bits_per_byte"] < 8
    assert (run / "config.yaml").is_file() and (run / "state" / "text" / "tokenizer.json").is_file()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step_0000015", "step_0000030"]
    assert {p.name for p in (run / "checkpoints" / "step_0000030").iterdir()} == {
        "model.safetensors", "trainer.pt", "config.yaml", "meta.json"
    }


@pytest.fixture
def uninterrupted(write_config, tmp_path) -> list[dict]:
    assert main(["train", str(write_config("full"))]) == 0
    return comparable(read_metrics(tmp_path / "full"))


def test_resume_after_crash_reproduces_metrics_exactly(write_config, tmp_path, monkeypatch, uninterrupted):
    config = write_config("crashed")
    fail_at_batch(monkeypatch, 5, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", str(config)])
    run = tmp_path / "crashed"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000003"]
    assert len(read_metrics(run)) == 4  # steps 1-4 were logged before the crash
    monkeypatch.undo()
    assert main(["train", str(config)]) == 0  # resumes from step 3, drops the stale step-4 record
    assert comparable(read_metrics(run)) == uninterrupted


def test_interrupt_saves_and_resumes_exactly(write_config, tmp_path, monkeypatch, uninterrupted):
    config = write_config("interrupted")
    fail_at_batch(monkeypatch, 5, KeyboardInterrupt())
    assert main(["train", str(config)]) == 130
    run = tmp_path / "interrupted"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003", "step_0000004"]
    monkeypatch.undo()
    assert main(["train", str(config)]) == 0
    assert comparable(read_metrics(run)) == uninterrupted


def test_eval_reproduces_the_logged_validation(write_config, tmp_path, capsys, uninterrupted):
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "full"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["step"] == 6
    assert metrics["val/text/loss"] == pytest.approx(uninterrupted[-1]["val/text/loss"], rel=1e-6)
    assert metrics["val/text/bits_per_byte"] == pytest.approx(uninterrupted[-1]["val/text/bits_per_byte"], rel=1e-6)


def test_resume_refuses_a_different_model(write_config, tmp_path, capsys, uninterrupted):
    shutil.copy(tmp_path / "full.yaml", tmp_path / "again.yaml")
    code = main(["train", str(tmp_path / "again.yaml"), "model.dim=64", "train.steps=8"])
    err = capsys.readouterr().err
    assert code == 2 and "model.dim was 32" in err and "it cannot change when a run resumes" in err


def test_resume_never_refuses_to_overwrite(write_config, tmp_path, capsys, uninterrupted):
    code = main(["train", str(tmp_path / "full.yaml"), "run.resume=never"])
    assert code == 2 and "already holds checkpoints" in capsys.readouterr().err


def test_tokenizer_options_changed_under_an_existing_run(write_config, tmp_path, capsys, uninterrupted):
    """The resume's own refusal names the option, before any tokenizer is looked at."""
    code = main(["train", str(tmp_path / "full.yaml"), "mixture.modalities.text.options.vocab_size=400"])
    err = capsys.readouterr().err
    assert code == 2 and "mixture.modalities.text.options.vocab_size was 300 when" in err, err


def test_token_shares_are_printed_at_start_and_logged(text_corpus, tmp_path, capsys):
    """Two real text sources of very different document lengths (pydoc topics, Wikipedia
    articles), weighted 0.25 / 0.75 as shares of tokens."""
    import yaml

    from conftest import tiny_config_dict

    data = tiny_config_dict(text_corpus, tmp_path / "mix", steps=20, log_every=10, eval_every=0, checkpoint_every=0,
                            batch_size=4)
    data["mixture"]["datasets"]["text_files"]["weight"] = 0.25
    data["mixture"]["datasets"]["wikipedia"] = {"weight": 0.75, "options": {"val_fraction": 0.05}}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    start = next(line for line in out.splitlines() if line.startswith("data mix over the next"))
    import re

    assert "(weights are shares of tokens)" in start and "modalities: text 100.0%" in start, start
    # each lane (row) meets the shares within about a row: 2 lanes x 200 rows of 64 tokens
    shares = dict(re.findall(r"(\w+) ([\d.]+)% \(weight", start))
    assert abs(float(shares["text_files"]) - 25.0) <= 0.5 and abs(float(shares["wikipedia"]) - 75.0) <= 0.5, start
    logged = [r for r in read_metrics(tmp_path / "mix") if "share/source/wikipedia" in r]
    assert [r["step"] for r in logged] == [10, 20]
    for record in logged:
        # within about a row per lane: after n rows of each lane, 1/n of the tokens
        assert abs(record["share/source/wikipedia"] - 0.75) <= 1 / record["step"]
        assert record["share/modality/text"] == 1.0
