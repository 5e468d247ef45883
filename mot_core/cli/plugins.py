"""``mot plugins``: registered plugins and what each contributes; ``mot plugins check``: the
conformance check for plugin authors."""

from __future__ import annotations

import argparse


def cmd_plugins(ns: argparse.Namespace) -> int:
    from registry import get_registry
    from registry.manager import SINGULAR

    registry = get_registry()
    print("plugins (entry-point group mot.plugins):")
    for info in registry.plugins:
        print(f"  {info.name:<16} {info.module:<28} from {info.distribution}")
    print("contributions:")
    for kind, name, info in registry.contributions():
        print(f"  {SINGULAR[kind]:<10} {name:<16} by {info.name}")
    return 0


def cmd_plugins_check(ns: argparse.Namespace) -> int:
    """One PASS/FAIL/SKIP line per check, then "N passed, M skipped, K failed". Exit 2 if a
    check failed, like every other error of this CLI; a SKIP is not a failure (the check could
    not run here), but it is counted, never reported as passed."""
    from mot_core.distributed.native_read import RayPartReader
    from mot_core.testing import check_plugins, summary_of

    ray_reader = RayPartReader()  # a local Ray instance, started only for a source with Ray Data reads
    try:
        reports = check_plugins(ns.names or None, config_paths=ns.config or None, read_part_rows=ray_reader)
    finally:
        ray_reader.close()
    print(summary_of(reports))
    return 0 if all(report.ok for report in reports) else 2


def register(sub) -> None:
    p = sub.add_parser("plugins", help="list registered plugins and what they contribute; `mot plugins check NAME`")
    p.set_defaults(func=cmd_plugins)
    actions = p.add_subparsers(dest="plugins_command", required=False)
    check = actions.add_parser("check", help="conformance check of plugins (default: all): one PASS/FAIL/SKIP line "
                               "per check, then 'N passed, M skipped, K failed'; exit 2 if any failed")
    check.add_argument("names", nargs="*", help="entry-point names of the plugins to check (see `mot plugins`)")
    check.add_argument("--config", action="append", default=[],
                       help="take data sources, modalities and options from this run config (and its run.dir's "
                       "fitted tokenizers) instead of each plugin's defaults; repeatable, each checked")
    check.set_defaults(func=cmd_plugins_check)
