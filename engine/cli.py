"""The `wafer` command. Each subcommand lives next to the code it drives and registers itself
with ``add_parsers(subparsers)``; heavy imports (Numba, gRPC) happen only when a command runs."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from engine import fetch

# Modules that contribute subcommands, each with add_parsers(subparsers).
SUBCOMMAND_MODULES = [
    "engine.generate_cli",  # generate
    "engine.server.cli",  # serve, chat
    "sim.cli",  # sim plan / run / plot / trace
]


def _models_pull(args: argparse.Namespace) -> int:
    for name in args.names:
        fetch.pull(name)
    return 0


def _models_list(args: argparse.Namespace) -> int:
    for m in fetch.KNOWN_MODELS.values():
        path = fetch.cached_path(m)
        state = str(path) if path.exists() else "not downloaded"
        print(f"{m.name:16s} {', '.join(m.aliases):30s} {state}")
    return 0


def _add_models_parser(sub) -> None:
    p = sub.add_parser("models", help="fetch and list known models")
    msub = p.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="download a known model into the cache (WAFER_HOME)")
    pull.add_argument("names", nargs="+", metavar="NAME")
    pull.set_defaults(func=_models_pull)
    ls = msub.add_parser("list", help="known models and where they are cached")
    ls.set_defaults(func=_models_list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wafer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_models_parser(sub)
    for name in SUBCOMMAND_MODULES:
        module = importlib.import_module(name)
        if name == "sim.cli":  # the sim reads no files: the engine hands it GGUF shapes
            from engine.shapes import gguf_model_shape

            module.add_parsers(sub, load_gguf_shape=gguf_model_shape)
        else:
            module.add_parsers(sub)
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
