"""`wafer bench serve | sessions | gate`: the load generator, the session-vs-fresh bench and the perf
gate (their code lives in benches/; imported only when the command runs)."""

from __future__ import annotations

import importlib

COMMANDS = {
    "serve": ("benches.loadgen.serve", "load a wafer.v1 server: TTFT, ITL, TPOT, throughput, goodput "
                                       "(vllm bench serve's JSON keys)"),
    "sessions": ("benches.sessions", "a multi-turn chat: persistent Session vs a fresh channel or request per turn"),
    "gate": ("benches.gate", "the perf-regression gate against benches/baseline.json"),
    "soak": ("benches.bench_soak", "a long mixed load: server RSS, fds, threads and p99 latency over time"),
}


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: serve (load generator), sessions, gate, soak")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        q = bsub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).split("\n")[0] + "\n\n"
                            + "\n".join((mod.__doc__ or "").split("\n")[1:]),
                            formatter_class=_formatter())
        mod.add_arguments(q)
        q.set_defaults(func=_runner(name, module, q))


def _formatter():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _runner(name: str, module: str, parser):
    def run(args) -> int:
        mod = importlib.import_module(module)
        if name == "gate" and args.rounds < 1:
            parser.error(f"--rounds={args.rounds} must be at least 1")
        return mod.run(args)
    return run
