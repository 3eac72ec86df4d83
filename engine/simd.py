"""Explicit-vector row dots for the matrix-vector (decode) path, written as Numba intrinsics.

Numba types small-integer arithmetic as int64, so a nibble unpacked in plain Numba code turns
into 64-bit lanes and the loop vectorizes poorly. These intrinsics spell the block loop in LLVM
vector IR instead: 16 or 32 bytes of a row -> <N x i32> -> <N x float>, multiplied by the
activations and accumulated across blocks in vector registers with the block's scale; one
horizontal sum per row. The IR is target-independent (LLVM picks AVX2, AVX-512 or NEON), and
the arithmetic is float32 like the rest of the engine: no activation quantization.

The row dots take one weight row as 1-D C-contiguous arrays: q its nibbles (uint8, Q4) or int8
values (Q8), s its fp16 scales as uint16 ((d, m) pairs for Q4); x the [tokens, cols] float32
activations, xsum their per-block sums (Q4), and write out[t, r] for 1 or 4 tokens from t0.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

F32 = ir.FloatType()
HALF = ir.HalfType()
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(builder, value, n):
    vt = _vec(value.type, n)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(_vec(I32, n), [0] * n))


def _data(context, builder, aryty, ary):
    return context.make_array(aryty)(context, builder, ary).data


def _load_vec(builder, base_ptr, elem_index, vt):
    """Load vector type vt starting at element elem_index of base_ptr (unaligned)."""
    p = builder.gep(base_ptr, [elem_index])
    return builder.load(builder.bitcast(p, vt.as_pointer()), align=1)


def _half_at(builder, s_ptr, index):
    bits = builder.load(builder.gep(s_ptr, [index]))
    return builder.fpext(builder.bitcast(bits, HALF), F32)


def _hsum(builder, v, n):
    total = builder.extract_element(v, ir.Constant(I32, 0))
    for i in range(1, n):
        total = builder.fadd(total, builder.extract_element(v, ir.Constant(I32, i)))
    return total


def _block_loop(builder, n_blocks, body, acc_init):
    """for b in range(n_blocks): accs = body(b, accs); returns the final accs."""
    pre = builder.block
    loop = builder.append_basic_block("blocks")
    done = builder.append_basic_block("done")
    has_work = builder.icmp_signed(">", n_blocks, ir.Constant(I64, 0))
    builder.cbranch(has_work, loop, done)
    builder.position_at_end(loop)
    b = builder.phi(I64)
    b.add_incoming(ir.Constant(I64, 0), pre)
    phis = []
    for init in acc_init:
        phi = builder.phi(init.type)
        phi.add_incoming(init, pre)
        phis.append(phi)
    new = body(b, phis)
    b_next = builder.add(b, ir.Constant(I64, 1))
    for phi, v in zip(phis, new):
        phi.add_incoming(v, builder.block)
    b.add_incoming(b_next, builder.block)
    builder.cbranch(builder.icmp_signed("<", b_next, n_blocks), loop, done)
    end = builder.block
    builder.position_at_end(done)
    out = []
    for init, v in zip(acc_init, new):
        phi = builder.phi(init.type)
        phi.add_incoming(init, pre)
        phi.add_incoming(v, end)
        out.append(phi)
    return out


def _shape(context, builder, aryty, ary, dim):
    return builder.extract_value(context.make_array(aryty)(context, builder, ary).shape, dim)


@intrinsic
def scores16(typingctx, kb, j0, q, qo, scale, out, oo):
    """out[oo:oo+16] = scale * sum_d q[qo+d] * kb[d, j0:j0+16], kb a [head_dim, n] key block.
    Sixteen attention scores from head_dim vector multiply-adds held in one register."""
    sig = types.void(kb, j0, q, qo, scale, out, oo)

    def codegen(context, builder, signature, args):
        kbt, _, qt, _, _, ot, _ = signature.args
        kb_ptr = _data(context, builder, kbt, args[0])
        q_ptr = _data(context, builder, qt, args[2])
        o_ptr = _data(context, builder, ot, args[5])
        head_dim = _shape(context, builder, kbt, args[0], 0)
        row = _shape(context, builder, kbt, args[0], 1)
        j0v, qov, oov = args[1], args[3], args[6]
        v16 = _vec(F32, 16)

        def body(d, accs):
            (acc,) = accs
            k = _load_vec(builder, kb_ptr, builder.add(builder.mul(d, row), j0v), v16)
            qd = builder.load(builder.gep(q_ptr, [builder.add(qov, d)]))
            return [builder.fadd(acc, builder.fmul(k, _splat(builder, qd, 16), flags=("fast",)), flags=("fast",))]

        (acc,) = _block_loop(builder, head_dim, body, [ir.Constant(v16, [0.0] * 16)])
        acc = builder.fmul(acc, _splat(builder, args[4], 16))
        p = builder.gep(o_ptr, [oov])
        builder.store(acc, builder.bitcast(p, v16.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def axpy16(typingctx, w, wo, n, v, c0, out, oo):
    """out[oo:oo+16] += sum_{p<n} w[wo+p] * v[p, c0:c0+16], v a [n, head_dim] value block.
    A weighted sum of value rows, sixteen lanes at a time, accumulated in one register."""
    sig = types.void(w, wo, n, v, c0, out, oo)

    def codegen(context, builder, signature, args):
        wt, _, _, vt, _, ot, _ = signature.args
        w_ptr = _data(context, builder, wt, args[0])
        v_ptr = _data(context, builder, vt, args[3])
        o_ptr = _data(context, builder, ot, args[5])
        row = _shape(context, builder, vt, args[3], 1)
        wov, nv, c0v, oov = args[1], args[2], args[4], args[6]
        v16 = _vec(F32, 16)
        out_vec_ptr = builder.bitcast(builder.gep(o_ptr, [oov]), v16.as_pointer())
        init = builder.load(out_vec_ptr, align=1)

        def body(p, accs):
            (acc,) = accs
            vv = _load_vec(builder, v_ptr, builder.add(builder.mul(p, row), c0v), v16)
            wp = builder.load(builder.gep(w_ptr, [builder.add(wov, p)]))
            return [builder.fadd(acc, builder.fmul(vv, _splat(builder, wp, 16), flags=("fast",)), flags=("fast",))]

        (acc,) = _block_loop(builder, nv, body, [init])
        builder.store(acc, out_vec_ptr, align=1)
        return context.get_dummy_value()

    return sig, codegen


# Cephes' single-precision exp: exp(x) = 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2 (~1 ulp).
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)


def _vexp(builder, module, x, n):
    vf = _vec(F32, n)

    def c(v):
        return ir.Constant(vf, [v] * n)

    name = f"llvm.floor.v{n}f32"
    floor = module.globals.get(name) or ir.Function(module, ir.FunctionType(vf, [vf]), name=name)
    x = builder.select(builder.fcmp_ordered("<", x, c(-87.33654)), c(-87.33654), x)
    x = builder.select(builder.fcmp_ordered(">", x, c(88.72283)), c(88.72283), x)
    fx = builder.call(floor, [builder.fadd(builder.fmul(x, c(1.44269504088896341)), c(0.5))])
    x = builder.fsub(builder.fsub(x, builder.fmul(fx, c(0.693359375))), builder.fmul(fx, c(-2.12194440e-4)))
    y = c(_EXP_POLY[0])
    for p in _EXP_POLY[1:]:
        y = builder.fadd(builder.fmul(y, x), c(p))
    y = builder.fadd(builder.fadd(builder.fmul(builder.fmul(y, x), x), x), c(1.0))
    n_int = builder.fptosi(fx, _vec(I32, n))
    bits = builder.shl(builder.add(n_int, ir.Constant(_vec(I32, n), [127] * n)), ir.Constant(_vec(I32, n), [23] * n))
    return builder.fmul(y, builder.bitcast(bits, vf))


@intrinsic
def exp16(typingctx, s, off, shift, n_valid):
    """s[off:off+16] = exp(s - shift) for the first n_valid lanes and 0 for the rest; returns
    their sum. The softmax of attention, sixteen lanes at a time (no vector exp in Numba)."""
    sig = types.float32(s, off, shift, n_valid)

    def codegen(context, builder, signature, args):
        st = signature.args[0]
        vf = _vec(F32, 16)
        p = builder.bitcast(builder.gep(_data(context, builder, st, args[0]), [args[1]]), vf.as_pointer())
        x = builder.fsub(builder.load(p, align=1), _splat(builder, args[2], 16))
        e = _vexp(builder, builder.module, x, 16)
        lanes = ir.Constant(_vec(I64, 16), list(range(16)))
        valid = builder.icmp_signed("<", lanes, _splat(builder, args[3], 16))
        e = builder.select(valid, e, ir.Constant(vf, [0.0] * 16))
        builder.store(e, p, align=1)
        return _hsum(builder, e, 16)

    return sig, codegen


# --------------------------------------------------------------------------------------------
# Exact-mode weight products: one arithmetic for every path (batch invariance)
#
# Every (row, token) dot is: for each 32-block b in order, w = the block dequantized to two
# 16-lane float vectors (Q4: fma(q, d, m); Q8: q * d; F16/F32: converted), then
# acc = fma(w_lo, x_lo, acc); acc = fma(w_hi, x_hi, acc); at the end one fixed horizontal-sum
# tree. The matrix-vector kernels dequantize in registers, the matrix path dequantizes a tile
# once (with the same IR) and runs the same fmas from it: so a token's logits are the same bits
# whatever the batch, the chunking or the path. Explicit llvm.fma and no fast-math flags, so
# LLVM cannot reassociate differently in different callers.

FMTS = ("q4", "q8", "f16", "f32")


def _fma(builder, a, b, c):
    n = a.type.count
    vf = _vec(F32, n)
    name = f"llvm.fma.v{n}f32"
    mod = builder.module
    fn = mod.globals.get(name) or ir.Function(mod, ir.FunctionType(vf, [vf, vf, vf]), name=name)
    return builder.call(fn, [a, b, c])


def _tree_sum(builder, v):
    """Horizontal sum in a fixed order: halves added pairwise until one lane is left."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(_vec(I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(_vec(I32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(I32, 0))


def _halves(builder, fmt, w_ptr, s_ptr, row_w, row_s, b):
    """Block b of a weight row as two <16 x float> (elements 0-15, 16-31). row_w / row_s: the
    row's first element index in w / s."""
    v16f = _vec(F32, 16)
    c = lambda v: ir.Constant(I64, v)  # noqa: E731
    if fmt == "q4":
        raw = _load_vec(builder, w_ptr, builder.add(row_w, builder.mul(b, c(16))), _vec(I8, 16))
        lo = builder.uitofp(builder.and_(raw, ir.Constant(_vec(I8, 16), [15] * 16)), v16f)
        hi = builder.uitofp(builder.lshr(raw, ir.Constant(_vec(I8, 16), [4] * 16)), v16f)
        two_b = builder.add(row_s, builder.mul(b, c(2)))
        d = _splat(builder, _half_at(builder, s_ptr, two_b), 16)
        m = _splat(builder, _half_at(builder, s_ptr, builder.add(two_b, c(1))), 16)
        return _fma(builder, lo, d, m), _fma(builder, hi, d, m)
    o = builder.add(row_w, builder.mul(b, c(32)))
    if fmt == "q8":
        d = _splat(builder, _half_at(builder, s_ptr, builder.add(row_s, b)), 16)
        return tuple(builder.fmul(builder.sitofp(_load_vec(builder, w_ptr, builder.add(o, c(k)), _vec(I8, 16)), v16f), d)
                     for k in (0, 16))
    if fmt == "f16":
        return tuple(builder.fpext(builder.bitcast(_load_vec(builder, w_ptr, builder.add(o, c(k)), _vec(I16, 16)),
                                                   _vec(HALF, 16)), v16f) for k in (0, 16))
    return tuple(_load_vec(builder, w_ptr, builder.add(o, c(k)), v16f) for k in (0, 16))


def _i64(builder, v):
    return builder.sext(v, I64) if v.type.width < 64 else v


def _n_blocks(builder, fmt, row_len):
    return builder.udiv(row_len, ir.Constant(I64, 16 if fmt == "q4" else 32))


def _exact_codegen(fmt, R, T):
    """out[t0+j, or0+i] = W[wr0+i] . x[t0+j] for i < R (stored when or0+i < r_end), j < T."""

    def codegen(context, builder, signature, args):
        wt, st, _, xt, _, ot, _, _ = signature.args
        w, s, wr0, x, t0, out, or0, r_end = args
        wr0, t0, or0, r_end = (_i64(builder, v) for v in (wr0, t0, or0, r_end))
        w_ptr, s_ptr = _data(context, builder, wt, w), _data(context, builder, st, s)
        x_ptr, o_ptr = _data(context, builder, xt, x), _data(context, builder, ot, out)
        w_row, s_row = _shape(context, builder, wt, w, 1), _shape(context, builder, st, s, 1)
        x_row, o_row = _shape(context, builder, xt, x, 1), _shape(context, builder, ot, out, 1)
        c = lambda v: ir.Constant(I64, v)  # noqa: E731
        rows = [builder.add(wr0, c(i)) for i in range(R)]
        x_base = [builder.mul(builder.add(t0, c(j)), x_row) for j in range(T)]

        def body(b, accs):
            ws = [_halves(builder, fmt, w_ptr, s_ptr, builder.mul(r, w_row), builder.mul(r, s_row), b)
                  for r in rows]
            new = list(accs)
            for j in range(T):
                o = builder.add(x_base[j], builder.mul(b, c(32)))
                xlo = _load_vec(builder, x_ptr, o, _vec(F32, 16))
                xhi = _load_vec(builder, x_ptr, builder.add(o, c(16)), _vec(F32, 16))
                for i in range(R):
                    k = i * T + j
                    new[k] = _fma(builder, ws[i][1], xhi, _fma(builder, ws[i][0], xlo, new[k]))
            return new

        zero = ir.Constant(_vec(F32, 16), [0.0] * 16)
        accs = _block_loop(builder, _n_blocks(builder, fmt, w_row), body, [zero] * (R * T))
        for i in range(R):
            col = builder.add(or0, c(i))
            with builder.if_then(builder.icmp_signed("<", col, r_end)):
                for j in range(T):
                    dst = builder.add(builder.mul(builder.add(t0, c(j)), o_row), col)
                    builder.store(_tree_sum(builder, accs[i * T + j]), builder.gep(o_ptr, [dst]))
        return context.get_dummy_value()

    return codegen


def _exact(fmt, R, T):
    def dot(typingctx, w, s, wr0, x, t0, out, or0, r_end):
        return types.void(w, s, wr0, x, t0, out, or0, r_end), _exact_codegen(fmt, R, T)

    dot.__name__ = dot.__qualname__ = f"dot_{fmt}_{R}x{T}"
    return intrinsic(dot)


# dot_<fmt>_<R>x<T>(w, s, wr0, x, t0, out, or0, r_end): w, s one layer's [rows, ...] values and
# scales; R rows from wr0 against T tokens from t0, into out[t, or0 + i] while or0 + i < r_end.
# 4x2 and 4x3 serve a verify step's 2-3 rows with one pass over the 4 weight rows (4x1 twice
# or three times would dequantize them again for every token).
dot_q4_4x4, dot_q4_4x3, dot_q4_4x2 = _exact("q4", 4, 4), _exact("q4", 4, 3), _exact("q4", 4, 2)
dot_q4_4x1, dot_q4_1x1 = _exact("q4", 4, 1), _exact("q4", 1, 1)
dot_q8_4x4, dot_q8_4x3, dot_q8_4x2 = _exact("q8", 4, 4), _exact("q8", 4, 3), _exact("q8", 4, 2)
dot_q8_4x1, dot_q8_1x1 = _exact("q8", 4, 1), _exact("q8", 1, 1)
dot_f16_4x4, dot_f16_4x3, dot_f16_4x2 = _exact("f16", 4, 4), _exact("f16", 4, 3), _exact("f16", 4, 2)
dot_f16_4x1, dot_f16_1x1 = _exact("f16", 4, 1), _exact("f16", 1, 1)
dot_f32_4x4, dot_f32_4x3, dot_f32_4x2 = _exact("f32", 4, 4), _exact("f32", 4, 3), _exact("f32", 4, 2)
dot_f32_4x1, dot_f32_1x1 = _exact("f32", 4, 1), _exact("f32", 1, 1)
# 4x5: a step of five rows (a verify step of 4 drafts) in one pass, not 4x4 then 4x1
dot_q4_4x5, dot_q8_4x5, dot_f16_4x5, dot_f32_4x5 = (_exact(f, 4, 5) for f in FMTS)


def _dequant(fmt):
    def dequant(typingctx, w, s, r, out):
        def codegen(context, builder, signature, args):
            wt, st, _, ot = signature.args
            w, s, r, out = args
            r = _i64(builder, r)
            w_ptr, s_ptr = _data(context, builder, wt, w), _data(context, builder, st, s)
            o_ptr = _data(context, builder, ot, out)
            w_row, s_row = _shape(context, builder, wt, w, 1), _shape(context, builder, st, s, 1)

            def body(b, accs):
                halves = _halves(builder, fmt, w_ptr, s_ptr, builder.mul(r, w_row), builder.mul(r, s_row), b)
                o = builder.mul(b, ir.Constant(I64, 32))
                for v, k in zip(halves, (0, 16)):
                    p = builder.gep(o_ptr, [builder.add(o, ir.Constant(I64, k))])
                    builder.store(v, builder.bitcast(p, _vec(F32, 16).as_pointer()), align=1)
                return []

            _block_loop(builder, _n_blocks(builder, fmt, w_row), body, [])
            return context.get_dummy_value()

        return types.void(w, s, r, out), codegen

    dequant.__name__ = dequant.__qualname__ = f"dequant_{fmt}"
    return intrinsic(dequant)


# dequant_<fmt>(w, s, r, out): out[:cols] = row r of w as float32, through the same block
# dequantization as the dots (the matrix path's tile, the embedding lookup).
dequant_q4, dequant_q8, dequant_f16 = _dequant("q4"), _dequant("q8"), _dequant("f16")


@intrinsic
def silu_mul16(typingctx, gate_up, k0, d_ffn, out):
    """out[k0:k0+16] = silu(gate) * up, gate = gate_up[k0:k0+16], up = gate_up[d_ffn+k0:...]."""
    sig = types.void(gate_up, k0, d_ffn, out)

    def codegen(context, builder, signature, args):
        gt, _, _, ot = signature.args
        vf = _vec(F32, 16)
        g_ptr = _data(context, builder, gt, args[0])
        gate = _load_vec(builder, g_ptr, args[1], vf)
        up = _load_vec(builder, g_ptr, builder.add(args[2], args[1]), vf)
        one = ir.Constant(vf, [1.0] * 16)
        e = _vexp(builder, builder.module, builder.fsub(ir.Constant(vf, [0.0] * 16), gate), 16)
        silu = builder.fdiv(gate, builder.fadd(one, e))
        p = builder.gep(_data(context, builder, ot, args[3]), [args[1]])
        builder.store(builder.fmul(silu, up), builder.bitcast(p, vf.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen
