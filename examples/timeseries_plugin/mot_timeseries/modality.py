"""The time-series modality: real values -> quantile bins -> one token per value.

Tokenizer (fitted once per run on the training series, saved as JSON in the run's ``state_dir``):

    x  --signed log1p-->  t = sign(x) * log1p(|x|)  --quantile edges-->  bin id in [0, n_bins)

Quantile bins spend the vocabulary where the data is: a uniform grid would waste most ids on
the sparse upper tail of a skewed series such as sunspot counts. The edges are quantiles of the
*distinct* training values: real measurements are rounded (CO2 to 0.1 ppm), and quantiles of the
raw values would put many coinciding edges on repeated values, leaving ids that never occur
(75 of 256 bins used on the bundled data, against all 256 this way).

Why a fixed signed-log1p transform rather than per-series standardisation: a modality sees only
payloads (windows), not which series they come from, so "per series" could only mean per
window, and a window's mean and spread include its own future values: every prediction inside
the window would be conditioned on them, and ``decode`` could not give real units back without
them. The fixed transform keeps the level, so ``decode`` returns real units and the model can
tie the level to the caption's dates; it needs no state beyond the bins and accepts negative
values. Quantile edges barely depend on a monotone transform; what it changes is that a bin's
value (the mean of its training values) is taken in log space, a better centre for skewed,
positive data. The cost is that values beyond the training range fall into the outermost bins:
a series that trends out of its past range should be fed as differences (the data source's
``difference`` option, used for the bundled CO2 series).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from pydantic import Field

from mot_core.errors import MotError
from mot_core.plugin_api import Modality, PluginOptions

BINS_FILE = "bins.json"


class TimeSeriesOptions(PluginOptions):
    n_bins: int = Field(256, ge=2, le=65536, description="vocabulary size: one token per quantile bin")


def to_log_space(values: np.ndarray) -> np.ndarray:
    """(L,) real values -> (L,) sign(x) * log1p(|x|); monotone and invertible on all reals."""
    return np.sign(values) * np.log1p(np.abs(values))


def from_log_space(transformed: np.ndarray) -> np.ndarray:
    """Inverse of ``to_log_space``."""
    return np.sign(transformed) * np.expm1(np.abs(transformed))


def as_series(payload: Any) -> np.ndarray:
    """A payload -> (L,) float64 array; ``MotError`` unless it is 1-D, non-empty and finite."""
    try:
        values = np.asarray(payload, dtype=np.float64)
    except (TypeError, ValueError):
        raise MotError(f"timeseries segments must be 1-D arrays of numbers, got {type(payload).__name__}") from None
    if values.ndim != 1:
        raise MotError(f"timeseries segments must be 1-D arrays, got shape {values.shape}")
    if values.size == 0:
        raise MotError("timeseries segment is empty")
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise MotError(f"timeseries segment has a non-finite value ({values[bad]}) at index {bad}")
    return values


def read_fitted_state(file: Path, wanted: dict, what: str) -> dict | None:
    """The state a modality fitted and saved in its ``state_dir`` (None if there is none yet),
    refused with one line when it was fitted with other options than ``wanted``."""
    if not file.is_file():
        return None
    try:
        saved = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MotError(f"cannot read the {what} {file}: {exc}") from None
    if saved.get("options") != wanted:
        raise MotError(
            f"the {what} saved in {file.parent} were made with options {saved.get('options')}, "
            f"but the config asks for {wanted}; use a new run.dir or the same options"
        )
    return saved


def write_fitted_state(file: Path, wanted: dict, state: dict) -> None:
    """Save fitted state with the options it was fitted with, atomically."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"options": wanted, **state}))
    tmp.replace(file)


class TimeSeries(Modality):
    """A 1-D real-valued series, one token per value (causal, next-value prediction)."""

    name = "timeseries"
    Options = TimeSeriesOptions
    default_loss = "autoregressive"
    default_evaluators = ("timeseries_forecast",)

    def __init__(self, options: TimeSeriesOptions, state_dir: Path):
        super().__init__(options, state_dir)
        self.edges: np.ndarray | None = None  # (n_bins + 1,) quantile edges in log space
        self.centres: np.ndarray | None = None  # (n_bins,) value each bin decodes to, real units

    @property
    def _file(self) -> Path:
        return self.state_dir / BINS_FILE

    def prepare(self, train_payloads: Iterable[Any]) -> None:
        """Reload the bins saved in ``state_dir``, or fit them on the training series and save."""
        opts: TimeSeriesOptions = self.options
        wanted = opts.model_dump()
        saved = read_fitted_state(self._file, wanted, "timeseries bins")
        if saved is not None:
            self.edges = np.asarray(saved["edges"], dtype=np.float64)
            self.centres = np.asarray(saved["centres"], dtype=np.float64)
            return
        series = [as_series(p) for p in train_payloads]
        if not series:
            raise MotError("the timeseries modality has no training series to fit its bins on")
        self.edges, self.centres = fit_quantile_bins(np.concatenate(series), opts.n_bins)
        write_fitted_state(self._file, wanted, {"edges": self.edges.tolist(), "centres": self.centres.tolist()})

    @property
    def vocab_size(self) -> int:
        return self.options.n_bins

    def _require_bins(self) -> tuple[np.ndarray, np.ndarray]:
        if self.edges is None or self.centres is None:
            raise RuntimeError("TimeSeries.prepare() must run before the bins are used")
        return self.edges, self.centres

    def encode(self, payload: Any) -> torch.Tensor:
        """(L,) real values -> (L,) long bin ids in [0, n_bins); values beyond the training
        range fall into the first or last bin."""
        edges, _ = self._require_bins()
        ids = np.searchsorted(edges[1:-1], to_log_space(as_series(payload)), side="right")
        return torch.from_numpy(ids.astype(np.int64))

    def read_payload(self, path: Path) -> np.ndarray:
        """A series from a text file (the start of a series to continue, ``mot generate --prompt-file``)."""
        return read_series_file(path)

    def write_payloads(self, payloads: list, path: Path, captions: list[str] | None = None) -> Path:
        """Generated series as CSV, one per line: the prompt (quoted), then the values."""
        return write_series_csv(payloads, path, captions)

    def decode(self, ids: torch.Tensor) -> np.ndarray:
        """(L,) bin ids -> (L,) float64 values: the mean training value of each bin."""
        _, centres = self._require_bins()
        index = torch.as_tensor(ids).reshape(-1).cpu().numpy().astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= centres.size):
            raise MotError(f"timeseries ids must lie in [0, {centres.size}), got {index.min()}..{index.max()}")
        return centres[index]


def read_series_file(path: Path) -> np.ndarray:
    """A series from a text file: numbers separated by commas, spaces or newlines."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MotError(f"cannot read series file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        values = np.array([float(v) for v in text.replace(",", " ").split()], dtype=np.float64)
    except ValueError as exc:
        raise MotError(f"series file {path} holds something that is not a number ({exc})") from None
    if not values.size or not np.isfinite(values).all():
        raise MotError(f"series file {path} must hold finite numbers, at least one")
    return values


def write_series_csv(payloads: list, path: Path, captions: list[str] | None = None) -> Path:
    """Series as CSV, one per line: the caption (or prompt), then the values."""
    import csv

    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        for index, values in enumerate(payloads):
            label = captions[index] if captions and index < len(captions) else ""
            writer.writerow([label, *(f"{v:.6g}" for v in np.asarray(values, dtype=np.float64))])
    return path


def fit_quantile_bins(values: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) training values -> (edges (n_bins + 1,) in log space, centres (n_bins,) in real units).

    Edges are the 0, 1/n_bins, ..., 1 quantiles of the distinct log-space training values. A
    bin's centre is the mean (in log space, counting repeats) of the training values it
    receives; a bin that receives none (fewer distinct values than bins) decodes to the
    midpoint of its edges.
    """
    transformed = to_log_space(values)
    edges = np.quantile(np.unique(transformed), np.linspace(0.0, 1.0, n_bins + 1))
    ids = np.searchsorted(edges[1:-1], transformed, side="right")
    counts = np.bincount(ids, minlength=n_bins)
    sums = np.bincount(ids, weights=transformed, minlength=n_bins)
    midpoints = (edges[:-1] + edges[1:]) / 2
    centres = np.where(counts > 0, sums / np.maximum(counts, 1), midpoints)
    return edges, from_log_space(centres)
