"""Real time series from CSV files, each window captioned in text: a 2-modality document.

    "Yearly sunspot numbers from 1700 to 1763:"  |  5, 11, 16, 23, 36, ...  (64 values)
     text segment (caption from the time column)     timeseries segment (the window)

Held-out data is the last ``val_fraction`` of every series in time, so no value the model is
evaluated on was seen in training, and validation is a genuine forecast of the future.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from mot_core.errors import MotError
from mot_core.plugin_api import DataSource, PluginOptions, RawDocument, RawSegment, Split, fingerprint_files

DATA_DIR = Path(__file__).parent / "data"
MISSING = {"", "na", "nan", "null"}


class SeriesFile(PluginOptions):
    """One series: a value column of a CSV file and the time column that labels it."""

    path: str
    value_column: str
    time_column: str
    time_format: Literal["raw", "year", "yyyymmdd"] = Field(
        "raw", description="how time cells print in captions: verbatim, as a year, or YYYYMMDD as an ISO date"
    )
    caption: str = Field("Values from {start} to {end}:", description="text before each window; {start} {end} are times")
    difference: bool = Field(
        False, description="model the change from the previous value instead of the value (for a series that trends)"
    )

    @field_validator("caption")
    @classmethod
    def _caption_has_only_start_and_end(cls, caption: str) -> str:
        try:
            caption.format(start="", end="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"caption may use only the placeholders {{start}} and {{end}} ({exc!r})") from None
        return caption


def bundled_files() -> list[SeriesFile]:
    """The two real series shipped with the package (see the plugin's README for sources).

    CO2 is modelled as weekly changes: its level rises through the held-out decade above every
    training value, where absolute-level bins would all saturate into the top bin."""
    return [
        SeriesFile(
            path=str(DATA_DIR / "sunspots.csv"), value_column="SUNACTIVITY", time_column="YEAR",
            time_format="year", caption="Yearly sunspot numbers from {start} to {end}:",
        ),
        SeriesFile(
            path=str(DATA_DIR / "co2.csv"), value_column="co2", time_column="date", time_format="yyyymmdd",
            caption="Weekly change in Mauna Loa CO2 (ppm) from {start} to {end}:", difference=True,
        ),
    ]


class TimeSeriesCSVOptions(PluginOptions):
    files: list[SeriesFile] = Field(default_factory=bundled_files, min_length=1)
    window: int = Field(64, ge=2, description="values per document")
    stride: int = Field(32, ge=1, description="step between training windows (val windows never overlap)")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="the last fraction of each series, held out")
    modality: str = Field(
        "timeseries",
        description="the modality the windows are given to: 'timeseries' (binned tokens), 'timeseries_patches' "
        "(continuous patches), or any modality that takes 1-D arrays of real values",
    )


@dataclass(frozen=True)
class Series:
    """A loaded series. ``times``: (L,) captions' time labels; ``values``: (L,) float64."""

    times: tuple[str, ...]
    values: np.ndarray
    caption: str

    def document(self, start: int, stop: int, modality: str = "timeseries") -> RawDocument:
        """The captioned window ``values[start:stop]``, as a segment of ``modality``."""
        text = self.caption.format(start=self.times[start], end=self.times[stop - 1])
        return RawDocument((RawSegment("text", text), RawSegment(modality, self.values[start:stop])))


class TimeSeriesCSV(DataSource):
    """Captioned windows of CSV time series, split in time (train: head, val: tail)."""

    name = "timeseries_csv"
    Options = TimeSeriesCSVOptions
    modalities = ("text", "timeseries")

    def __init__(self, options: TimeSeriesCSVOptions):
        super().__init__(options)
        self.modalities = ("text", options.modality)

    def documents(self, split: Split) -> list[RawDocument]:
        opts: TimeSeriesCSVOptions = self.options
        docs = []
        for spec in opts.files:
            series = load_series(spec)
            split_at = split_point(len(series.values), opts.val_fraction, spec.path)
            if split == "train":
                spans = training_windows(0, split_at, opts.window, opts.stride)
            else:
                spans = held_out_windows(split_at, len(series.values), opts.window)
            docs.extend(series.document(a, b, opts.modality) for a, b in spans)
        return docs

    def fingerprint(self) -> str:
        """Name, size and modification time of each CSV file, and the options."""
        return fingerprint_files([spec.path for spec in self.options.files], extra=super().fingerprint(), contents=False)


def split_point(length: int, val_fraction: float, path: str) -> int:
    """Index of the first held-out value: the last ``val_fraction`` of the series is val."""
    n_val = int(round(length * val_fraction))
    if n_val < 2 or length - n_val < 2:
        raise MotError(
            f"dataset 'timeseries_csv': {path} has {length} values, too few to hold out "
            f"val_fraction={val_fraction} and still train (need at least 2 in each split)"
        )
    return length - n_val


def training_windows(start: int, stop: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[a, b) spans of ``window`` values every ``stride`` in [start, stop); the last span is
    moved to end at ``stop`` so the most recent training values are used too."""
    if stop - start <= window:
        return [(start, stop)]
    spans = [(a, a + window) for a in range(start, stop - window + 1, stride)]
    if spans[-1][1] < stop:
        spans.append((stop - window, stop))
    return spans


def held_out_windows(start: int, stop: int, window: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) spans of at most ``window`` values covering [start, stop) once, so
    every held-out value is scored exactly once."""
    return [(a, min(a + window, stop)) for a in range(start, stop, window)]


def load_series(spec: SeriesFile) -> Series:
    """Read one CSV column; rows with a missing value (empty, NA, NaN) are dropped, and with
    ``difference`` the values become ``v[i] - v[i-1]`` labelled with time ``i``."""
    path = Path(spec.path)
    where = f"dataset 'timeseries_csv': {path}"
    if not path.is_file():
        raise MotError(f"{where}: file not found")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            for column in (spec.time_column, spec.value_column):
                if column not in columns:
                    raise MotError(f"{where} has no column '{column}' (columns: {', '.join(columns) or 'none'})")
            times, values = [], []
            for row in reader:
                cell = (row[spec.value_column] or "").strip()
                if cell.lower() in MISSING:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    raise MotError(f"{where} line {reader.line_num}: '{cell}' in column '{spec.value_column}' is not a number") from None
                if not math.isfinite(value):
                    raise MotError(f"{where} line {reader.line_num}: value {cell} is not finite")
                times.append(_format_time(row[spec.time_column], spec.time_format, f"{where} line {reader.line_num}"))
                values.append(value)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MotError(f"{where}: cannot read: {exc}") from None
    if not values:
        raise MotError(f"{where}: column '{spec.value_column}' has no values")
    if spec.difference and len(values) < 2:
        raise MotError(f"{where}: column '{spec.value_column}' needs at least 2 values to take differences")
    series = np.asarray(values, dtype=np.float64)
    if spec.difference:
        return Series(tuple(times[1:]), np.diff(series), spec.caption)
    return Series(tuple(times), series, spec.caption)


def _format_time(cell: str | None, time_format: str, where: str) -> str:
    text = (cell or "").strip()
    try:
        if time_format == "year":
            return str(int(float(text)))
        if time_format == "yyyymmdd":
            return datetime.strptime(text, "%Y%m%d").date().isoformat()
    except ValueError:
        raise MotError(f"{where}: time '{text}' does not match time_format '{time_format}'") from None
    return text
