"""A plain-numpy float64 reference forward pass of a Llama GGUF model.

This is the yardstick the Numba engine is tested against: slow, obvious, and computed the way
llama.cpp computes LLM_ARCH_LLAMA. Weights are dequantized with gguf's own reference
dequantizers, then everything is float64.

    x = token_embd[token]
    for each layer:
        h = rmsnorm(x, attn_norm)
        q, k, v = h @ Wq.T, h @ Wk.T, h @ Wv.T          (per head; rope on q and k)
        x = x + attention(q, k, v) @ Wo.T                (causal, grouped-query, 1/sqrt(head_dim))
        h = rmsnorm(x, ffn_norm)
        x = x + (silu(h @ Wgate.T) * (h @ Wup.T)) @ Wdown.T
    logits = rmsnorm(x, output_norm) @ W_out.T           (W_out = output.weight or token_embd)

RoPE is llama.cpp's "normal" type: ADJACENT pairs (x[2i], x[2i+1]) rotate by
pos * base^(-2i/n_rot). The GGUF converter already permuted the Q/K weights of Hugging Face
checkpoints for that pairing, so nothing is permuted here.

GGUF shape convention: a weight that is (out, in) in PyTorch has GGUF dims [in, out];
``GGUFReader`` returns its data as (out, in) rows (quantized: rows of blocks), and
``gguf.quants.dequantize`` turns those into a float (out, in) array, so ``h @ W.T`` is the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import gguf


@dataclass(frozen=True)
class Config:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_rot: int  # leading dims of each head that RoPE rotates (rope.dimension_count)
    d_ffn: int
    vocab_size: int
    context_length: int
    rope_base: float
    rms_eps: float


def read_config(reader: gguf.GGUFReader) -> Config:
    arch = reader.fields["general.architecture"].contents()

    def get(key, default=None):
        field = reader.fields.get(f"{arch}.{key}")
        if field is None:
            if default is None:
                raise KeyError(f"GGUF file has no {arch}.{key}")
            return default
        return field.contents()

    d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = d_model // n_heads
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return Config(
        n_layers=int(get("block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        n_rot=int(get("rope.dimension_count", head_dim)),
        d_ffn=int(get("feed_forward_length")),
        vocab_size=int(get("vocab_size", int(embd.shape[1]))),
        context_length=int(get("context_length")),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
    )


def dequantize(tensor) -> np.ndarray:
    """A GGUFReader tensor as float64, numpy shape = reversed GGUF dims, e.g. (out, in)."""
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.asarray(w, dtype=np.float64).reshape(shape)


# --- the building blocks ---------------------------------------------------------------------


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float) -> np.ndarray:
    """Rotate adjacent pairs (x[..., 2i], x[..., 2i+1]); x is (T, heads, head_dim)."""
    i = np.arange(n_rot // 2)
    theta = positions[:, None] * base ** (-2.0 * i / n_rot)  # (T, n_rot/2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]  # broadcast over heads
    x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out = x.copy()
    out[..., 0:n_rot:2] = x0 * cos - x1 * sin
    out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


# --- the model -------------------------------------------------------------------------------


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray


class KVCache:
    """Keys and values of every position seen so far: per layer (positions, kv_heads, head_dim)."""

    def __init__(self, cfg: Config):
        empty = np.zeros((0, cfg.n_kv_heads, cfg.head_dim))
        self.k = [empty] * cfg.n_layers
        self.v = [empty] * cfg.n_layers

    @property
    def length(self) -> int:
        return self.k[0].shape[0]


class ReferenceModel:
    """All weights dequantized to float64 once; ``forward`` runs tokens through them."""

    def __init__(self, gguf_path):
        reader = gguf.GGUFReader(gguf_path)
        self.cfg = cfg = read_config(reader)
        tensors = {t.name: t for t in reader.tensors}

        def w(name: str) -> np.ndarray:
            return dequantize(tensors[name])

        self.token_embd = w("token_embd.weight")  # (vocab, d_model)
        self.layers = [
            Layer(
                attn_norm=w(f"blk.{i}.attn_norm.weight"),
                wq=w(f"blk.{i}.attn_q.weight"),
                wk=w(f"blk.{i}.attn_k.weight"),
                wv=w(f"blk.{i}.attn_v.weight"),
                wo=w(f"blk.{i}.attn_output.weight"),
                ffn_norm=w(f"blk.{i}.ffn_norm.weight"),
                w_gate=w(f"blk.{i}.ffn_gate.weight"),
                w_up=w(f"blk.{i}.ffn_up.weight"),
                w_down=w(f"blk.{i}.ffn_down.weight"),
            )
            for i in range(cfg.n_layers)
        ]
        self.output_norm = w("output_norm.weight")
        self.output = w("output.weight") if "output.weight" in tensors else self.token_embd

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg)

    def forward(self, tokens, cache: KVCache | None = None) -> np.ndarray:
        """Logits (len(tokens), vocab) for ``tokens`` placed after what ``cache`` holds.

        The cache is extended in place, so feeding a prompt and then one token at a time gives
        the same logits as recomputing everything from scratch.
        """
        cfg = self.cfg
        cache = cache if cache is not None else self.new_cache()
        tokens = np.asarray(tokens, dtype=np.int64)
        T, start = len(tokens), cache.length
        positions = np.arange(start, start + T, dtype=np.float64)
        group = cfg.n_heads // cfg.n_kv_heads  # query heads per kv head
        causal = np.arange(start + T)[None, :] > (start + np.arange(T))[:, None]  # (T, S) masked

        x = self.token_embd[tokens]  # (T, d_model)
        for li, layer in enumerate(self.layers):
            # attention
            h = rmsnorm(x, layer.attn_norm, cfg.rms_eps)
            q = (h @ layer.wq.T).reshape(T, cfg.n_heads, cfg.head_dim)
            k = (h @ layer.wk.T).reshape(T, cfg.n_kv_heads, cfg.head_dim)
            v = (h @ layer.wv.T).reshape(T, cfg.n_kv_heads, cfg.head_dim)
            q = rope(q, positions, cfg.n_rot, cfg.rope_base)
            k = rope(k, positions, cfg.n_rot, cfg.rope_base)
            cache.k[li] = np.concatenate([cache.k[li], k])
            cache.v[li] = np.concatenate([cache.v[li], v])
            keys = np.repeat(cache.k[li], group, axis=1)  # (S, n_heads, head_dim)
            values = np.repeat(cache.v[li], group, axis=1)
            scores = np.einsum("thd,shd->hts", q, keys) / np.sqrt(cfg.head_dim)
            scores[:, causal] = -np.inf
            att = np.einsum("hts,shd->thd", softmax(scores), values)
            x = x + att.reshape(T, cfg.d_model) @ layer.wo.T
            # feed-forward (SwiGLU)
            h = rmsnorm(x, layer.ffn_norm, cfg.rms_eps)
            x = x + (silu(h @ layer.w_gate.T) * (h @ layer.w_up.T)) @ layer.w_down.T

        return rmsnorm(x, self.output_norm, cfg.rms_eps) @ self.output.T

    def greedy(self, prompt: list[int], max_new_tokens: int, stop_ids=()) -> tuple[list[int], list[np.ndarray]]:
        """Greedy continuation of ``prompt`` (KV-cached); returns (new ids, logits of each step)."""
        cache = self.new_cache()
        logits = self.forward(prompt, cache)[-1]
        out, steps = [], []
        for _ in range(max_new_tokens):
            steps.append(logits)
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if nxt in stop_ids:
                break
            logits = self.forward([nxt], cache)[-1]
        return out, steps


def reference_logits(gguf_path, tokens: list[int]) -> np.ndarray:
    """Float64 logits (len(tokens), vocab) of the model in ``gguf_path`` for ``tokens``."""
    return ReferenceModel(Path(gguf_path)).forward(tokens)
