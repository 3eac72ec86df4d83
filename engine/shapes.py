"""Hand a GGUF model's shape to the simulator: the sim reads no files, the engine reads the header."""

from __future__ import annotations

from collections import Counter

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


def gguf_bytes_per_weight(reader: gguf.GGUFReader) -> float:
    """Bytes per weight of the file's main format (the most common type among its 2-D weights,
    as in ModelConfig.quantization): block bytes / block size, e.g. Q4_1 20/32, Q4_0 18/32,
    Q8_0 34/32, F16 2, F32 4. A differently stored embedding (SmolLM2's Q8_0) is not counted."""
    types = Counter(t.tensor_type for t in reader.tensors if t.name.endswith(".weight") and len(t.shape) == 2)
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[types.most_common(1)[0][0]]
    return block_bytes / block_size


def gguf_model_shape(path: str) -> ModelShape:
    """The shape of a .gguf file (or a known model name) at the file's own bytes per weight."""
    reader = gguf.GGUFReader(resolve_model(path))
    return model_shape(ModelConfig.from_gguf(reader), gguf_bytes_per_weight(reader))
