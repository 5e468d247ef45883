"""Helpers shared by the command modules."""

from __future__ import annotations

import argparse


def load_config(config_path: str, overrides: list[str]):
    """YAML + overrides + plugin tower defaults -> validated ``RunConfig``."""
    from mot_core.config import load_raw_config, validate_config
    from mot_core.train.experiment import apply_tower_defaults

    return validate_config(apply_tower_defaults(load_raw_config(config_path, overrides)))


def config_command(sub, group: str, name: str, help_text: str, func) -> argparse.ArgumentParser:
    """``mot GROUP NAME CONFIG [key=value ...]``; GROUP's parser is created on first use."""
    groups = sub.choices
    if group not in groups:
        group_parser = sub.add_parser(group, help=f"{group} tools")
        group_parser.add_subparsers(dest=f"{group}_command", required=True)
    group_sub = next(a for a in groups[group]._actions if isinstance(a, argparse._SubParsersAction))
    p = group_sub.add_parser(name, help=help_text)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100")
    p.set_defaults(func=func)
    return p
