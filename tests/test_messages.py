"""Messages that name the real cause and a fix that works: a data.dir that is a file or cannot
be written is data.dir's problem, not the run folder's; `mot data tokenize` for data a run
cannot resume with says so before rewriting any shard (its --force advice would not help);
a temperature that breaks the logits is the temperature's fault, not the weights'."""

from __future__ import annotations

import errno

import pytest
import torch

from mot_core.cli import main
from mot_core.errors import MotError


def test_a_data_dir_that_is_a_file_is_data_dirs_problem(write_config, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    config = write_config(steps=2)
    for command in (["train"], ["data", "tokenize"]):
        assert main([*command, str(config), f"data.dir={tmp_path / 'afile' / 'tokens'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: data.dir {tmp_path / 'afile' / 'tokens'}: {tmp_path / 'afile'} is a file; give a folder " \
                      "(it is created if missing)", err
    assert not (tmp_path / "run").exists()


def test_a_failed_shard_write_names_data_dir():
    from mot_core.filesystems import write_failure

    for exc, cause in ((PermissionError(errno.EACCES, "Permission denied"), "no permission to write there"),
                       (OSError(errno.EROFS, "Read-only file system"), "its file system is read-only"),
                       (OSError("IOError: Cannot create directory 'x'. Detail: [errno 28] No space left on device"),
                        "no space left on its device")):
        line = str(write_failure(exc, "/data/tokens", "data.dir", "writing the shards"))
        assert line == (f"writing the shards into data.dir /data/tokens failed: {cause}; data.dir must be a writable "
                        "folder (or name one that already holds these shards)")


def test_tokenize_for_data_the_run_cannot_resume_with_is_refused_before_any_shard_changes(write_config, tmp_path,
                                                                                         text_corpus, capsys):
    config = write_config(steps=2, checkpoint_every=2)
    assert main(["train", str(config)]) == 0
    shards = sorted(p.stat().st_mtime_ns for p in (tmp_path / "run" / "tokens").rglob("*") if p.is_file())
    capsys.readouterr()
    other = f"mixture.datasets.text_files.options.paths=[{text_corpus}/a*.txt]"
    for args in ([other], [other, "--force"]):
        assert main(["data", "tokenize", str(config), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: mixture.datasets.text_files.options.paths was ") and \
            "it cannot change when a run resumes" in err and "a new run.dir" in err, err
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "run" / "tokens").rglob("*") if p.is_file()) == shards


def test_a_temperature_that_breaks_the_logits_is_named():
    from mot_core.generate.decoding import SamplingParams, sample

    logits = torch.tensor([[1.0, 2.0, float("-inf")]])  # a masked id, as the span grammar masks them
    with pytest.raises(MotError, match=r"temperature 1e-300 makes the model's \(finite\) logits NaN or inf"):
        sample(logits, SamplingParams(temperature=1e-300), torch.Generator().manual_seed(0))
    with pytest.raises(MotError, match="the checkpoint's weights are broken"):
        sample(torch.tensor([[float("nan"), 1.0]]), SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
