"""Model shapes: the plain numbers the simulator needs about a dense transformer.

The engine builds a `ModelShape` from a GGUF header; the presets below carry the public
hyper-parameters of the models the simulator is calibrated and demonstrated on (the models'
config.json files on Hugging Face). Parameter counts are derived from the shape, not stored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """A dense Llama-style decoder. Sizes are element counts unless the name says bytes."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ffn: int
    vocab_size: int
    tied_embeddings: bool
    context_length: int
    bytes_per_weight: float = 2.0  # 2.0 = 16-bit (default), 1.0 = 8-bit, 0.625 = GGUF Q4_1 (20 B / 32)
    kv_bytes_per_element: float = 2.0  # the KV cache stays 16-bit whatever the weights

    def __post_init__(self) -> None:
        for f in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ffn",
                  "vocab_size", "context_length"):
            if getattr(self, f) <= 0:
                raise ValueError(f"ModelShape {self.name}: {f}={getattr(self, f)} must be > 0")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelShape {self.name}: n_heads={self.n_heads} is not a multiple "
                             f"of n_kv_heads={self.n_kv_heads}")
        if self.bytes_per_weight <= 0 or self.kv_bytes_per_element <= 0:
            raise ValueError(f"ModelShape {self.name}: bytes per weight/KV element must be > 0")

    # --- derived sizes -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def qkv_dim(self) -> int:
        return self.q_dim + 2 * self.kv_dim

    @property
    def layer_params(self) -> int:
        """Weights of one transformer layer: Q, K, V, O, gate, up, down and two norms."""
        attn = self.d_model * self.qkv_dim + self.q_dim * self.d_model
        mlp = 3 * self.d_model * self.d_ffn
        return attn + mlp + 2 * self.d_model

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model

    @property
    def head_params(self) -> int:
        """Output projection plus final norm; zero extra matrix when tied to the embedding."""
        return (0 if self.tied_embeddings else self.vocab_size * self.d_model) + self.d_model

    @property
    def total_params(self) -> int:
        return self.n_layers * self.layer_params + self.embedding_params + self.head_params

    @property
    def weight_bytes(self) -> float:
        return self.total_params * self.bytes_per_weight

    @property
    def kv_bytes_per_token_per_layer(self) -> float:
        return 2 * self.kv_dim * self.kv_bytes_per_element

    @property
    def kv_bytes_per_token(self) -> float:
        return self.n_layers * self.kv_bytes_per_token_per_layer

    def with_precision(self, bits: int) -> "ModelShape":
        """The same model with 16- or 8-bit weights."""
        if bits not in (16, 8):
            raise ValueError(f"precision={bits} must be 16 or 8")
        return dataclasses.replace(self, bytes_per_weight=bits / 8)


PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in [
        ModelShape("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256, False, 131072),
        ModelShape("llama-3.1-70b", 80, 8192, 64, 8, 128, 28672, 128256, False, 131072),
        ModelShape("llama-3.1-405b", 126, 16384, 128, 8, 128, 53248, 128256, False, 131072),
        ModelShape("llama-3.2-1b", 16, 2048, 32, 8, 64, 8192, 128256, True, 131072),
        ModelShape("qwen3-32b", 64, 5120, 64, 8, 128, 25600, 151936, False, 40960),
        ModelShape("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152, True, 8192),
    ]
}


def get_shape(name: str, precision: int = 16) -> ModelShape:
    """A preset by name, at 16- or 8-bit weight precision."""
    try:
        shape = PRESETS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}") from None
    return shape.with_precision(precision)
