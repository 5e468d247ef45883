"""``mot sweep``: a grid of ``mot train`` runs on Ray Tune, then their table and loss curves."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from mot_core import filesystems
from mot_core.cli.common import positive_int


def format_table(rows: list[dict], metric: str) -> str:
    """One line per trial, best first: the swept values, its status, the ranking metric and
    the final per-modality validation losses (read from the trial's metrics.jsonl)."""
    columns = list(dict.fromkeys(k for r in rows for k in r["values"]))
    losses = sorted({k for r in rows for k in r["val_losses"]})
    header = ["trial", *columns, "status", metric, *[k for k in losses if k != metric]]
    lines = [" | ".join(header)]
    for row in rows:
        cells = [row["trial"], *(json.dumps(row["values"].get(c)) if not isinstance(row["values"].get(c), str)
                                 else row["values"][c] for c in columns)]
        status = {"stopped early": f"stopped at step {row['steps']}",
                  "interrupted": f"interrupted at step {row['steps']}"}.get(row["status"], row["status"])
        cells += [status, "-" if row["metric"] is None else f"{row['metric']:.4f}"]
        cells += [f"{row['val_losses'][k]:.4f}" if k in row["val_losses"] else "-" for k in losses if k != metric]
        lines.append(" | ".join(str(c) for c in cells))
    return "\n".join(lines)


def cmd_sweep(ns: argparse.Namespace) -> int:
    from mot_core.cli.compare import plot_runs
    from mot_core.distributed.launch import check_address
    from mot_core.distributed.sweep import plan_sweep, read_results, run_sweep

    plan = plan_sweep(ns.config, ns.overrides, ns.grid, ns.out, ns.samples, ns.scheduler, ns.metric)
    if ns.address:
        check_address(ns.address)
    print(f"sweep: {len(plan.trials)} trials in {filesystems.join(plan.shown, 'trials')} (ranked by {plan.metric}, "
          f"scheduler {plan.sweep.scheduler})", flush=True)
    try:
        interrupted = run_sweep(plan, ns.address)
    except KeyboardInterrupt:  # before Ray Tune took over Ctrl-C: preparing the data, starting Ray
        print(f"interrupted before the trials finished; resume with the same command: {_command(ns)}",
              file=sys.stderr, flush=True)
        return 130
    rows = read_results(plan, interrupted)
    table = format_table(rows, plan.metric)
    (plan.out / "results.md").write_text(table + "\n")
    (plan.out / "results.json").write_text(json.dumps(rows, indent=2))
    figure = plan.out / "loss_curves.png"
    plot_runs([plan.out / "trials" / r["trial"] for r in rows if r["steps"]], figure)
    mirror = plan.root_mirror()
    if mirror is not None:
        mirror.push()
    print(table)
    shown = plan.shown
    print(f"table: {filesystems.join(shown, 'results.md')}; loss curves: {filesystems.join(shown, 'loss_curves.png')}; "
          f"`mot compare {plan.out}` compares the trials" + (" (this machine's copy of them)" if plan.uri else ""))
    if interrupted:  # Ctrl-C: Ray Tune stopped the trials and saved its state; not a finished sweep
        at = {r["trial"]: r["steps"] for r in rows}
        shown = ", ".join(f"{name} at step {at.get(name, 0)}" if at.get(name) else f"{name} not started"
                          for name in interrupted)
        print(f"interrupted: {len(interrupted)} trial(s) unfinished ({shown}); resume with the same command, which "
              f"keeps finished and early-stopped trials and continues the others from their checkpoints: "
              f"{_command(ns)}", file=sys.stderr, flush=True)
        return 130
    return 0


def _command(ns: argparse.Namespace) -> str:
    """The ``mot sweep`` command line of ``ns``: what resumes the sweep."""
    words = ["mot", "sweep", ns.config, *ns.overrides]
    for item in ns.grid:
        words += ["--grid", item]
    for flag, value in (("--samples", ns.samples), ("--scheduler", ns.scheduler), ("--metric", ns.metric),
                        ("--out", ns.out), ("--address", ns.address)):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of mot train trials on Ray Tune (resumable), then their table")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and the values to try (repeatable; adds to the config's sweep.grid)")
    p.add_argument("--samples", type=positive_int, default=None, help="repeats of every combination (seeds differ)")
    p.add_argument("--scheduler", choices=["fifo", "asha"], default=None, help="asha: stop weak trials early")
    p.add_argument("--metric", default=None, help="the metric that ranks trials (default val/<first modality>/loss)")
    p.add_argument("--out", default=None, help="the sweep's folder (default: the base config's run.dir)")
    p.add_argument("--address", default=None, help="a Ray cluster (HEAD:6379); default a local one")
    p.set_defaults(func=cmd_sweep)
