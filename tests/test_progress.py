"""Progress that reads well off a terminal: a tqdm bar on a terminal, plain periodic lines in a
log file (no carriage-return frames)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tqdm import tqdm

from conftest import ROOT, tiny_config_dict

from mot_core.progress import PlainProgress, progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_is_a_real_tqdm(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress(total=5, desc="train", dynamic_ncols=True)
    assert type(bar) is tqdm and bar.desc == "train" and bar.total == 5
    bar.update(5)
    bar.close()
    assert "\r" in terminal.getvalue() and "5/5" in terminal.getvalue()  # drawn as tqdm draws it
    assert type(progress(range(3), file=FakeTerminal())) is tqdm


def test_off_a_terminal_it_prints_a_line_every_tenth_and_at_the_end(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress(total=40, desc="vq tokenizer", unit="step")
    assert isinstance(bar, PlainProgress)
    for step in range(40):
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}", refresh=False)
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert lines[0].startswith("vq tokenizer: 4/40 step (10%) | ") and lines[0].endswith("loss=0.2500")
    assert lines[-1].startswith("vq tokenizer: 40/40 step (100%) | done in ")
    assert [int(re.match(r"vq tokenizer: (\d+)/", line).group(1)) for line in lines] == list(range(4, 41, 4))


def test_off_a_terminal_a_slow_step_still_shows_within_the_interval(capsys):
    bar = progress(range(3), desc="prepare", unit="img", seconds=0.0)  # every update is 'late'
    assert list(bar) == [0, 1, 2]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("prepare: 1/3 img (33%)") and err[-1].startswith("prepare: 3/3 img (100%) | done in ")
    bar = progress(desc="tokenize", unit="part", seconds=0.0)  # no total: counts, and a line per refresh
    bar.set_postfix(documents="12")
    bar.update(2)
    bar.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("tokenize: 0 part | ") and err[0].endswith("documents=12")
    assert err[-1].startswith("tokenize: 2 part | done in ")


def test_write_prints_on_stdout_and_a_disabled_bar_shows_nothing(capsys):
    bar = progress(total=3, desc="train", disable=True)
    bar.update(3)
    bar.write("step 3/3 | loss 1.0")
    bar.close()
    PlainProgress(total=2).write("a log line")
    captured = capsys.readouterr()
    assert captured.out == "step 3/3 | loss 1.0\na log line\n" and captured.err == ""


def _run_to_file(log: Path, cwd: Path, *args: str) -> None:
    with log.open("a") as handle:
        result = subprocess.run([sys.executable, "-m", "mot_core.cli", *args], stdout=handle, stderr=subprocess.STDOUT,
                                cwd=cwd, timeout=300)
    assert result.returncode == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_a_train_logged_to_a_file_has_plain_progress_lines(text_corpus, tmp_path):
    data = tiny_config_dict(text_corpus, tmp_path / "run", steps=20, eval_every=10, checkpoint_every=10,
                            log_every=5, progress=True)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(data))
    log = tmp_path / "train.log"
    _run_to_file(log, tmp_path, "train", str(config))
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    progress_lines = [line for line in lines if line.startswith("train: ")]
    assert [line.split(" ")[1] for line in progress_lines] == [f"{n}/20" for n in range(2, 21, 2)], progress_lines
    assert progress_lines[-1].startswith("train: 20/20 it (100%) | done in ") and "loss=" in progress_lines[-1]
    assert any(line.startswith("step 20/20 | loss ") for line in lines)  # the trainer's own log lines
    tokenize = [line for line in lines if line.startswith("tokenize: ")]
    assert tokenize and tokenize[-1].startswith("tokenize: 128/128 part (100%) | done in "), tokenize


@pytest.mark.slow
def test_data_prepare_and_a_tokenizer_fit_logged_to_a_file_have_plain_progress_lines(tmp_path):
    from test_chameleon_pipeline import tiny_chameleon

    data = tiny_chameleon(tmp_path / "data", tmp_path / "tok", tmp_path / "run")
    data["mixture"]["datasets"]["captioned_images"]["options"].update(sources=["mnist"], max_images_per_source=60)
    data["mixture"]["modalities"]["image"]["options"]["fit"].update(steps=6, batch_size=8, feature_net_steps=0)
    config = tmp_path / "images.yaml"
    config.write_text(yaml.safe_dump(data))
    log = tmp_path / "images.log"
    _run_to_file(log, ROOT, "data", "prepare", str(config))
    _run_to_file(log, ROOT, "tokenizer", "fit", str(config))
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    prepared = [line for line in lines if line.startswith("prepare mnist: ")]
    assert [line.split(" ")[2] for line in prepared] == [f"{n}/5000" for n in range(500, 5001, 500)], prepared
    assert prepared[-1].startswith("prepare mnist: 5000/5000 img (100%) | done in ")
    fit = [line for line in lines if line.startswith("vq tokenizer: ")]
    assert [line.split(" ")[2] for line in fit] == [f"{n}/6" for n in range(1, 7)], fit
    assert "loss=" in fit[-1] and "ppl=" in fit[-1]
