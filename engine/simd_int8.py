"""Fast-mode weight products: int8 activations, integer block dots (as llama.cpp's Q4_1 x Q8_1
and Q8_0 x Q8_0), written as Numba intrinsics in LLVM vector IR.

Activations are quantized per 32-block by kernels.quantize_rows (x ~ dx * qx, qx int8) into a
layout that lines up with the weights' bytes:
  Q4 weights (u8 nibbles, low = elements 0-15, high = 16-31 of a block): four blocks' 64 bytes
     are one vector; their lows meet qx[128g : 128g+64] = the four blocks' elements 0-15 side by
     side, their highs qx[128g+64 : 128g+128] (elements 16-31). Blocks past the last group of
     four keep the plain order (qx[32b : 32b+32]).
  Q8 weights (s8): qx stored as u8 = qx + 128 in plain order; the 128 * sum(w) that adds is
     taken off with one more integer dot of the weights against 0x80 bytes.
vpdpbusd sums 4 byte products into each i32 lane, so a 16-lane result holds 4 lanes per Q4
block (8 per Q8 block); the float scales are spread the same way: dx4[t, 4b + i] = dx_b,
xs4[t, 4b + i] = dx_b * sum(qx_b) / 4 (Q4's min term, m * sum x), dx8[t, 8b + i] = dx_b (Q8).

Per (row, token) and per vector of blocks, in a fixed order: i32 = exact integer dot;
acc = fma(float(i32), d_w * dx, acc) [+ acc = fma(m_w, xs4, acc) for Q4]; one fixed
horizontal-sum tree at the end: the same bits whatever the batch or the kernel variant.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from engine.cpu import ISA
from engine.simd import (F32, HALF, I8, I16, I32, I64, _block_loop, _data, _fma, _i64, _load_vec, _shape,
                         _tree_sum, _vec)


def _c(v):
    return ir.Constant(I64, v)


def _dpbusd(builder, acc, a_u8, b_s8):
    """acc + sum of 4 adjacent u8 x s8 products per i32 lane (vpdpbusd, exact)."""
    n = acc.type.count
    vi = _vec(I32, n)
    if ISA == "vnni":
        name = f"llvm.x86.avx512.vpdpbusd.{32 * n}"
        mod = builder.module
        fn = mod.globals.get(name) or ir.Function(mod, ir.FunctionType(vi, [vi, vi, vi]), name=name)
        return builder.call(fn, [acc, builder.bitcast(a_u8, vi), builder.bitcast(b_s8, vi)])
    prod = builder.mul(builder.zext(a_u8, _vec(I32, 4 * n)), builder.sext(b_s8, _vec(I32, 4 * n)))
    for k in range(4):
        acc = builder.add(acc, builder.shuffle_vector(prod, prod, ir.Constant(_vec(I32, n), list(range(k, 4 * n, 4)))))
    return acc


def _spread(builder, v, idx):
    return builder.shuffle_vector(v, v, ir.Constant(_vec(I32, len(idx)), idx))


def _halfs(builder, s_ptr, index, n):
    """n consecutive fp16 scales from s_ptr[index] as <n x float>."""
    return builder.fpext(builder.bitcast(_load_vec(builder, s_ptr, index, _vec(I16, n)), _vec(HALF, n)), _vec(F32, n))


def _fast_codegen(fmt, R, T):
    """out[t0+j, or0+i] = W[wr0+i] . x[t0+j] for i < R (stored while or0+i < r_end), j < T,
    x given as (qx, dx, xs) from quantize_rows."""

    def codegen(context, builder, signature, args):
        wt, st, _, qt, dt, xst, _, ot, _, _ = signature.args
        w, s, wr0, qx, dx, xs, t0, out, or0, r_end = args
        wr0, t0, or0, r_end = (_i64(builder, v) for v in (wr0, t0, or0, r_end))
        w_ptr, s_ptr = _data(context, builder, wt, w), _data(context, builder, st, s)
        q_ptr, d_ptr, xs_ptr = (_data(context, builder, t, a) for t, a in ((qt, qx), (dt, dx), (xst, xs)))
        o_ptr = _data(context, builder, ot, out)
        w_row, s_row = _shape(context, builder, wt, w, 1), _shape(context, builder, st, s, 1)
        q_row, d_row = _shape(context, builder, qt, qx, 1), _shape(context, builder, dt, dx, 1)
        xs_row, o_row = _shape(context, builder, xst, xs, 1), _shape(context, builder, ot, out, 1)
        rows_w = [builder.mul(builder.add(wr0, _c(i)), w_row) for i in range(R)]
        rows_s = [builder.mul(builder.add(wr0, _c(i)), s_row) for i in range(R)]
        toks = [builder.add(t0, _c(j)) for j in range(T)]
        q4 = fmt == "q4"
        n_blocks = builder.udiv(w_row, _c(16 if q4 else 32))
        per_vec = 4 if q4 else 2  # blocks per 64-byte vector
        n_vec = builder.udiv(n_blocks, _c(per_vec))
        tail_lanes = 4 if q4 else 8  # i32 lanes of one block
        nib = lambda n: ir.Constant(_vec(I8, n), [15] * n)  # noqa: E731
        four = lambda n: ir.Constant(_vec(I8, n), [4] * n)  # noqa: E731

        def step(g, accs, nbytes, lanes, blk):
            """One vector of blocks (nbytes of weight bytes) for every (row, token)."""
            vb = _vec(I8, nbytes)
            zero = ir.Constant(_vec(I32, lanes), [0] * lanes)
            new = list(accs)
            ws = []
            for i in range(R):
                raw = _load_vec(builder, w_ptr, builder.add(rows_w[i], builder.mul(g, _c(nbytes))), vb)
                if q4:
                    sc = _halfs(builder, s_ptr, builder.add(rows_s[i], builder.mul(g, _c(2 * blk))), 2 * blk)
                    d = _spread(builder, sc, [2 * (k // 4) for k in range(lanes)])
                    m = _spread(builder, sc, [2 * (k // 4) + 1 for k in range(lanes)])
                    ws.append((builder.and_(raw, nib(nbytes)), builder.lshr(raw, four(nbytes)), d, m))
                else:
                    sc = _halfs(builder, s_ptr, builder.add(rows_s[i], builder.mul(g, _c(blk))), blk)
                    d = _spread(builder, sc, [k // 8 for k in range(lanes)])
                    corr = _dpbusd(builder, zero, ir.Constant(vb, [128] * nbytes), raw)
                    ws.append((raw, corr, d, None))
            for j in range(T):
                xq_off = builder.add(builder.mul(toks[j], q_row), builder.mul(g, _c(2 * nbytes if q4 else nbytes)))
                lane_off = builder.mul(g, _c(lanes))
                xd = _load_vec(builder, d_ptr, builder.add(builder.mul(toks[j], d_row), lane_off), _vec(F32, lanes))
                if q4:
                    xlo = _load_vec(builder, q_ptr, xq_off, vb)
                    xhi = _load_vec(builder, q_ptr, builder.add(xq_off, _c(nbytes)), vb)
                    xsv = _load_vec(builder, xs_ptr, builder.add(builder.mul(toks[j], xs_row), lane_off), _vec(F32, lanes))
                else:
                    xu = _load_vec(builder, q_ptr, xq_off, vb)
                for i in range(R):
                    k = i * T + j
                    if q4:
                        lo, hi, d, m = ws[i]
                        dot = _dpbusd(builder, _dpbusd(builder, zero, lo, xlo), hi, xhi)
                        acc = _fma(builder, builder.sitofp(dot, _vec(F32, lanes)), builder.fmul(d, xd), new[k])
                        new[k] = _fma(builder, m, xsv, acc)
                    else:
                        raw, corr, d, _ = ws[i]
                        dot = builder.sub(_dpbusd(builder, zero, xu, raw), corr)
                        new[k] = _fma(builder, builder.sitofp(dot, _vec(F32, lanes)), builder.fmul(d, xd), new[k])
            return new

        z16 = ir.Constant(_vec(F32, 16), [0.0] * 16)
        zt = ir.Constant(_vec(F32, tail_lanes), [0.0] * tail_lanes)
        main = _block_loop(builder, n_vec, lambda g, a: step(g, a, 64, 16, per_vec), [z16] * (R * T))
        # blocks past the last full vector, one at a time (their lanes are laid out per block)
        first_tail = builder.mul(n_vec, _c(per_vec))
        tail = _block_loop(builder, builder.sub(n_blocks, first_tail),
                           lambda b, a: step(builder.add(first_tail, b), a, 16 if q4 else 32, tail_lanes, 1),
                           [zt] * (R * T))
        for i in range(R):
            col = builder.add(or0, _c(i))
            with builder.if_then(builder.icmp_signed("<", col, r_end)):
                for j in range(T):
                    k = i * T + j
                    total = builder.fadd(_tree_sum(builder, main[k]), _tree_sum(builder, tail[k]))
                    dst = builder.add(builder.mul(toks[j], o_row), col)
                    builder.store(total, builder.gep(o_ptr, [dst]))
        return context.get_dummy_value()

    return codegen


def _fast(fmt, R, T):
    def dot(typingctx, w, s, wr0, qx, dx, xs, t0, out, or0, r_end):
        return types.void(w, s, wr0, qx, dx, xs, t0, out, or0, r_end), _fast_codegen(fmt, R, T)

    dot.__name__ = dot.__qualname__ = f"idot_{fmt}_{R}x{T}"
    return intrinsic(dot)


# idot_<fmt>_<R>x<T>(w, s, wr0, qx, dx, xs, t0, out, or0, r_end): as engine.simd's dot_*,
# with the activations quantized by kernels.quantize_rows.
idot_q4_4x4, idot_q4_4x3, idot_q4_4x2 = _fast("q4", 4, 4), _fast("q4", 4, 3), _fast("q4", 4, 2)
idot_q4_4x1, idot_q4_1x1 = _fast("q4", 4, 1), _fast("q4", 1, 1)
idot_q8_4x4, idot_q8_4x3, idot_q8_4x2 = _fast("q8", 4, 4), _fast("q8", 4, 3), _fast("q8", 4, 2)
idot_q8_4x1, idot_q8_1x1 = _fast("q8", 4, 1), _fast("q8", 1, 1)
