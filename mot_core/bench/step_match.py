"""``mot bench step-match``: train dense and MoT twins on the same data and budget, then find,
per modality, the step at which MoT first reaches the dense model's final loss (training loss
smoothed, and validation loss), as in the paper's Figures 5 and 19."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from mot_core.bench.matching import Match, ema, match_curves
from mot_core.config import validate_config
from mot_core.plotting import finish, panels
from mot_core.train.trainer import train

TWINS = {"dense": {"ffn": False, "attention": False, "norm": False}, "mot": {"ffn": True, "attention": True, "norm": True}}


def twin_config(raw: dict, variant: str, out_dir: Path, steps: int | None) -> dict:
    """The base config with only the tower settings, run dir (and optionally steps) changed."""
    data = copy.deepcopy(raw)
    data.setdefault("model", {})["untie"] = TWINS[variant]
    data.setdefault("run", {})["dir"] = str(out_dir / variant)
    if steps is not None:
        data.setdefault("train", {})["steps"] = steps
    return data


def load_curves(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = np.array([r["step"] for r in records], dtype=float)
    times = np.cumsum([r["step_time_s"] for r in records])
    modalities = sorted({k.split("/")[1] for r in records for k in r if k.startswith("loss/")})
    curves = {"steps": steps, "times": times, "train": {}, "val": {}}
    for m in modalities:
        # A modality can be absent from a batch; carry its previous value (rare, small batches).
        values = np.array([r.get(f"loss/{m}", np.nan) for r in records])
        for i in range(1, len(values)):
            if np.isnan(values[i]):
                values[i] = values[i - 1]
        curves["train"][m] = values
        val = [(r["step"], r[f"val/{m}/loss"]) for r in records if f"val/{m}/loss" in r]
        curves["val"][m] = np.array(val, dtype=float).reshape(-1, 2)
    return curves


def compare(dense: dict, mot: dict, smoothing: float) -> dict[str, dict[str, Match]]:
    out = {}
    for m in dense["train"]:
        train_match = match_curves(dense["steps"], dense["train"][m], dense["times"],
                                   mot["steps"], mot["train"][m], mot["times"], smoothing=smoothing)
        dv, mv = dense["val"][m], mot["val"][m]
        val_match = match_curves(dv[:, 0], dv[:, 1], np.interp(dv[:, 0], dense["steps"], dense["times"]),
                                 mv[:, 0], mv[:, 1], np.interp(mv[:, 0], mot["steps"], mot["times"]))
        out[m] = {"train": train_match, "val": val_match}
    return out


def plot(dense: dict, mot: dict, matches: dict, smoothing: float, path: Path) -> None:
    names = list(matches)
    fig, axes = panels(len(names))
    for ax, m in zip(axes, names):
        for label, curves, color in (("dense", dense, "tab:gray"), ("MoT", mot, "tab:blue")):
            ax.plot(curves["steps"], ema(curves["train"][m], smoothing), color=color, label=f"{label} train (EMA {smoothing})")
            val = curves["val"][m]
            ax.plot(val[:, 0], val[:, 1], "o--", color=color, markersize=3, label=f"{label} val")
        for kind, style in (("train", "-"), ("val", ":")):
            match = matches[m][kind]
            ax.axhline(match.target, color="tab:red", linestyle=style, linewidth=0.8)
            if match.step is not None:
                ax.plot([match.step], [match.target], marker="*", markersize=14, color="tab:red")
                ax.annotate(f"{kind}: {match.step_fraction:.0%} of steps", (match.step, match.target),
                            textcoords="offset points", xytext=(-12, -14 if kind == "train" else 8), ha="right",
                            fontsize=8, color="tab:red")
        ax.set_title(f"{m}: MoT reaching dense's final loss")
        ax.set_ylabel("loss")
    finish(fig, axes, path)


def run_step_match(raw: dict, out_dir: Path, steps: int | None, smoothing: float) -> dict:
    for variant in TWINS:
        train(validate_config(twin_config(raw, variant, out_dir, steps)))  # resumes if interrupted
    dense, mot = load_curves(out_dir / "dense"), load_curves(out_dir / "mot")
    matches = compare(dense, mot, smoothing)
    plot_path = out_dir / "step_match.png"
    plot(dense, mot, matches, smoothing, plot_path)
    report = {
        "steps": int(dense["steps"][-1]), "smoothing": smoothing, "plot": str(plot_path),
        "dense_seconds": float(dense["times"][-1]), "mot_seconds": float(mot["times"][-1]),
        "modalities": {m: {k: v.as_dict() for k, v in kinds.items()} for m, kinds in matches.items()},
    }
    (out_dir / "step_match.json").write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    lines = [f"{'modality':<10} {'curve':<6} {'dense final':>11} {'MoT step':>9} {'of steps':>9} {'of time':>8}"]
    for m, kinds in report["modalities"].items():
        for kind, r in kinds.items():
            step = "never" if r["step"] is None else f"{r['step']:.0f}"
            frac = "-" if r["step_fraction"] is None else f"{r['step_fraction']:.1%}"
            tfrac = "-" if r["time_fraction"] is None else f"{r['time_fraction']:.1%}"
            lines.append(f"{m:<10} {kind:<6} {r['target']:>11.4f} {step:>9} {frac:>9} {tfrac:>8}")
    lines.append(f"budget {report['steps']} steps; dense {report['dense_seconds']:.0f} s, MoT {report['mot_seconds']:.0f} s of "
                 f"training time; train curves smoothed with EMA {report['smoothing']}; plot: {report['plot']}")
    return "\n".join(lines)
