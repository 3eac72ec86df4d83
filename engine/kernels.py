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
Scales are fp16 bits, turned into float32 inside the vector intrinsics.

Two numeric modes for the quantized products (`fast` argument of matmul): exact (float32
activations, engine/simd.py) and fast (int8 activations per 32-block, integer dot products,
engine/simd_int8.py). In each, a (row, token) dot has one fixed arithmetic whatever the batch.
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
    files = ("kernels.py", "simd.py", "simd_int8.py", "cpu.py", "model.py")
    digest = hashlib.sha256(b"".join((here / f).read_bytes() for f in files))
    digest.update(os.environ.get("WAFER_ISA", "").encode())  # the int8 kernel is chosen at compile time
    home = os.environ.get("WAFER_HOME", str(Path.home() / ".cache" / "wafer"))
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(home, "numba")
    return os.path.join(base, digest.hexdigest()[:16])


numba.config.CACHE_DIR = _cache_dir()  # must precede the decorators below

from engine import simd as S
from engine import simd_int8 as I
from engine.simd import axpy16, exp16, scores16, silu_mul16

F32, F16, Q4, Q8 = 0, 1, 3, 8  # GGML type ids (Q4_0 is served by the Q4 kernels)
BLOCK = 32  # elements per quantization block
GEMV_MAX_TOKENS = 5  # up to this many tokens a step uses the matrix-vector kernels (measured crossover)
GEMM_TILE = 64  # weight rows a thread dequantizes and multiplies at a time in the matrix path
GEMM_TOKENS = 16  # tokens multiplied per pass over a tile (their activations stay in L1/L2)
INT8_TILE = 16  # weight rows per parallel work item in fast mode (fine enough to balance 2 threads)

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
# Per-format routines: pick the format's intrinsic (engine/simd.py, engine/simd_int8.py)


@jit
def dequant_row(w, l, r, out):
    """out[:cols] = row r of layer l as float32 (the same dequantization as the dots)."""
    if w.fmt == Q4:
        S.dequant_q4(w.q4[l], w.scales[l], r, out)
    elif w.fmt == Q8:
        S.dequant_q8(w.q8[l], w.scales[l], r, out)
    elif w.fmt == F16:
        S.dequant_f16(w.f16[l], w.f16[l], r, out)
    else:
        out[: w.cols] = w.f32[l, r]


@jit
def dot_4xn(w, l, r, x, t, n, out):
    """Rows r..r+3 against n (1-4) tokens from t, in one pass over the rows' blocks."""
    if w.fmt == Q4:
        q, s = w.q4[l], w.scales[l]
        if n == 4:
            S.dot_q4_4x4(q, s, r, x, t, out, r, w.rows)
        elif n == 3:
            S.dot_q4_4x3(q, s, r, x, t, out, r, w.rows)
        elif n == 2:
            S.dot_q4_4x2(q, s, r, x, t, out, r, w.rows)
        else:
            S.dot_q4_4x1(q, s, r, x, t, out, r, w.rows)
    elif w.fmt == Q8:
        q, s = w.q8[l], w.scales[l]
        if n == 4:
            S.dot_q8_4x4(q, s, r, x, t, out, r, w.rows)
        elif n == 3:
            S.dot_q8_4x3(q, s, r, x, t, out, r, w.rows)
        elif n == 2:
            S.dot_q8_4x2(q, s, r, x, t, out, r, w.rows)
        else:
            S.dot_q8_4x1(q, s, r, x, t, out, r, w.rows)
    elif w.fmt == F16:
        h = w.f16[l]
        if n == 4:
            S.dot_f16_4x4(h, h, r, x, t, out, r, w.rows)
        elif n == 3:
            S.dot_f16_4x3(h, h, r, x, t, out, r, w.rows)
        elif n == 2:
            S.dot_f16_4x2(h, h, r, x, t, out, r, w.rows)
        else:
            S.dot_f16_4x1(h, h, r, x, t, out, r, w.rows)
    else:
        f = w.f32[l]
        if n == 4:
            S.dot_f32_4x4(f, f, r, x, t, out, r, w.rows)
        elif n == 3:
            S.dot_f32_4x3(f, f, r, x, t, out, r, w.rows)
        elif n == 2:
            S.dot_f32_4x2(f, f, r, x, t, out, r, w.rows)
        else:
            S.dot_f32_4x1(f, f, r, x, t, out, r, w.rows)


@jit
def dot_4x5(w, l, r, x, out):
    """Rows r..r+3 against tokens 0-4 in one pass over the rows' blocks."""
    if w.fmt == Q4:
        S.dot_q4_4x5(w.q4[l], w.scales[l], r, x, 0, out, r, w.rows)
    elif w.fmt == Q8:
        S.dot_q8_4x5(w.q8[l], w.scales[l], r, x, 0, out, r, w.rows)
    elif w.fmt == F16:
        S.dot_f16_4x5(w.f16[l], w.f16[l], r, x, 0, out, r, w.rows)
    else:
        S.dot_f32_4x5(w.f32[l], w.f32[l], r, x, 0, out, r, w.rows)


@jit
def dot_1x1(w, l, r, x, t, out):
    if w.fmt == Q4:
        S.dot_q4_1x1(w.q4[l], w.scales[l], r, x, t, out, r, w.rows)
    elif w.fmt == Q8:
        S.dot_q8_1x1(w.q8[l], w.scales[l], r, x, t, out, r, w.rows)
    elif w.fmt == F16:
        S.dot_f16_1x1(w.f16[l], w.f16[l], r, x, t, out, r, w.rows)
    else:
        S.dot_f32_1x1(w.f32[l], w.f32[l], r, x, t, out, r, w.rows)


@jit
def idot_rows(w, l, r, n_rows, a, t0, t1, out):
    """Fast mode: rows r.. (4, or 1 when n_rows == 1) against tokens t0..t1-1."""
    t = t0
    if w.fmt == Q4:
        if n_rows == 4:
            while t + 4 <= t1:
                I.idot_q4_4x4(w.q4[l], w.scales[l], r, a.qx, a.dx, a.xs, t, out, r, w.rows)
                t += 4
            while t < t1:
                I.idot_q4_4x1(w.q4[l], w.scales[l], r, a.qx, a.dx, a.xs, t, out, r, w.rows)
                t += 1
        else:
            for t in range(t0, t1):
                I.idot_q4_1x1(w.q4[l], w.scales[l], r, a.qx, a.dx, a.xs, t, out, r, w.rows)
    else:
        if n_rows == 4:
            while t + 4 <= t1:
                I.idot_q8_4x4(w.q8[l], w.scales[l], r, a.qx, a.dx, a.xs, t, out, r, w.rows)
                t += 4
            while t < t1:
                I.idot_q8_4x1(w.q8[l], w.scales[l], r, a.qx, a.dx, a.xs, t, out, r, w.rows)
                t += 1
        else:
            for t in range(t0, t1):
                I.idot_q8_1x1(w.q8[l], w.scales[l], r, a.qx, a.dx, a.xs, t, out, r, w.rows)


@jit
def idot_4x_few(w, l, r, a, n_tok, out):
    """Fast mode: rows r..r+3 against 2 or 3 tokens (a verify step) in one pass over the rows.
    Kept apart from idot_rows: inlined there, these kernels slowed its 4x4 loop by ~10%."""
    if w.fmt == Q4:
        if n_tok == 3:
            I.idot_q4_4x3(w.q4[l], w.scales[l], r, a.qx, a.dx, a.xs, 0, out, r, w.rows)
        else:
            I.idot_q4_4x2(w.q4[l], w.scales[l], r, a.qx, a.dx, a.xs, 0, out, r, w.rows)
    else:
        if n_tok == 3:
            I.idot_q8_4x3(w.q8[l], w.scales[l], r, a.qx, a.dx, a.xs, 0, out, r, w.rows)
        else:
            I.idot_q8_4x2(w.q8[l], w.scales[l], r, a.qx, a.dx, a.xs, 0, out, r, w.rows)


# --------------------------------------------------------------------------------------------
# The matrix product driver


class Act(NamedTuple):
    """Fast mode's quantized activations (layout: engine/simd_int8.py)."""

    qx: np.ndarray  # int8 [T, max_cols]
    dx: np.ndarray  # float32 [T, 8 * max_cols / 32]: each block's scale, once per i32 lane
    xs: np.ndarray  # float32 [T, 4 * max_cols / 32]: Q4's dx * sum(qx) / 4, once per i32 lane


@jit
def matmul(w, l, x, n_tok, out, wtiles, act, fast):
    """out[t, :rows] = W[l] @ x[t, :cols] for t < n_tok.

    exact (fast false): float32 activations. Few tokens (decode): matrix-vector kernels
    straight from the quantized rows. More tokens (prefill, batched decode): each thread
    dequantizes a tile of GEMM_TILE rows into its own buffer and multiplies it by all tokens,
    so the weights are read once per step and the model is never held in float32. Both run the
    same per-(row, token) arithmetic (engine/simd.py), so the path never changes the result.
    fast: quantized formats take int8 activations and integer block dots, any number of tokens.
    """
    if fast and (w.fmt == Q4 or w.fmt == Q8):
        quantize_rows(x, n_tok, w.cols, w.fmt == Q4, act)
        if n_tok == 2 or n_tok == 3:
            matmul_int8_few(w, l, act, n_tok, out)
        else:
            matmul_int8(w, l, act, n_tok, out)
    elif n_tok == 5:
        gemv5(w, l, x, out)
    elif n_tok <= GEMV_MAX_TOKENS:
        gemv(w, l, x, n_tok, out)
    else:
        gemm(w, l, x, n_tok, out, wtiles)


@pjit
def gemv(w, l, x, n_tok, out):
    N = w.rows
    for g in prange(N // 4):
        r = 4 * g
        for t in range(0, n_tok, 4):
            dot_4xn(w, l, r, x, t, min(4, n_tok - t), out)
    for r in range(N - N % 4, N):
        for t in range(n_tok):
            dot_1x1(w, l, r, x, t, out)


@pjit
def gemv5(w, l, x, out):
    """gemv for five tokens. Apart from gemv: inlined there, the 4x5 kernel slowed one-token
    decode by ~7% (benches.compare, every round)."""
    N = w.rows
    for g in prange(N // 4):
        dot_4x5(w, l, 4 * g, x, out)
    for r in range(N - N % 4, N):
        for t in range(5):
            dot_1x1(w, l, r, x, t, out)


@pjit
def gemm(w, l, x, n_tok, out, wtiles):
    N = w.rows
    K = w.cols
    for i in prange((N + GEMM_TILE - 1) // GEMM_TILE):
        r0 = i * GEMM_TILE
        nr = min(GEMM_TILE, N - r0)
        wt = wtiles[get_thread_id(), : GEMM_TILE * K].reshape(GEMM_TILE, K)
        for r in range(nr):
            dequant_row(w, l, r0 + r, wt[r])
        for t0 in range(0, n_tok, GEMM_TOKENS):  # these tokens' activations stay in L1/L2
            t1 = min(n_tok, t0 + GEMM_TOKENS)
            for r in range(0, nr, 4):  # rows past nr are computed from stale tile rows, not stored
                t = t0
                while t + 4 <= t1:
                    S.dot_f32_4x4(wt, wt, r, x, t, out, r0 + r, r0 + nr)
                    t += 4
                if t1 - t == 3:
                    S.dot_f32_4x3(wt, wt, r, x, t, out, r0 + r, r0 + nr)
                elif t1 - t == 2:
                    S.dot_f32_4x2(wt, wt, r, x, t, out, r0 + r, r0 + nr)
                elif t1 - t == 1:
                    S.dot_f32_4x1(wt, wt, r, x, t, out, r0 + r, r0 + nr)


@pjit
def matmul_int8(w, l, act, n_tok, out):
    N = w.rows
    for i in prange((N + INT8_TILE - 1) // INT8_TILE):
        r0 = i * INT8_TILE
        r1 = min(N, r0 + INT8_TILE)
        for t0 in range(0, n_tok, GEMM_TOKENS):
            t1 = min(n_tok, t0 + GEMM_TOKENS)
            r = r0
            while r + 4 <= r1:
                idot_rows(w, l, r, 4, act, t0, t1, out)
                r += 4
            while r < r1:
                idot_rows(w, l, r, 1, act, t0, t1, out)
                r += 1


@pjit
def matmul_int8_few(w, l, act, n_tok, out):
    """matmul_int8 for 2 or 3 tokens: four rows at a time against all of them."""
    N = w.rows
    for g in prange(N // 4):
        idot_4x_few(w, l, 4 * g, act, n_tok, out)
    for r in range(N - N % 4, N):
        idot_rows(w, l, r, 1, act, 0, n_tok, out)


@jit
def quantize_row(x, K, q4, qx, dx, xs):
    """x[:K] -> int8 per 32-block, dx = max|x| / 127 (llama.cpp's Q8_1 / Q8_0), laid out for
    the Q4 (q4 true) or Q8 kernels of engine/simd_int8.py."""
    nb = K // BLOCK
    full = nb // 4 * 4
    for b in range(nb):
        o = BLOCK * b
        amax = np.float32(0.0)
        for j in range(BLOCK):
            amax = max(amax, abs(x[o + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        total = 0
        for j in range(BLOCK):
            v = int(math.floor(x[o + j] * inv + np.float32(0.5)))
            total += v
            if not q4:
                qx[o + j] = v + 128 - 256 * (v >= 0)  # the u8 bits of v + 128
            elif b < full:  # four blocks' elements 0-15 side by side, then their 16-31
                qx[128 * (b // 4) + 64 * (j // 16) + 16 * (b % 4) + j % 16] = v
            else:
                qx[o + j] = v
        if q4:
            for i in range(4):
                dx[4 * b + i] = d
                xs[4 * b + i] = d * np.float32(total) * np.float32(0.25)
        else:
            for i in range(8):
                dx[8 * b + i] = d


@pjit
def quantize_rows(x, n_tok, K, q4, act):
    if n_tok <= SMALL_STEP:
        for t in range(n_tok):
            quantize_row(x[t], K, q4, act.qx[t], act.dx[t], act.xs[t])
    else:
        for t in prange(n_tok):
            quantize_row(x[t], K, q4, act.qx[t], act.dx[t], act.xs[t])


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
def embed(w, tokens, n_tok, out):
    if n_tok <= SMALL_STEP:
        for t in range(n_tok):
            dequant_row(w, 0, tokens[t], out[t])
    else:
        for t in prange(n_tok):
            dequant_row(w, 0, tokens[t], out[t])


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
