"""Model hyper-parameters, read from a GGUF header (Llama architecture)."""

from __future__ import annotations

from dataclasses import dataclass

import gguf

# Numeric modes of the quantized products (engine.model.Model): "exact" keeps float32
# activations, "fast" quantizes them to int8 per 32-block for integer dot products.
NUMERICS = ("exact", "fast")


class UnsupportedModel(Exception):
    """A GGUF file this engine cannot run (architecture, tensor format, shape)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ffn: int
    vocab_size: int
    context_length: int
    rope_base: float
    rms_eps: float
    tied_embeddings: bool
    n_params: int
    quantization: str  # e.g. "Q4_1 (token_embd Q8_0)"

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> "ModelConfig":
        def field(key, default=None):
            f = reader.fields.get(key)
            if f is None:
                if default is None:
                    raise UnsupportedModel(f"GGUF header has no {key!r}")
                return default
            return f.contents()

        arch = field("general.architecture")
        if arch != "llama":
            raise UnsupportedModel(f"architecture {arch!r} is not supported (only 'llama')")
        tensors = {t.name: t for t in reader.tensors}
        d_model = int(field(f"{arch}.embedding_length"))
        n_heads = int(field(f"{arch}.attention.head_count"))
        vocab = int(tensors["token_embd.weight"].shape[1])
        formats = {}
        for t in reader.tensors:
            if t.name.endswith(".weight") and len(t.shape) == 2:
                formats.setdefault(t.tensor_type.name, []).append(t.name)
        main = max(formats, key=lambda k: len(formats[k]))
        others = [f"{n.split('.')[0]} {k}" for k, names in formats.items() if k != main for n in names[:1]]
        quant = main + (f" ({', '.join(others)})" if others else "")
        return cls(
            name=str(field("general.name", "unnamed")),
            arch=arch,
            n_layers=int(field(f"{arch}.block_count")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(field(f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=d_model // n_heads,
            d_ffn=int(field(f"{arch}.feed_forward_length")),
            vocab_size=vocab,
            context_length=int(field(f"{arch}.context_length")),
            rope_base=float(field(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            tied_embeddings="output.weight" not in tensors,
            n_params=int(sum(int(t.n_elements) for t in reader.tensors)),
            quantization=quant,
        )
