"""Numba kernels: quantized matrix products, RMSNorm, RoPE, paged attention, SwiGLU.

Kernels know nothing of requests: they take arrays and write into buffers handed to them
(no allocation in the hot path). Weights stay quantized; each format has one row-dequantizing
routine (used by the matrix-matrix path) and one dot routine (used by the matrix-vector path).

Weight layouts (repacked at load time by engine/weights.py, still quantized):
  Q4   4-bit with per-32 scale d and min m, value = d*q + m. GGUF Q4_1 as is; Q4_0 (value =
       d*(q-8)) becomes m = -8d, exactly. Nibbles `q4[l, r, 16*b + j]`: low = element j of
       block b, high = element j+16 (GGUF's order). Scales `scales[l, r, 2*b]` = d, `2*b+1` = m.
  Q8   int8 with per-32 scale d: `q8[l, r, k]`, `scales[l, r, b]`.
  F16  `f16[l, r, k]` (raw half bits), F32 `f32[l, r, k]`.
Scales are fp16 bits; `half` is the 65536-entry table that turns fp16 bits into float32
(Numba has no float16 type).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import get_thread_id, njit, prange

F32, F16, Q4, Q8 = 0, 1, 3, 8  # GGML type ids (Q4_0 is served by the Q4 kernels)
BLOCK = 32  # elements per quantization block
TILE_ROWS = 16  # rows dequantized together in the matrix-matrix path
GEMV_MAX_TOKENS = 2  # up to this many tokens a step uses the matrix-vector kernels

HALF_TO_FLOAT = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)

jit = njit(cache=True, fastmath=True, nogil=True)
pjit = njit(cache=True, fastmath=True, nogil=True, parallel=True)


class QWeight(NamedTuple):
    """One weight role for every layer, [layers, rows, ...]; only its format's array is filled."""

    fmt: int
    rows: int
    cols: int
    q4: np.ndarray  # uint8   [L, rows, cols // 2]
    q8: np.ndarray  # int8    [L, rows, cols]
    f16: np.ndarray  # uint16 [L, rows, cols]
    f32: np.ndarray  # float32 [L, rows, cols]
    scales: np.ndarray  # uint16 [L, rows, 2 * nb] (Q4) or [L, rows, nb] (Q8)


# --------------------------------------------------------------------------------------------
# Per-format routines


@jit
def dequant_row(w, half, l, r, out):
    """out[:cols] = row r of layer l as float32."""
    K = w.cols
    if w.fmt == Q4:
        for b in range(K // BLOCK):
            d = half[w.scales[l, r, 2 * b]]
            m = half[w.scales[l, r, 2 * b + 1]]
            for j in range(16):
                q = w.q4[l, r, 16 * b + j]
                out[BLOCK * b + j] = d * np.float32(q & 15) + m
                out[BLOCK * b + 16 + j] = d * np.float32(q >> 4) + m
    elif w.fmt == Q8:
        for b in range(K // BLOCK):
            d = half[w.scales[l, r, b]]
            for j in range(BLOCK):
                out[BLOCK * b + j] = d * np.float32(w.q8[l, r, BLOCK * b + j])
    elif w.fmt == F16:
        for k in range(K):
            out[k] = half[w.f16[l, r, k]]
    else:
        for k in range(K):
            out[k] = w.f32[l, r, k]


@jit
def dot4_q4(w, half, l, r0, x, xsum):
    """Four rows r0..r0+3 of a Q4 matrix dotted with x; each x value is loaded once for 4 rows.
    The min term needs only the per-block sums of x: sum_j (d q_j + m) x_j = d (q.x) + m sum(x)."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    q = w.q4
    for b in range(w.cols // BLOCK):
        s0 = s1 = s2 = s3 = np.float32(0.0)
        o = 16 * b
        for j in range(16):
            xl = x[BLOCK * b + j]
            xh = x[BLOCK * b + 16 + j]
            v = q[l, r0, o + j]
            s0 += np.float32(v & 15) * xl + np.float32(v >> 4) * xh
            v = q[l, r0 + 1, o + j]
            s1 += np.float32(v & 15) * xl + np.float32(v >> 4) * xh
            v = q[l, r0 + 2, o + j]
            s2 += np.float32(v & 15) * xl + np.float32(v >> 4) * xh
            v = q[l, r0 + 3, o + j]
            s3 += np.float32(v & 15) * xl + np.float32(v >> 4) * xh
        xs = xsum[b]
        sc = w.scales
        a0 += half[sc[l, r0, 2 * b]] * s0 + half[sc[l, r0, 2 * b + 1]] * xs
        a1 += half[sc[l, r0 + 1, 2 * b]] * s1 + half[sc[l, r0 + 1, 2 * b + 1]] * xs
        a2 += half[sc[l, r0 + 2, 2 * b]] * s2 + half[sc[l, r0 + 2, 2 * b + 1]] * xs
        a3 += half[sc[l, r0 + 3, 2 * b]] * s3 + half[sc[l, r0 + 3, 2 * b + 1]] * xs
    return a0, a1, a2, a3


@jit
def dot4_q8(w, half, l, r0, x):
    a0 = a1 = a2 = a3 = np.float32(0.0)
    q = w.q8
    for b in range(w.cols // BLOCK):
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for j in range(BLOCK * b, BLOCK * b + BLOCK):
            xj = x[j]
            s0 += np.float32(q[l, r0, j]) * xj
            s1 += np.float32(q[l, r0 + 1, j]) * xj
            s2 += np.float32(q[l, r0 + 2, j]) * xj
            s3 += np.float32(q[l, r0 + 3, j]) * xj
        sc = w.scales
        a0 += half[sc[l, r0, b]] * s0
        a1 += half[sc[l, r0 + 1, b]] * s1
        a2 += half[sc[l, r0 + 2, b]] * s2
        a3 += half[sc[l, r0 + 3, b]] * s3
    return a0, a1, a2, a3


@jit
def dot4_f16(w, half, l, r0, x):
    a0 = a1 = a2 = a3 = np.float32(0.0)
    f = w.f16
    for k in range(w.cols):
        xk = x[k]
        a0 += half[f[l, r0, k]] * xk
        a1 += half[f[l, r0 + 1, k]] * xk
        a2 += half[f[l, r0 + 2, k]] * xk
        a3 += half[f[l, r0 + 3, k]] * xk
    return a0, a1, a2, a3


@jit
def dot4_f32(w, l, r0, x):
    a0 = a1 = a2 = a3 = np.float32(0.0)
    f = w.f32
    for k in range(w.cols):
        xk = x[k]
        a0 += f[l, r0, k] * xk
        a1 += f[l, r0 + 1, k] * xk
        a2 += f[l, r0 + 2, k] * xk
        a3 += f[l, r0 + 3, k] * xk
    return a0, a1, a2, a3


@jit
def dot4(w, half, l, r0, x, xsum):
    if w.fmt == Q4:
        return dot4_q4(w, half, l, r0, x, xsum)
    if w.fmt == Q8:
        return dot4_q8(w, half, l, r0, x)
    if w.fmt == F16:
        return dot4_f16(w, half, l, r0, x)
    return dot4_f32(w, l, r0, x)


# --------------------------------------------------------------------------------------------
# The matrix product driver


@pjit
def matmul(w, half, l, x, n_tok, out, xsum, tiles):
    """out[t, :rows] = W[l] @ x[t, :cols] for t < n_tok.

    Few tokens (decode): matrix-vector kernels straight from the quantized rows, 4 rows at a time.
    More tokens (prefill, batched decode): each tile of rows is dequantized once into a per-thread
    buffer and used for every token, so the weights are read once per step whatever the batch.
    """
    N = w.rows
    K = w.cols
    if n_tok <= GEMV_MAX_TOKENS:
        if w.fmt == Q4:
            for t in range(n_tok):
                for b in range(K // BLOCK):
                    s = np.float32(0.0)
                    for j in range(BLOCK * b, BLOCK * b + BLOCK):
                        s += x[t, j]
                    xsum[t, b] = s
        for g in prange(N // 4):
            r0 = 4 * g
            for t in range(n_tok):
                a0, a1, a2, a3 = dot4(w, half, l, r0, x[t], xsum[t])
                out[t, r0] = a0
                out[t, r0 + 1] = a1
                out[t, r0 + 2] = a2
                out[t, r0 + 3] = a3
        for r in range(N - N % 4, N):  # tail rows
            row = tiles[0, 0]
            dequant_row(w, half, l, r, row)
            for t in range(n_tok):
                a = np.float32(0.0)
                for k in range(K):
                    a += row[k] * x[t, k]
                out[t, r] = a
    else:
        n_tiles = (N + TILE_ROWS - 1) // TILE_ROWS
        for i in prange(n_tiles):
            tile = tiles[get_thread_id()]
            r0 = i * TILE_ROWS
            n_rows = min(TILE_ROWS, N - r0)
            for r in range(TILE_ROWS):
                if r < n_rows:
                    dequant_row(w, half, l, r0 + r, tile[r])
                else:
                    tile[r, :K] = 0.0
            for t in range(n_tok):
                xt = x[t]
                for r in range(0, TILE_ROWS, 4):
                    a0 = a1 = a2 = a3 = np.float32(0.0)
                    for k in range(K):
                        xk = xt[k]
                        a0 += tile[r, k] * xk
                        a1 += tile[r + 1, k] * xk
                        a2 += tile[r + 2, k] * xk
                        a3 += tile[r + 3, k] * xk
                    if r + 3 < n_rows:
                        out[t, r0 + r] = a0
                        out[t, r0 + r + 1] = a1
                        out[t, r0 + r + 2] = a2
                        out[t, r0 + r + 3] = a3
                    else:
                        for i4, a in enumerate((a0, a1, a2)):
                            if r + i4 < n_rows:
                                out[t, r0 + r + i4] = a


# --------------------------------------------------------------------------------------------
# Small ops


@pjit
def rmsnorm(x, weight, eps, n_tok, out):
    D = x.shape[1]
    for t in prange(n_tok):
        ss = np.float32(0.0)
        for k in range(D):
            ss += x[t, k] * x[t, k]
        inv = np.float32(1.0) / math.sqrt(ss / D + eps)
        for k in range(D):
            out[t, k] = x[t, k] * inv * weight[k]


@jit
def add_into(x, y, n_tok):
    for t in range(n_tok):
        for k in range(x.shape[1]):
            x[t, k] += y[t, k]


@pjit
def silu_mul(gate_up, d_ffn, n_tok, out):
    """out = silu(gate) * up, with gate and up side by side in one fused product."""
    for t in prange(n_tok):
        for k in range(d_ffn):
            g = gate_up[t, k]
            out[t, k] = g / (np.float32(1.0) + math.exp(-g)) * gate_up[t, d_ffn + k]


@jit
def rope_and_store(qkv, n_tok, positions, token_seq, block_tables, l, k_cache, v_cache,
                   rope_cos, rope_sin, n_heads, n_kv_heads, head_dim):
    """Rotate q and k in place (llama.cpp's 'normal' RoPE: adjacent pairs) and write k, v into
    the paged cache at each token's position."""
    block_size = k_cache.shape[3]
    q_end = n_heads * head_dim
    k_end = q_end + n_kv_heads * head_dim
    half_dim = head_dim // 2
    for t in range(n_tok):
        p = positions[t]
        for h in range(n_heads + n_kv_heads):
            o = h * head_dim
            for i in range(half_dim):
                c = rope_cos[p, i]
                s = rope_sin[p, i]
                x0 = qkv[t, o + 2 * i]
                x1 = qkv[t, o + 2 * i + 1]
                qkv[t, o + 2 * i] = x0 * c - x1 * s
                qkv[t, o + 2 * i + 1] = x0 * s + x1 * c
        blk = block_tables[token_seq[t], p // block_size]
        slot = p % block_size
        for h in range(n_kv_heads):
            for i in range(head_dim):
                k_cache[l, blk, h, slot, i] = qkv[t, q_end + h * head_dim + i]
                v_cache[l, blk, h, slot, i] = qkv[t, k_end + h * head_dim + i]


@pjit
def attention(qkv, n_tok, positions, token_seq, block_tables, l, k_cache, v_cache,
              n_heads, n_kv_heads, head_dim, scores, out):
    """Causal grouped-query attention of each token over its sequence's cache, positions
    0..positions[t] (the current token's k, v are already stored)."""
    block_size = k_cache.shape[3]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for i in prange(n_tok * n_heads):
        t = i // n_heads
        h = i % n_heads
        kvh = h // group
        s = scores[get_thread_id()]
        table = block_tables[token_seq[t]]
        n_ctx = positions[t] + 1
        qo = h * head_dim
        best = np.float32(-np.inf)
        for p in range(n_ctx):
            kv = k_cache[l, table[p // block_size], kvh, p % block_size]
            dot = np.float32(0.0)
            for d in range(head_dim):
                dot += qkv[t, qo + d] * kv[d]
            dot *= scale
            s[p] = dot
            best = max(best, dot)
        total = np.float32(0.0)
        for p in range(n_ctx):
            e = math.exp(s[p] - best)
            s[p] = e
            total += e
        inv = np.float32(1.0) / total
        for d in range(head_dim):
            out[t, qo + d] = 0.0
        for p in range(n_ctx):
            vv = v_cache[l, table[p // block_size], kvh, p % block_size]
            wgt = s[p] * inv
            for d in range(head_dim):
                out[t, qo + d] += wgt * vv[d]


@pjit
def embed(w, half, tokens, n_tok, out):
    for t in prange(n_tok):
        dequant_row(w, half, 0, tokens[t], out[t])
