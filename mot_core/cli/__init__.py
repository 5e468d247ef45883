"""The ``mot`` command line, one module per command group. Input errors print one line and
exit 2; never a traceback."""

from __future__ import annotations

import argparse
import sys

from mot_core.cli import bench, compare, data, export, generate, launch, plugins, sweep, train
from mot_core.cli.common import Parser
from mot_core.errors import MotError

COMMAND_MODULES = (train, launch, sweep, plugins, data, generate, compare, export, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mot", description="Mixture-of-Transformers training framework")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may stand anywhere after the config,
    options included (``mot launch CONFIG --num-workers 2 train.steps=4``), in their order."""
    parser = build_parser()
    ns, extras = parser.parse_known_args(argv)
    if extras:
        stray = [arg for arg in extras if arg.startswith("-") or "=" not in arg]
        if stray or not hasattr(ns, "overrides"):
            command = f"mot {ns.command}"
            sys.stderr.write(f"error: {command}: unrecognized arguments: {' '.join(stray or extras)} "
                             f"(see {command} --help)\n")
            raise SystemExit(2)
        ns.overrides = [*ns.overrides, *extras]
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    try:
        return ns.func(ns)
    except MotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mot ... | head` closed the pipe: nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141

