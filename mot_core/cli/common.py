"""Helpers shared by the command modules."""

from __future__ import annotations

import argparse
from pathlib import Path

from mot_core.errors import MotError


def load_config(config_path: str, overrides: list[str]):
    """The config ``mot train CONFIG key=value ...`` would run (``resolve_local_config``)."""
    from mot_core.runs.start import resolve_local_config

    return resolve_local_config(config_path, overrides)


def group_command(sub, group: str, name: str, help_text: str, func) -> argparse.ArgumentParser:
    """``mot GROUP NAME ...``; GROUP's parser is created on first use."""
    if group not in sub.choices:
        group_parser = sub.add_parser(group, help=f"{group} tools")
        group_parser.set_defaults(commands=group_parser.add_subparsers(dest=f"{group}_command", required=True))
    p = sub.choices[group].get_default("commands").add_parser(name, help=help_text)
    p.set_defaults(func=func)
    return p


def config_command(sub, group: str, name: str, help_text: str, func) -> argparse.ArgumentParser:
    """``mot GROUP NAME CONFIG [key=value ...]``; GROUP's parser is created on first use."""
    p = group_command(sub, group, name, help_text, func)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100")
    return p


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is ONE line (``error: mot generate: argument --top-p:
    ...``), exit 2, like every other input error; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _number(kind, check, wanted: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    parse.__name__ = wanted
    return parse


seed_int = _number(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")
positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = _number(float, lambda v: v >= 0 and v == v and v != float("inf"), "a finite number >= 0")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
unit_fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def output_file(path: str, what: str):
    """A file a command will write: not a folder; its folder is created if missing."""
    target = Path(path)
    if target.is_dir():
        raise MotError(f"{what} {target} is a folder; give a file name, e.g. {target / 'out.png'}")
    if target.parent.exists() and not target.parent.is_dir():
        raise MotError(f"{what} {target}: {target.parent} is not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MotError(f"cannot create the folder of {what} {target}: {exc.strerror}") from None
    return target
