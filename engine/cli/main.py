"""The `wafer` command: an inference server emulator for wafer-scale hardware.

Each subcommand is a module of engine/cli that registers itself with ``add_parsers(subparsers)``;
heavy imports (Numba, gRPC) happen only when a command runs."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from engine import fetch

# Modules that contribute subcommands, each with add_parsers(subparsers), in `wafer --help` order.
SUBCOMMAND_MODULES = [
    "engine.cli.models",  # models pull / list
    "engine.cli.generate",  # generate
    "engine.cli.serve",  # serve
    "engine.cli.chat",  # chat
    "engine.cli.sim",  # sim plan / run / plot / trace ... (sim/cli.py)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wafer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except fetch.ModelNotFound as e:
        print(f"wafer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `wafer ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit would fail again
        return 141


if __name__ == "__main__":
    sys.exit(main())
