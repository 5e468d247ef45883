"""``mot bench step-match``: train dense and MoT twins (and optionally the MoE-4x baseline) on
the same data and budget, then find, per modality, the step at which each sparse twin first
reaches the dense model's final loss (training loss smoothed, and validation loss), as in the
paper's Figures 5 and 19."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from mot_core.bench.matching import Match, ema, match_curves
from mot_core.plotting import finish, panels
from mot_core.runs.start import resolve_local_config, train_locally

TIED = {"ffn": False, "attention": False, "norm": False}
UNTIED = {"ffn": True, "attention": True, "norm": True}
# The paper's MoE-4x baseline: dense attention and norms, 4 expert-choice experts per FFN.
MOE4X = {"type": "moe", "experts": 4, "router": "expert_choice", "capacity_factor": 1.0}
TWINS = {"dense": (TIED, {"type": "swiglu"}), "mot": (UNTIED, {"type": "swiglu"}), "moe4x": (TIED, MOE4X)}
LABELS = {"dense": "dense", "mot": "MoT", "moe4x": "MoE-4x"}
COLORS = {"dense": "tab:gray", "mot": "tab:blue", "moe4x": "tab:orange"}


def twin_config(raw: dict, variant: str, out_dir: Path, steps: int | None) -> dict:
    """The base config (YAML + overrides, before the front door) with only the towers (untie,
    FFN kind; per-modality tower FFNs and groups removed), the run dir and optionally the steps
    changed; the plugins' tower defaults are applied to it as to any config."""
    data = copy.deepcopy(raw)
    untie, ffn = TWINS[variant]
    model = data.setdefault("model", {})
    model["untie"], model["ffn"] = dict(untie), dict(ffn)
    for entry in ((data.get("mixture") or {}).get("modalities") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("tower"), dict):
            entry["tower"].pop("ffn", None)
            entry["tower"].pop("group", None)
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


def plot(curves: dict[str, dict], matches: dict[str, dict], smoothing: float, path: Path) -> None:
    """One panel per modality: every twin's smoothed training and validation curves, and a
    star where each sparse twin reaches the dense model's final loss."""
    names = list(next(iter(matches.values())))
    fig, axes = panels(len(names))
    for ax, m in zip(axes, names):
        for variant, c in curves.items():
            color, label = COLORS[variant], LABELS[variant]
            ax.plot(c["steps"], ema(c["train"][m], smoothing), color=color, label=f"{label} train (EMA {smoothing})")
            val = c["val"][m]
            ax.plot(val[:, 0], val[:, 1], "o--", color=color, markersize=3, label=f"{label} val")
        for variant, per_modality in matches.items():
            for kind, style in (("train", "-"), ("val", ":")):
                match = per_modality[m][kind]
                ax.axhline(match.target, color="tab:red", linestyle=style, linewidth=0.8)
                if match.step is not None:
                    ax.plot([match.step], [match.target], marker="*", markersize=14, color=COLORS[variant])
                    ax.annotate(f"{LABELS[variant]} {kind}: {match.step_fraction:.0%}", (match.step, match.target),
                                textcoords="offset points", xytext=(-12, -14 if kind == "train" else 8), ha="right",
                                fontsize=8, color=COLORS[variant])
        ax.set_title(f"{m}: reaching dense's final loss")
        ax.set_ylabel("loss")
    finish(fig, axes, path)


def run_step_match(raw: dict, out_dir: Path, steps: int | None, smoothing: float, variants: tuple[str, ...] = ("dense", "mot")
                   ) -> dict:
    for variant in variants:
        train_locally(resolve_local_config(twin_config(raw, variant, out_dir, steps)))  # resumes if interrupted
    curves = {v: load_curves(out_dir / v) for v in variants}
    dense = curves["dense"]
    matches = {v: compare(dense, curves[v], smoothing) for v in variants if v != "dense"}
    plot_path = out_dir / "step_match.png"
    plot(curves, matches, smoothing, plot_path)
    report = {
        "steps": int(dense["steps"][-1]), "smoothing": smoothing, "plot": str(plot_path),
        "seconds": {v: float(c["times"][-1]) for v, c in curves.items()},
        "variants": {v: {m: {k: r.as_dict() for k, r in kinds.items()} for m, kinds in per.items()}
                     for v, per in matches.items()},
    }
    (out_dir / "step_match.json").write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    lines = [f"{'twin':<7} {'modality':<16} {'curve':<6} {'dense final':>11} {'step':>6} {'of steps':>9} {'of time':>8}"]
    for variant, per_modality in report["variants"].items():
        for m, kinds in per_modality.items():
            for kind, r in kinds.items():
                step = "never" if r["step"] is None else f"{r['step']:.0f}"
                frac = "-" if r["step_fraction"] is None else f"{r['step_fraction']:.1%}"
                tfrac = "-" if r["time_fraction"] is None else f"{r['time_fraction']:.1%}"
                lines.append(f"{LABELS[variant]:<7} {m:<16} {kind:<6} {r['target']:>11.4f} {step:>6} {frac:>9} {tfrac:>8}")
    seconds = ", ".join(f"{LABELS[v]} {s:.0f} s" for v, s in report["seconds"].items())
    lines.append(f"budget {report['steps']} steps; training time: {seconds}; train curves smoothed with EMA "
                 f"{report['smoothing']}; plot: {report['plot']}")
    return "\n".join(lines)
