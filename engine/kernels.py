"""Numba kernels: quantized matrix products, RMSNorm, RoPE, paged attention, SwiGLU.

Kernels know nothing of requests: they take arrays and write into buffers handed to them
(no allocation in the hot path). Weights stay quantized; each format has one row-dequantizing
routine (used by the matrix-matrix path) and one dot routine (used by the matrix-vector path;
the quantized formats' dots are the vector intrinsics in engine/simd.py).

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

import hashlib
import math
import os
from pathlib import Path
from typing import NamedTuple

import numba
import numpy as np
from numba import get_thread_id, njit, prange


def _cache_dir() -> str:
    """Numba's on-disk cache does not notice when a jitted function's callees in another file
    change, so the cache lives in a folder named after the source of every jitted file."""
    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join((here / f).read_bytes() for f in ("kernels.py", "simd.py", "model.py")))
    home = os.environ.get("WAFER_HOME", str(Path.home() / ".cache" / "wafer"))
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(home, "numba")
    return os.path.join(base, digest.hexdigest()[:16])


numba.config.CACHE_DIR = _cache_dir()  # must precede the decorators below

from engine.simd import dequant_row as dequant_quantized_row
from engine.simd import (axpy16, dot_q4_x1, dot_q4_x4, dot_q8_x1, dot_q8_x4, exp16, scores16,
                         silu_mul16)

F32, F16, Q4, Q8 = 0, 1, 3, 8  # GGML type ids (Q4_0 is served by the Q4 kernels)
BLOCK = 32  # elements per quantization block
GEMV_MAX_TOKENS = 5  # up to this many tokens a step uses the matrix-vector kernels (measured crossover)
GEMM_TILE = 64  # weight rows a thread dequantizes and multiplies at a time in the matrix path
GEMM_TOKENS = 16  # tokens multiplied per pass over a tile (their activations stay in L1/L2)

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
        dequant_quantized_row(w.q4[l, r], w.scales[l, r], out, True)
    elif w.fmt == Q8:
        dequant_quantized_row(w.q8[l, r], w.scales[l, r], out, False)
    elif w.fmt == F16:
        for k in range(K):
            out[k] = half[w.f16[l, r, k]]
    else:
        for k in range(K):
            out[k] = w.f32[l, r, k]


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
def dot4(w, half, l, r0, x):
    if w.fmt == F16:
        return dot4_f16(w, half, l, r0, x)
    return dot4_f32(w, l, r0, x)


# --------------------------------------------------------------------------------------------
# The matrix product driver


@pjit
def gemv(w, half, l, x, n_tok, out, xsum):
    """out[t] = W[l] @ x[t] straight from the weights: quantized rows through the vector
    intrinsics of engine/simd.py, float rows 4 at a time."""
    N = w.rows
    K = w.cols
    if w.fmt == Q4:
        for t in range(n_tok):
            for b in range(K // BLOCK):
                s = np.float32(0.0)
                for j in range(BLOCK * b, BLOCK * b + BLOCK):
                    s += x[t, j]
                xsum[t, b] = s
        for r in prange(N):
            q, sc = w.q4[l, r], w.scales[l, r]
            for t in range(0, n_tok - 3, 4):
                dot_q4_x4(q, sc, x, t, xsum, out, r)
            for t in range(n_tok - n_tok % 4, n_tok):
                dot_q4_x1(q, sc, x, t, xsum, out, r)
        return
    if w.fmt == Q8:
        for r in prange(N):
            q, sc = w.q8[l, r], w.scales[l, r]
            for t in range(0, n_tok - 3, 4):
                dot_q8_x4(q, sc, x, t, out, r)
            for t in range(n_tok - n_tok % 4, n_tok):
                dot_q8_x1(q, sc, x, t, out, r)
        return
    for g in prange(N // 4):
        r0 = 4 * g
        for t in range(n_tok):
            a0, a1, a2, a3 = dot4(w, half, l, r0, x[t])
            out[t, r0] = a0
            out[t, r0 + 1] = a1
            out[t, r0 + 2] = a2
            out[t, r0 + 3] = a3
    for r in range(N - N % 4, N):  # tail rows
        for t in range(n_tok):
            a = np.float32(0.0)
            for k in range(K):
                a += x[t, k] * (half[w.f16[l, r, k]] if w.fmt == F16 else w.f32[l, r, k])
            out[t, r] = a


@jit
def matmul(w, half, l, x, n_tok, out, xsum, wtiles):
    """out[t, :rows] = W[l] @ x[t, :cols] for t < n_tok.

    Few tokens (decode): matrix-vector kernels straight from the quantized rows.
    More tokens (prefill, batched decode): each thread dequantizes a tile of GEMM_TILE rows into
    its own buffer and multiplies it by all tokens, so the weights are read once per step
    whatever the batch, and the model is never held in float32.
    """
    if n_tok <= GEMV_MAX_TOKENS:
        gemv(w, half, l, x, n_tok, out, xsum)
    else:
        gemm(w, half, l, x, n_tok, out, wtiles)


@pjit
def gemm(w, half, l, x, n_tok, out, wtiles):
    N = w.rows
    K = w.cols
    for i in prange((N + GEMM_TILE - 1) // GEMM_TILE):
        r0 = i * GEMM_TILE
        nr = min(GEMM_TILE, N - r0)
        wt = wtiles[get_thread_id(), : GEMM_TILE * K].reshape(GEMM_TILE, K)
        for r in range(nr):
            dequant_row(w, half, l, r0 + r, wt[r])
        for r in range(nr, GEMM_TILE):
            wt[r, :] = 0.0
        tile_product(wt, x, n_tok, K, out, r0, nr)


@jit
def tile_product(wt, x, n_tok, K, out, r0, nr):
    """out[t, r0 + r] = wt[r] . x[t] for a dense tile: 4 rows x 2 tokens per pass, so each
    loaded weight serves 2 tokens and each activation 4 rows (8 independent accumulators)."""
    for t0 in range(0, n_tok, GEMM_TOKENS):
        tile_product_tokens(wt, x, t0, min(n_tok, t0 + GEMM_TOKENS), K, out, r0, nr)


@jit
def tile_product_tokens(wt, x, t0, t1, K, out, r0, nr):
    for r in range(0, wt.shape[0], 4):
        for t in range(t0, t1 - 1, 2):
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
            for k in range(K):
                xk = x[t, k]
                yk = x[t + 1, k]
                w0 = wt[r, k]
                w1 = wt[r + 1, k]
                w2 = wt[r + 2, k]
                w3 = wt[r + 3, k]
                a0 += w0 * xk
                a1 += w1 * xk
                a2 += w2 * xk
                a3 += w3 * xk
                b0 += w0 * yk
                b1 += w1 * yk
                b2 += w2 * yk
                b3 += w3 * yk
            store4(out, t, r0, r, nr, a0, a1, a2, a3)
            store4(out, t + 1, r0, r, nr, b0, b1, b2, b3)
        if (t1 - t0) % 2:
            t = t1 - 1
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for k in range(K):
                xk = x[t, k]
                a0 += wt[r, k] * xk
                a1 += wt[r + 1, k] * xk
                a2 += wt[r + 2, k] * xk
                a3 += wt[r + 3, k] * xk
            store4(out, t, r0, r, nr, a0, a1, a2, a3)


@jit
def store4(out, t, r0, r, nr, a0, a1, a2, a3):
    if r < nr:
        out[t, r0 + r] = a0
    if r + 1 < nr:
        out[t, r0 + r + 1] = a1
    if r + 2 < nr:
        out[t, r0 + r + 2] = a2
    if r + 3 < nr:
        out[t, r0 + r + 3] = a3


# --------------------------------------------------------------------------------------------
# Small ops


# Small ops run serially for a few tokens: a parallel launch costs more than their work.
SMALL_STEP = 8


@jit
def rmsnorm_row(x, weight, eps, out):
    D = x.shape[0]
    ss = np.float32(0.0)
    for k in range(D):
        ss += x[k] * x[k]
    inv = np.float32(1.0) / math.sqrt(ss / D + eps)
    for k in range(D):
        out[k] = x[k] * inv * weight[k]


@pjit
def rmsnorm(x, weight, eps, n_tok, out):
    if n_tok <= SMALL_STEP:
        for t in range(n_tok):
            rmsnorm_row(x[t], weight, eps, out[t])
    else:
        for t in prange(n_tok):
            rmsnorm_row(x[t], weight, eps, out[t])


@jit
def add_into(x, y, n_tok):
    for t in range(n_tok):
        for k in range(x.shape[1]):
            x[t, k] += y[t, k]


@jit
def silu_mul_row(gate_up, d_ffn, out):
    for k0 in range(0, d_ffn, 16):
        silu_mul16(gate_up, k0, d_ffn, out)


@pjit
def silu_mul(gate_up, d_ffn, n_tok, out):
    """out = silu(gate) * up, with gate and up side by side in one fused product."""
    if n_tok <= SMALL_STEP:
        for t in range(n_tok):
            silu_mul_row(gate_up[t], d_ffn, out[t])
    else:
        for t in prange(n_tok):
            silu_mul_row(gate_up[t], d_ffn, out[t])


@jit
def rope_and_store(qkv, n_tok, positions, token_seq, block_tables, l, k_cache, v_cache,
                   rope_cos, rope_sin, n_heads, n_kv_heads, head_dim):
    """Rotate q and k in place (llama.cpp's 'normal' RoPE: adjacent pairs) and write k, v into
    the paged cache at each token's position."""
    block_size = v_cache.shape[3]
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
                k_cache[l, blk, h, i, slot] = qkv[t, q_end + h * head_dim + i]
                v_cache[l, blk, h, slot, i] = qkv[t, k_end + h * head_dim + i]


@pjit
def attention(qkv, n_tok, positions, token_seq, block_tables, l, k_cache, v_cache,
              n_heads, n_kv_heads, head_dim, scores, out):
    """Causal grouped-query attention of each token over its sequence's cache, positions
    0..positions[t] (the current token's k, v are already stored).

    Keys are stored transposed within a block ([head_dim, block_size]) so sixteen scores come
    from head_dim vector multiply-adds, with no horizontal sums; values are [block_size,
    head_dim] so the weighted sum is a vector multiply-add per position. Both run sixteen lanes
    at a time (engine/simd.py): head_dim and block_size are multiples of 16.
    """
    block_size = v_cache.shape[3]
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
        n_blocks = (n_ctx + block_size - 1) // block_size
        for bi in range(n_blocks):
            kb = k_cache[l, table[bi], kvh]
            for j0 in range(0, block_size, 16):
                scores16(kb, j0, qkv[t], qo, scale, s, bi * block_size + j0)
        best = np.float32(-np.inf)
        for p in range(n_ctx):
            best = max(best, s[p])
        total = np.float32(0.0)
        for p0 in range(0, n_ctx, 16):
            total += exp16(s, p0, best, n_ctx - p0)
        inv = np.float32(1.0) / total
        for p in range(n_ctx):
            s[p] *= inv
        out[t, qo : qo + head_dim] = 0.0
        for bi in range(n_blocks):
            vb = v_cache[l, table[bi], kvh]
            n = min(block_size, n_ctx - bi * block_size)
            for c0 in range(0, head_dim, 16):
                axpy16(s, bi * block_size, n, vb, c0, out[t], qo + c0)


@pjit
def embed(w, half, tokens, n_tok, out):
    if n_tok <= SMALL_STEP:
        for t in range(n_tok):
            dequant_row(w, half, 0, tokens[t], out[t])
    else:
        for t in prange(n_tok):
            dequant_row(w, half, 0, tokens[t], out[t])


# --------------------------------------------------------------------------------------------
# Sampling


@jit
def softmax_candidates(x, floor, shift, cand, probs):
    """The tokens worth sampling: ids j with x[j] >= floor in cand[:n], and their unnormalised
    probabilities exp(x[j] - shift) in probs[:n]; returns n. `probs` has 16 spare entries (the
    vector exp works sixteen lanes at a time)."""
    n = 0
    for j in range(x.size):  # branchless compaction: the store is undone by not advancing n
        v = x[j]
        cand[n] = j
        probs[n] = v
        n += v >= floor
    for i0 in range(0, n, 16):
        exp16(probs, i0, shift, n - i0)
    return n
