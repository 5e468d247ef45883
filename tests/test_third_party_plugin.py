"""The example third-party plugin (examples/timeseries_plugin), installed and used for real.

Two parts:
- Installed: the package is pip-installed into a private folder (never into the venv), and the
  ``mot`` CLI runs in subprocesses with that folder on PYTHONPATH, so the plugin is found only
  through its ``mot.plugins`` entry point, exactly as a user's installed plugin would be.
- Unit: the package's classes imported from the source folder, on the bundled real data.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mot_core.config import validate_section
from mot_core.errors import MotError

from conftest import PLUGIN_SOURCE, run_mot


# --------------------------------------------------------------------------------------------
# Installed package, used through the CLI
# --------------------------------------------------------------------------------------------


def test_mot_plugins_lists_the_installed_plugin_and_the_built_ins(plugin_site, tmp_path):
    result = run_mot(plugin_site, tmp_path, "plugins")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^\s+timeseries\s+mot_timeseries\s+from mot-timeseries 0\.1\.0$", out, re.MULTILINE), out
    assert re.search(r"^\s+text\s+plugins\.text\s+from mot-framework ", out, re.MULTILINE), out
    assert re.search(r"^\s+autoregressive\s+plugins\.autoregressive\s+from mot-framework ", out, re.MULTILINE), out
    for kind, name, plugin in [
        ("modality", "timeseries", "timeseries"),
        ("dataset", "timeseries_csv", "timeseries"),
        ("evaluator", "timeseries_forecast", "timeseries"),
        ("modality", "text", "text"),
        ("loss", "autoregressive", "autoregressive"),
    ]:
        assert re.search(rf"^\s+{kind}\s+{name}\s+by {plugin}$", out, re.MULTILINE), f"{kind} {name} missing:\n{out}"


def test_mot_train_runs_a_text_and_timeseries_mixture(plugin_site, tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            run: {{dir: {json.dumps(str(run_dir))}, device: cpu}}
            model: {{dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 64}}
            train: {{steps: 2, batch_size: 2, seq_len: 64, warmup_steps: 1, eval_batches: 1, progress: false}}
            mixture:
              modalities:
                text: {{options: {{vocab_size: 300}}}}
                timeseries: {{options: {{n_bins: 64}}}}
              datasets:
                timeseries_csv: {{options: {{window: 32, stride: 16}}}}
            """
        )
    )
    result = run_mot(plugin_site, tmp_path, "train", str(config))
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "timeseries (64 ids)" in result.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in records if r["step"] == 2)
    # 128 tokens per batch always hold a caption and values: a document is a caption of a few
    # tokens followed by at most 32 values.
    for key in ("loss/text", "loss/timeseries", "val/timeseries/loss", "val/timeseries/bits_per_value"):
        assert key in final and math.isfinite(final[key]), f"{key} missing or not finite in {final}"
    # An untrained model is near-uniform over the global vocabulary (text + timeseries ids).
    assert 0 < final["val/timeseries/bits_per_value"] < 2 * math.log2(300 + 64)

    bins = json.loads((run_dir / "state" / "timeseries" / "bins.json").read_text())
    assert bins["options"] == {"n_bins": 64} and len(bins["edges"]) == 65

    # `mot eval` rebuilds the run from its saved config and reloads the saved bins: the same
    # held-out batches must score the same as at the end of training.
    result = run_mot(plugin_site, tmp_path, "eval", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    assert scored["val/timeseries/loss"] == pytest.approx(final["val/timeseries/loss"], rel=1e-5)
    assert scored["val/timeseries/bits_per_value"] == pytest.approx(final["val/timeseries/bits_per_value"], rel=1e-5)

    # `mot generate`: a free-running plugin modality continued after a caption (the command in
    # docs/writing_a_plugin.md), written through the plugin's own write_payloads.
    caption = "Yearly sunspot numbers from 1700 to 1731:"
    out = tmp_path / "series.csv"
    result = run_mot(plugin_site, tmp_path, "generate", str(run_dir), "--prompt", caption, "--modality", "timeseries",
                     "--max-tokens", "24", "--samples", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"timeseries for 1 prompt(s) x 2: {out}" in result.stdout
    rows = list(csv.reader(out.read_text().splitlines()))
    assert [row[0] for row in rows] == [caption, caption]
    centres = json.loads((run_dir / "state" / "timeseries" / "bins.json").read_text())["centres"]
    for row in rows:
        values = [float(v) for v in row[1:]]
        assert len(values) == 24  # no stop token: the length limit ends it
        assert all(min(centres) - 1e-3 <= v <= max(centres) + 1e-3 for v in values)
    # and a series given as a file is continued by the same modality
    start = tmp_path / "start.txt"
    start.write_text("5\n11\n16\n23\n36\n")
    result = run_mot(plugin_site, tmp_path, "generate", str(run_dir), "--prompt-file", str(start),
                     "--prompt-modality", "timeseries", "--modality", "timeseries", "--max-tokens", "8",
                     "--samples", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert len(next(csv.reader(out.read_text().splitlines()))) == 1 + 8


# --------------------------------------------------------------------------------------------
# Unit tests of the package's classes, imported from the source folder
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ts():
    """The plugin's modules, imported from examples/timeseries_plugin (path removed after)."""
    sys.path.insert(0, str(PLUGIN_SOURCE))
    try:
        import mot_timeseries
        from mot_timeseries import datasource, evaluator, modality

        yield SimpleNamespace(package=mot_timeseries, datasource=datasource, evaluator=evaluator, modality=modality)
    finally:
        sys.path.remove(str(PLUGIN_SOURCE))


def bundled(ts, value_column: str):
    return next(spec for spec in ts.datasource.bundled_files() if spec.value_column == value_column)


def fitted_modality(ts, state_dir: Path, n_bins: int = 256, source_options: dict | None = None):
    """A TimeSeries modality prepared on the training windows of the bundled data."""
    source = ts.datasource.TimeSeriesCSV(ts.datasource.TimeSeriesCSVOptions(**(source_options or {})))
    payloads = [s.payload for d in source.documents("train") for s in d.segments if s.modality == "timeseries"]
    modality = ts.modality.TimeSeries(ts.modality.TimeSeriesOptions(n_bins=n_bins), state_dir)
    modality.prepare(payloads)
    return modality


def test_bins_round_trip_real_series_closely(ts, tmp_path):
    modality = fitted_modality(ts, tmp_path / "state")
    all_ids = []
    for column in ("SUNACTIVITY", "co2"):
        series = ts.datasource.load_series(bundled(ts, column)).values
        train = series[: ts.datasource.split_point(len(series), 0.2, column)]
        ids = modality.encode(train)
        assert ids.dtype == torch.long and ids.shape == train.shape
        assert int(ids.min()) >= 0 and int(ids.max()) < modality.vocab_size == 256
        decoded = modality.decode(ids)
        # Each decoded value lies in the bin of the value it came from ...
        assert torch.equal(modality.encode(decoded), ids)
        # ... and reconstructs it to within 2% of the series' spread on average.
        assert np.abs(decoded - train).mean() < 0.02 * train.std(), column
        all_ids.append(ids)
    # Quantiles of distinct values: no bin id is wasted on repeated measurements.
    assert len(torch.unique(torch.cat(all_ids))) == 256


def test_saved_bins_are_reloaded_and_must_match_the_options(ts, tmp_path):
    state_dir = tmp_path / "state"
    first = fitted_modality(ts, state_dir, n_bins=16)
    assert (state_dir / "bins.json").is_file()

    reloaded = ts.modality.TimeSeries(ts.modality.TimeSeriesOptions(n_bins=16), state_dir)
    reloaded.prepare(iter(()))  # no data needed: the bins come from state_dir
    values = np.array([0.0, 12.5, 80.0, 150.0])
    assert torch.equal(reloaded.encode(values), first.encode(values))

    other = ts.modality.TimeSeries(ts.modality.TimeSeriesOptions(n_bins=32), state_dir)
    with pytest.raises(MotError, match=r"n_bins': 16.*n_bins': 32"):
        other.prepare(iter(()))


def test_encode_rejects_nan_and_multidimensional_payloads(ts, tmp_path):
    modality = fitted_modality(ts, tmp_path / "state", n_bins=16)
    with pytest.raises(MotError, match="non-finite value"):
        modality.encode(np.array([1.0, np.nan, 3.0]))
    with pytest.raises(MotError, match=r"1-D arrays, got shape \(2, 2\)"):
        modality.encode(np.ones((2, 2)))


def test_val_split_is_the_tail_of_each_series(ts):
    options = ts.datasource.TimeSeriesCSVOptions(
        files=[bundled(ts, "SUNACTIVITY")], window=16, stride=8, val_fraction=0.25
    )
    source = ts.datasource.TimeSeriesCSV(options)
    series = ts.datasource.load_series(bundled(ts, "SUNACTIVITY")).values  # one value a year from 1700
    split = ts.datasource.split_point(len(series), 0.25, "sunspots")
    assert split == len(series) - round(0.25 * len(series))

    def start_year(doc) -> int:
        caption = doc.segments[0].payload
        assert doc.segments[0].modality == "text" and caption.startswith("Yearly sunspot numbers from ")
        return int(re.search(r"from (\d{4}) to (\d{4}):$", caption).group(1))

    val = source.documents("val")
    val_values = np.concatenate([d.segments[1].payload for d in val])
    np.testing.assert_array_equal(val_values, series[split:])  # the whole tail, once, in order
    assert start_year(val[0]) == 1700 + split

    train = source.documents("train")
    for doc in train:
        start = start_year(doc) - 1700
        values = doc.segments[1].payload
        assert start + len(values) <= split, "a training window reaches into the held-out years"
        np.testing.assert_array_equal(values, series[start : start + len(values)])
    assert start_year(train[-1]) - 1700 + len(train[-1].segments[1].payload) == split  # the newest training year is used


@pytest.mark.parametrize(
    "csv_text, spec_changes, message",
    [
        (None, {"path": "no/such/file.csv"}, r"no/such/file\.csv: file not found"),
        ("YEAR,SUNACTIVITY\n1700,5\n", {"value_column": "sunspots"}, r"has no column 'sunspots' \(columns: YEAR, SUNACTIVITY\)"),
        ("YEAR,SUNACTIVITY\n1700,\n1701,NA\n", {}, r"column 'SUNACTIVITY' has no values"),
        ("YEAR,SUNACTIVITY\n1700,many\n", {}, r"line 2: 'many' in column 'SUNACTIVITY' is not a number"),
    ],
    ids=["missing file", "missing column", "empty series", "non-numeric value"],
)
def test_bad_csv_input_raises_a_one_line_mot_error(ts, tmp_path, csv_text, spec_changes, message):
    path = tmp_path / "series.csv"
    if csv_text is not None:
        path.write_text(csv_text)
    spec = bundled(ts, "SUNACTIVITY").model_copy(update={"path": str(path), **spec_changes})
    source = ts.datasource.TimeSeriesCSV(ts.datasource.TimeSeriesCSVOptions(files=[spec]))
    with pytest.raises(MotError, match=message) as caught:
        source.documents("train")
    assert "\n" not in str(caught.value)


def test_options_reject_unknown_keys_and_bad_captions(ts):
    where = "mixture.datasets.timeseries_csv.options"
    with pytest.raises(MotError, match=r"unknown key 'mixture\.datasets\.timeseries_csv\.options\.windw' \(did you mean 'window'\?\)"):
        validate_section(ts.datasource.TimeSeriesCSVOptions, {"windw": 32}, where)
    bad_file = {"path": "x.csv", "value_column": "v", "time_column": "t", "caption": "From {begin}:"}
    with pytest.raises(MotError, match=r"files\.0\.caption: .*placeholders \{start\} and \{end\}"):
        validate_section(ts.datasource.TimeSeriesCSVOptions, {"files": [bad_file]}, where)


def test_forecast_evaluator_reports_loss_and_bits_per_value(ts, tmp_path):
    modality = fitted_modality(ts, tmp_path / "state", n_bins=16)
    evaluator = ts.evaluator.ForecastEvaluator(modality)
    ln2 = math.log(2)
    # Two predictions of values (bins 3 and 15), one of another modality's token (local id
    # outside [0, 16)), one position without a target.
    losses = torch.tensor([2 * ln2, 4 * ln2, 5.0, 7.0])
    valid = torch.tensor([True, True, True, False])
    local_targets = torch.tensor([3, 15, -40, -100])
    evaluator.update(losses, valid, local_targets)
    metrics = evaluator.compute()
    assert metrics["loss"] == pytest.approx((6 * ln2 + 5.0) / 3)
    assert metrics["bits_per_value"] == pytest.approx(3.0)  # (2 + 4) bits over 2 values
    evaluator.reset()
    assert evaluator.compute() == {}


def test_hooks_register_everything_through_the_plugin_manager(ts):
    from importlib.metadata import entry_points

    from registry.manager import ENTRY_POINT_GROUP, build_registry

    # Registered in code, unless a developer has pip-installed the example into this
    # environment, in which case its entry point already registers the same module.
    installed = any(ep.value == "mot_timeseries" for ep in entry_points(group=ENTRY_POINT_GROUP))
    registry = build_registry() if installed else build_registry(extra_plugins=(ts.package,))
    assert registry.get("modalities", "timeseries", "test") is ts.modality.TimeSeries
    assert registry.get("datasets", "timeseries_csv", "test") is ts.datasource.TimeSeriesCSV
    assert registry.get("evaluators", "timeseries_forecast", "test") is ts.evaluator.ForecastEvaluator
    assert registry.tower_defaults("timeseries") == {"qk_norm": False}
    assert registry.tower_defaults("text") == {}
