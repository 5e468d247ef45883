"""Validation that covers every modality: a small source next to a large one is scored on a
fixed sample of its own held-out data (train.eval_sampling=per_source, the default), every validation says
what it scored, a thinly scored modality is warned about, and ``mot eval --full`` scores every
held-out position."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import run_mot
from test_continuous_modality import _patch_config


@pytest.fixture(scope="module")
def mixed_run(plugin_site, text_corpus, tmp_path_factory):
    """Text + continuous time series (binned patches); the text source is ~100x larger."""
    base = tmp_path_factory.mktemp("coverage")
    data = _patch_config(base / "run", "timeseries_patches", steps=20, eval_every=20, checkpoint_every=20,
                         batch_size=4)
    del data["train"]["eval_batches"]  # the default: 8
    data["mixture"]["datasets"]["text_files"] = {"options": {"paths": [str(text_corpus / "*.txt")],
                                                             "val_fraction": 0.3}}
    config = base / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    result = run_mot(plugin_site, base, "train", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base, result.stdout


def _eval(plugin_site, base, *args) -> tuple[dict, str]:
    result = run_mot(plugin_site, base, "eval", str(base / "run"), "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def _positions(report: str, modality: str) -> int:
    return int(re.search(rf"{modality} ([\d,]+) positions", report).group(1).replace(",", ""))


def test_training_prints_what_validation_scores_and_warns_about_a_thin_modality(mixed_run):
    _, out = mixed_run
    line = next(line for line in out.splitlines() if line.startswith("validation: "))
    assert "text_files" in line and "timeseries_csv" in line and "held-out positions" in line
    assert "warning: validation scores modality 'timeseries_patches' on" in out  # 142 held-out patches in all


def test_the_logged_loss_of_the_small_modality_is_its_loss_over_all_its_held_out_data(plugin_site, mixed_run):
    """At the defaults (per_source, eval_batches 8), the time series' logged validation loss
    is its loss over every held-out patch within 0.1 nats; `mixed` sampling, the older way,
    scores it on a few patches and misses by far more."""
    base, _ = mixed_run
    logged = json.loads((base / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    full, full_report = _eval(plugin_site, base, "--full")
    mixed, mixed_report = _eval(plugin_site, base, "--sampling", "mixed")
    per_source, per_source_report = _eval(plugin_site, base)
    assert "timeseries_csv" in full_report and "(100%)" in full_report
    key = "val/timeseries_patches/loss"
    ts = "timeseries_patches"
    assert per_source[key] == pytest.approx(logged[key], rel=1e-5)  # mot eval at defaults = what training logged
    # the same budget of rows: per_source gives the small source half of them
    assert _positions(per_source_report, ts) > 3 * _positions(mixed_report, ts)
    # measured: full 1.079 (142 patches); logged and per_source 1.149 (121); mixed 2.671 (17)
    assert abs(per_source[key] - full[key]) < abs(mixed[key] - full[key]) / 5
    assert logged[key] == pytest.approx(full[key], abs=0.1)
    print(f"\n{key}: full {full[key]:.4f}, logged (per_source) {logged[key]:.4f} ({_positions(per_source_report, ts)} "
          f"positions), mixed {mixed[key]:.4f} ({_positions(mixed_report, ts)} positions)")


def test_full_and_batches_together_are_refused(plugin_site, mixed_run):
    base, _ = mixed_run
    result = run_mot(plugin_site, base, "eval", str(base / "run"), "--full", "--batches", "3")
    assert result.returncode == 2 and result.stderr.strip() == "error: --full scores every held-out position; leave out --batches"


def test_full_reads_every_position_once_when_whole_segments_leave_gaps_in_rows():
    """Documents of 40 positions, a whole segment in each, in rows of 64: two never share a row,
    so a row is 40 positions and 24 of padding. ``--full`` still reads every position, once."""
    import numpy as np

    from mot_core.data.packing import fixed_batches
    from mot_core.data.vocabulary import TokenDocument

    def document(n: int, whole: tuple[int, int]) -> TokenDocument:
        ids = np.arange(n, dtype=np.int64) % 50
        return TokenDocument(ids, np.zeros(n, dtype=np.int64), np.full(n, -1, dtype=np.int64),
                             whole=np.array([whole], dtype=np.int64))

    gappy = [document(40, (4, 40)) for _ in range(30)]
    long = [document(150, (100, 150)) for _ in range(3)]  # longer than a row: cut between whole segments
    plain = [TokenDocument(np.arange(70) % 50, np.zeros(70, dtype=np.int64), np.full(70, -1, dtype=np.int64))
             for _ in range(5)]
    batches = fixed_batches([gappy, long, plain], batch_size=4, seq_len=64, max_batches=None, num_modalities=1)
    assert batches.source_tokens == [(1200, 1200), (450, 450), (350, 350)]
    scored = sum(int(b.scored_mask().sum()) for b in batches)
    assert scored == (1200 - 30) + (450 - 3) + (350 - 5)  # every next-token target, once


@pytest.fixture(scope="module")
def gappy_run(plugin_site, text_corpus, tmp_path_factory):
    """Text + a minority continuous source whose documents (a caption and 16 patches, about 40
    positions, kept whole) leave a gap in each 64-position row, as an IMU recording does."""
    base = tmp_path_factory.mktemp("gappy")
    data = _patch_config(base / "run", "timeseries_patches", steps=20, eval_every=20, checkpoint_every=20,
                         batch_size=4)
    del data["train"]["eval_batches"]  # the default: 8
    data["mixture"]["datasets"]["timeseries_csv"]["options"].update(window=64, stride=32)
    data["mixture"]["datasets"]["text_files"] = {"options": {"paths": [str(text_corpus / "*.txt")],
                                                             "val_fraction": 0.3}}
    config = base / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    result = run_mot(plugin_site, base, "train", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base


@pytest.mark.slow
def test_full_scores_all_of_a_continuous_source_that_leaves_gaps_and_the_logged_figure_is_close(plugin_site, gappy_run):
    base = gappy_run
    full, report = _eval(plugin_site, base, "--full")
    coverage = [line for line in report.splitlines() if "held-out" in line or "%" in line]
    assert "timeseries_csv" in report and "text_files" in report, report
    assert re.findall(r"\((\d+)%\)", report) and set(re.findall(r"\((\d+)%\)", report)) == {"100"}, report
    key = "val/timeseries_patches/loss"
    logged = json.loads((base / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(logged[key] - full[key]) <= 0.1 * abs(full[key]), (logged[key], full[key])
    print(f"\n{key}: full {full[key]:.4f}, logged {logged[key]:.4f}; " + " | ".join(coverage))
