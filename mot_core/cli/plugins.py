"""``mot plugins``: registered plugins and what each contributes."""

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


def register(sub) -> None:
    p = sub.add_parser("plugins", help="list registered plugins and what they contribute")
    p.set_defaults(func=cmd_plugins)
