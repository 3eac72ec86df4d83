"""`wafer models pull|list`: fetch known models into the cache (WAFER_HOME) and list them."""

from __future__ import annotations

import argparse

from engine import fetch


def add_parsers(sub) -> None:
    p = sub.add_parser("models", help="fetch and list known models")
    msub = p.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="download a known model into the cache (WAFER_HOME)")
    pull.add_argument("names", nargs="+", metavar="NAME")
    pull.set_defaults(func=pull_cmd)
    ls = msub.add_parser("list", help="known models and where they are cached")
    ls.set_defaults(func=list_cmd)


def pull_cmd(args: argparse.Namespace) -> int:
    for name in args.names:
        fetch.pull(name)
    return 0


def list_cmd(args: argparse.Namespace) -> int:
    for m in fetch.KNOWN_MODELS.values():
        path = fetch.cached_path(m)
        state = str(path) if path.exists() else "not downloaded"
        print(f"{m.name:16s} {', '.join(m.aliases):30s} {state}")
    return 0
