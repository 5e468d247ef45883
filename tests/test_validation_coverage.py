"""Validation that covers every modality: a small source next to a large one is scored on a
fixed sample of its own held-out data (train.eval_sampling=per_source), every validation says
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
                         eval_batches=4, batch_size=4)
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
    assert "warning: validation scores modality 'timeseries_patches' on" in out  # mixed: few patches


def test_per_source_scores_the_small_modality_like_the_whole_held_out_set(plugin_site, mixed_run):
    base, _ = mixed_run
    full, full_report = _eval(plugin_site, base, "--full")
    # 8 batches of 4 rows of 64 positions: per_source gives the time series 16 rows, about
    # all of its 1,084 held-out positions; mixed gives it its token share of the 32 rows
    mixed, mixed_report = _eval(plugin_site, base, "--batches", "8")
    per_source, per_source_report = _eval(plugin_site, base, "--batches", "8", "--sampling", "per_source")
    assert "timeseries_csv" in full_report and "(100%)" in full_report
    key = "val/timeseries_patches/loss"
    ts = "timeseries_patches"
    # the same budget of rows: per_source gives the small source half of them
    assert _positions(per_source_report, ts) > 3 * _positions(mixed_report, ts)
    # measured: full 1.085 (142 patches); per_source 1.149 (121); mixed 2.671 (17)
    assert abs(per_source[key] - full[key]) < abs(mixed[key] - full[key]) / 5
    assert per_source[key] == pytest.approx(full[key], abs=0.1)
    print(f"\n{key}: full {full[key]:.4f}, per_source {per_source[key]:.4f} ({_positions(per_source_report, ts)} "
          f"positions), mixed {mixed[key]:.4f} ({_positions(mixed_report, ts)} positions)")


def test_full_and_batches_together_are_refused(plugin_site, mixed_run):
    base, _ = mixed_run
    result = run_mot(plugin_site, base, "eval", str(base / "run"), "--full", "--batches", "3")
    assert result.returncode == 2 and result.stderr.strip() == "error: --full scores every held-out position; leave out --batches"
