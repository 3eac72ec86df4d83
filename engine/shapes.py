"""Hand a GGUF model's shape to the simulator: the sim reads no files, the engine reads the header."""

from __future__ import annotations

import gguf

from engine.config import ModelConfig
from engine.fetch import resolve_model
from sim.shapes import ModelShape


def model_shape(cfg: ModelConfig, bytes_per_weight: float = 2.0) -> ModelShape:
    return ModelShape(
        name=cfg.name, n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, d_ffn=cfg.d_ffn,
        vocab_size=cfg.vocab_size, tied_embeddings=cfg.tied_embeddings,
        context_length=cfg.context_length, bytes_per_weight=bytes_per_weight,
    )


def gguf_model_shape(path: str) -> ModelShape:
    """The shape of a .gguf file (or a known model name), at the sim's default 16-bit weights."""
    return model_shape(ModelConfig.from_gguf(gguf.GGUFReader(resolve_model(path))))
