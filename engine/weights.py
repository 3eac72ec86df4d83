"""Load a Llama GGUF file's tensors and repack them (still quantized) into the kernels' layout.

Q, K and V are fused into one matrix per layer, and so are gate and up, so each step runs one
product for each instead of three and two. Layers are stacked: one array per weight role.
"""

from __future__ import annotations

from typing import NamedTuple

import gguf
import numpy as np

from engine.config import ModelConfig, UnsupportedModel
from engine.kernels import BLOCK, F16, F32, Q4, Q8, QWeight

T = gguf.GGMLQuantizationType
SUPPORTED = {T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q8_0}


class Weights(NamedTuple):
    embed: QWeight  # token_embd, [1, vocab, d_model]
    qkv: QWeight  # [L, (n_heads + 2 n_kv) * head_dim, d_model]
    wo: QWeight  # [L, d_model, d_model]
    gate_up: QWeight  # [L, 2 d_ffn, d_model]
    down: QWeight  # [L, d_model, d_ffn]
    head: QWeight  # output, or the tied token_embd
    attn_norm: np.ndarray  # float32 [L, d_model]
    ffn_norm: np.ndarray  # float32 [L, d_model]
    out_norm: np.ndarray  # float32 [d_model]


def _empty(dtype, nd=3):
    return np.zeros((0,) * nd, dtype=dtype)


def _repack(t: gguf.ReaderTensor) -> tuple[int, np.ndarray, np.ndarray]:
    """One GGUF matrix -> (kernel format, values [rows, ...], fp16 scale bits [rows, ...])."""
    if t.tensor_type not in SUPPORTED:
        raise UnsupportedModel(
            f"tensor {t.name} has format {t.tensor_type.name}; supported: Q4_0, Q4_1, Q8_0, F16, F32"
        )
    cols, rows = int(t.shape[0]), int(t.shape[1])
    if cols % BLOCK:  # every format's dot works a 32-block at a time
        raise UnsupportedModel(f"tensor {t.name}: {cols} columns is not a multiple of {BLOCK}")
    if t.tensor_type == T.F32:
        return F32, np.ascontiguousarray(np.asarray(t.data, np.float32).reshape(rows, cols)), None
    if t.tensor_type == T.F16:
        return F16, np.ascontiguousarray(np.asarray(t.data).view(np.uint16).reshape(rows, cols)), None
    nb = cols // BLOCK
    raw = np.asarray(t.data, dtype=np.uint8).reshape(rows, nb, -1)
    if t.tensor_type == T.Q8_0:  # d, 32 x int8
        d = raw[:, :, 0:2].copy().view(np.uint16).reshape(rows, nb)
        return Q8, raw[:, :, 2:34].copy().view(np.int8).reshape(rows, cols), d
    if t.tensor_type == T.Q4_1:  # d, m, 16 bytes of nibbles
        dm = raw[:, :, 0:4].copy().view(np.uint16).reshape(rows, 2 * nb)
        return Q4, raw[:, :, 4:20].reshape(rows, nb * 16).copy(), dm
    # Q4_0: d, 16 bytes of nibbles, value d*(q-8) == d*q + m with m = -8d (exact in fp16)
    d = raw[:, :, 0:2].copy().view(np.float16).reshape(rows, nb)
    m = (d * np.float16(-8)).astype(np.float16)
    dm = np.stack([d, m], axis=-1).view(np.uint16).reshape(rows, 2 * nb)
    return Q4, raw[:, :, 2:18].reshape(rows, nb * 16).copy(), dm


def _stack(per_layer: list[list[gguf.ReaderTensor]], role: str) -> QWeight:
    """Stack [layer][part] tensors into one QWeight, fusing the parts of a layer by rows."""
    packed = [[_repack(t) for t in parts] for parts in per_layer]
    fmts = {p[0] for layer in packed for p in layer}
    if len(fmts) != 1:
        raise UnsupportedModel(f"{role}: mixed tensor formats across layers are not supported")
    fmt = fmts.pop()
    values = np.stack([np.concatenate([p[1] for p in layer], axis=0) for layer in packed])
    scales = (
        np.stack([np.concatenate([p[2] for p in layer], axis=0) for layer in packed])
        if fmt in (Q4, Q8) else _empty(np.uint16)
    )
    rows = values.shape[1]
    cols = values.shape[2] * 2 if fmt == Q4 else values.shape[2]
    return QWeight(
        fmt=fmt, rows=rows, cols=cols,
        q4=values if fmt == Q4 else _empty(np.uint8),
        q8=values if fmt == Q8 else _empty(np.int8),
        f16=values if fmt == F16 else _empty(np.uint16),
        f32=values if fmt == F32 else _empty(np.float32),
        scales=np.ascontiguousarray(scales),
    )


def load_weights(reader: gguf.GGUFReader, cfg: ModelConfig) -> Weights:
    tensors = {t.name: t for t in reader.tensors}

    def get(name):
        if name not in tensors:
            raise UnsupportedModel(f"GGUF file has no tensor {name!r}")
        return tensors[name]

    def norm(name):
        return np.asarray(get(name).data, dtype=np.float32).copy()

    L = range(cfg.n_layers)
    embed = _stack([[get("token_embd.weight")]], "token_embd")
    head = embed if cfg.tied_embeddings else _stack([[get("output.weight")]], "output")
    return Weights(
        embed=embed,
        qkv=_stack([[get(f"blk.{i}.attn_{p}.weight") for p in "qkv"] for i in L], "attn_qkv"),
        wo=_stack([[get(f"blk.{i}.attn_output.weight")] for i in L], "attn_output"),
        gate_up=_stack([[get(f"blk.{i}.ffn_{p}.weight") for p in ("gate", "up")] for i in L], "ffn_gate_up"),
        down=_stack([[get(f"blk.{i}.ffn_down.weight")] for i in L], "ffn_down"),
        head=head,
        attn_norm=np.stack([norm(f"blk.{i}.attn_norm.weight") for i in L]),
        ffn_norm=np.stack([norm(f"blk.{i}.ffn_norm.weight") for i in L]),
        out_norm=norm("output_norm.weight"),
    )


def weight_bytes(w: QWeight) -> int:
    """Bytes of weight data a full pass over this role reads (values + scales)."""
    return sum(a.nbytes for a in (w.q4, w.q8, w.f16, w.f32, w.scales))
