"""``mot compare``: final validation metrics of runs side by side, and their loss curves."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from mot_core.bench.matching import ema
from mot_core.cli.common import output_file
from mot_core.errors import MotError
from mot_core.plotting import finish, panels


def expand_sweeps(runs: list[Path]) -> list[Path]:
    """A sweep's folder (``mot sweep``: sweep.json and trials/) stands for its trials that ran."""
    out = []
    for run in runs:
        if (run / "sweep.json").is_file() and (run / "trials").is_dir():
            trials = sorted(t for t in (run / "trials").iterdir() if (t / "metrics.jsonl").is_file())
            if not trials:
                raise MotError(f"the sweep {run} has no trial with metrics yet")
            out.extend(trials)
        else:
            out.append(run)
    return out


def plot_runs(runs: list[Path], path: Path) -> None:
    """The loss curves of these runs (training EMA and validation points) in one figure."""
    _plot({run.name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
           for run in runs}, path)


SEED_SUFFIX = re.compile(r"_seed\d+$")


def seed_groups(names: list[str]) -> dict[str, list[str]]:
    """Run names grouped by their name without a trailing ``_seed<N>`` (``chameleon_mot``,
    ``chameleon_mot_seed1``, ``chameleon_mot_seed2`` -> ``chameleon_mot``), in order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(SEED_SUFFIX.sub("", name), []).append(name)
    return groups


def compare_runs(runs: list[Path], plot: Path | None, seeds: bool = False) -> str:
    """A table of each run's final validation metrics side by side, and their loss curves;
    with ``seeds``, then each metric's mean and sample standard deviation per group of runs
    that differ only by a ``_seed<N>`` suffix."""
    runs = expand_sweeps(runs)
    records = {}
    for run in runs:
        file = run / "metrics.jsonl"
        if not file.is_file():
            raise MotError(f"no metrics.jsonl in {run}")
        records[run.name] = [json.loads(line) for line in file.read_text().splitlines() if line]
    finals = {name: next((r for r in reversed(recs) if any(k.startswith("val/") for k in r)), {}) for name, recs in records.items()}
    missing = [name for name, final in finals.items() if not final]
    if missing:
        raise MotError(f"run {missing[0]} has no validation metrics in its metrics.jsonl (it logs them every "
                       "train.eval_every steps and at its last step): let it reach one, or run `mot eval` on it")
    keys = sorted({k for f in finals.values() for k in f if k.startswith("val/") and k.endswith("/loss")})
    width = max(len(k) for k in keys + ["metric"])
    names = list(records)
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{n:>22}" for n in names)]
    lines.append(f"{'step':<{width}}  " + "  ".join(f"{finals[n].get('step', float('nan')):>22}" for n in names))
    for key in keys:
        lines.append(f"{key:<{width}}  " + "  ".join(f"{finals[n].get(key, float('nan')):>22.4f}" for n in names))
    if seeds:
        groups = seed_groups(names)
        lines.append("")
        lines.append(f"{'mean +- sd over seeds':<{width}}  " + "  ".join(f"{g + f' ({len(m)})':>22}" for g, m in groups.items()))
        for key in keys:
            cells = []
            for members in groups.values():
                values = np.array([finals[n][key] for n in members if key in finals[n]], dtype=np.float64)
                sd = float(values.std(ddof=1)) if values.size > 1 else float("nan")
                cells.append(f"{values.mean():.3f} +- {sd:.3f}" if values.size else "nan")
            lines.append(f"{key:<{width}}  " + "  ".join(f"{c:>22}" for c in cells))
    if plot is not None:
        _plot(records, plot)
        lines.append(f"plot: {plot}")
    return "\n".join(lines)


def _plot(records: dict[str, list[dict]], path: Path) -> None:
    modalities = sorted({k.split("/")[1] for recs in records.values() for r in recs for k in r if k.startswith("loss/")})
    fig, axes = panels(len(modalities), width=5.0, height=3.6)
    for ax, modality in zip(axes, modalities):
        for name, recs in records.items():
            steps = [r["step"] for r in recs if f"loss/{modality}" in r]
            values = np.array([r[f"loss/{modality}"] for r in recs if f"loss/{modality}" in r])
            line, = ax.plot(steps, ema(values, 0.9), label=f"{name} (train, EMA 0.9)", alpha=0.9)
            val = [(r["step"], r[f"val/{modality}/loss"]) for r in recs if f"val/{modality}/loss" in r]
            if val:
                ax.plot(*zip(*val), "o--", color=line.get_color(), label=f"{name} (val)")
        ax.set_title(f"{modality} loss")
    finish(fig, axes, path)


def cmd_compare(ns: argparse.Namespace) -> int:
    plot = output_file(ns.plot, "--plot") if ns.plot else None
    print(compare_runs([Path(r) for r in ns.runs], plot, seeds=ns.seeds))
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="final validation losses of runs side by side, and their loss curves")
    p.add_argument("runs", nargs="+")
    p.add_argument("--plot", default=None, help="write the loss curves to this PNG")
    p.add_argument("--seeds", action="store_true", help="also the mean and standard deviation of each metric over "
                   "runs named alike but for a _seed<N> suffix (NAME, NAME_seed1, NAME_seed2)")
    p.set_defaults(func=cmd_compare)
