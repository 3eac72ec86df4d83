"""`wafer sim ...`: the simulator's own command line (sim/cli.py), handed the engine's reader of
GGUF headers so that `--model x.gguf` works (the sim reads no files itself)."""

from __future__ import annotations


def add_parsers(sub) -> None:
    from sim import cli

    cli.add_parsers(sub, load_gguf_shape=gguf_shape)


def gguf_shape(path: str):
    from engine.shapes import gguf_model_shape

    return gguf_model_shape(path)
