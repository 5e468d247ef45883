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
