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


def _fold8(builder, v, n):
    """Add the 8-lane quarters (or halves) of an n-lane vector: <n x float> -> <8 x float>."""
    parts = [builder.shuffle_vector(v, v, ir.Constant(_vec(I32, 8), list(range(i, i + 8))))
             for i in range(0, n, 8)]
    out = parts[0]
    for p in parts[1:]:
        out = builder.fadd(out, p, flags=("fast",))
    return out


def _rows_codegen(fmt, n_tok):
    """Codegen for dot_q4_x{n} / dot_q8_x{n}: one weight row against n_tok tokens at once. The
    row's block is unpacked to floats once and used for every token (weights read once per step)."""

    def codegen(context, builder, signature, args):
        if fmt == "q4":
            qt, st, xt, _, xst, ot, _ = signature.args
            q, s, x, t0, xs, out, r = args
        else:
            qt, st, xt, _, ot, _ = signature.args
            q, s, x, t0, out, r = args
        q_ptr = _data(context, builder, qt, q)
        s_ptr = _data(context, builder, st, s)
        x_ptr = _data(context, builder, xt, x)
        o_ptr = _data(context, builder, ot, out)
        xs_ptr = _data(context, builder, xst, xs) if fmt == "q4" else None
        x_row = _shape(context, builder, xt, x, 1)
        o_row = _shape(context, builder, ot, out, 1)
        xs_row = _shape(context, builder, xst, xs, 1) if fmt == "q4" else None
        nitems = context.make_array(qt)(context, builder, q).nitems
        n_blocks = builder.udiv(nitems, ir.Constant(I64, 16 if fmt == "q4" else 32))
        v16f, v32f, v8f = _vec(F32, 16), _vec(F32, 32), _vec(F32, 8)
        fl = ("fast",)
        tok = [builder.add(t0, ir.Constant(I64, i)) for i in range(n_tok)]
        x_base = [builder.mul(t, x_row) for t in tok]

        def body(b, accs):
            new = []
            if fmt == "q4":
                raw = _load_vec(builder, q_ptr, builder.mul(b, ir.Constant(I64, 16)), _vec(I8, 16))
                lo = builder.uitofp(builder.and_(raw, ir.Constant(_vec(I8, 16), [15] * 16)), v16f)
                hi = builder.uitofp(builder.lshr(raw, ir.Constant(_vec(I8, 16), [4] * 16)), v16f)
                two_b = builder.mul(b, ir.Constant(I64, 2))
                d = _splat(builder, _half_at(builder, s_ptr, two_b), 8)
                m = _half_at(builder, s_ptr, builder.add(two_b, ir.Constant(I64, 1)))
            else:
                raw = _load_vec(builder, q_ptr, builder.mul(b, ir.Constant(I64, 32)), _vec(I8, 32))
                qf = builder.sitofp(raw, v32f)
                d = _splat(builder, _half_at(builder, s_ptr, b), 8)
            xo = builder.mul(b, ir.Constant(I64, 32))
            for i in range(n_tok):
                base = builder.add(x_base[i], xo)
                if fmt == "q4":
                    xl = _load_vec(builder, x_ptr, base, v16f)
                    xh = _load_vec(builder, x_ptr, builder.add(base, ir.Constant(I64, 16)), v16f)
                    t = builder.fadd(builder.fmul(lo, xl, flags=fl), builder.fmul(hi, xh, flags=fl), flags=fl)
                    t = _fold8(builder, t, 16)
                else:
                    t = _fold8(builder, builder.fmul(qf, _load_vec(builder, x_ptr, base, v32f), flags=fl), 32)
                acc = builder.fadd(accs[2 * i], builder.fmul(t, d, flags=fl), flags=fl)
                macc = accs[2 * i + 1]
                if fmt == "q4":
                    xsb = builder.load(builder.gep(xs_ptr, [builder.add(builder.mul(tok[i], xs_row), b)]))
                    macc = builder.fadd(macc, builder.fmul(m, xsb, flags=fl), flags=fl)
                new += [acc, macc]
            return new

        zero8, zero = ir.Constant(v8f, [0.0] * 8), ir.Constant(F32, 0.0)
        accs = _block_loop(builder, n_blocks, body, [zero8, zero] * n_tok)
        for i in range(n_tok):
            total = builder.fadd(_hsum(builder, accs[2 * i], 8), accs[2 * i + 1])
            builder.store(total, builder.gep(o_ptr, [builder.add(builder.mul(tok[i], o_row), r)]))
        return context.get_dummy_value()

    return codegen


@intrinsic
def dot_q4_x1(typingctx, q, s, x, t0, xsum, out, r):
    """out[t0, r] = Q4 row . x[t0] (the single-sequence decode step)."""
    return types.void(q, s, x, t0, xsum, out, r), _rows_codegen("q4", 1)


@intrinsic
def dot_q8_x1(typingctx, q, s, x, t0, out, r):
    """out[t0, r] = Q8 row . x[t0]."""
    return types.void(q, s, x, t0, out, r), _rows_codegen("q8", 1)


@intrinsic
def dot_q4_x4(typingctx, q, s, x, t0, xsum, out, r):
    """out[t0+i, r] = Q4 row . x[t0+i] for i < 4 (x, xsum, out are [tokens, ...] arrays)."""
    return types.void(q, s, x, t0, xsum, out, r), _rows_codegen("q4", 4)


@intrinsic
def dot_q8_x4(typingctx, q, s, x, t0, out, r):
    """out[t0+i, r] = Q8 row . x[t0+i] for i < 4."""
    return types.void(q, s, x, t0, out, r), _rows_codegen("q8", 4)


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



@intrinsic
def dequant_row(typingctx, q, s, out, fmt_q4):
    """out[:cols] = one Q4 (fmt_q4 true: nibbles, (d, m) pairs) or Q8 (int8, d) row as float32,
    a block (32 values) per vector step."""
    sig = types.void(q, s, out, fmt_q4)

    def codegen(context, builder, signature, args):
        qt, st, ot, _ = signature.args
        q_ptr = _data(context, builder, qt, args[0])
        s_ptr = _data(context, builder, st, args[1])
        o_ptr = _data(context, builder, ot, args[2])
        nitems = context.make_array(qt)(context, builder, args[0]).nitems
        v16f, v32f = _vec(F32, 16), _vec(F32, 32)
        fl = ("fast",)
        is_q4 = args[3]
        q4_blk = builder.append_basic_block("q4")
        q8_blk = builder.append_basic_block("q8")
        end = builder.append_basic_block("end")
        builder.cbranch(is_q4, q4_blk, q8_blk)

        builder.position_at_end(q4_blk)

        def body4(b, accs):
            raw = _load_vec(builder, q_ptr, builder.mul(b, ir.Constant(I64, 16)), _vec(I8, 16))
            lo = builder.uitofp(builder.and_(raw, ir.Constant(_vec(I8, 16), [15] * 16)), v16f)
            hi = builder.uitofp(builder.lshr(raw, ir.Constant(_vec(I8, 16), [4] * 16)), v16f)
            two_b = builder.mul(b, ir.Constant(I64, 2))
            d = _splat(builder, _half_at(builder, s_ptr, two_b), 16)
            m = _splat(builder, _half_at(builder, s_ptr, builder.add(two_b, ir.Constant(I64, 1))), 16)
            o = builder.mul(b, ir.Constant(I64, 32))
            for part, off in ((lo, 0), (hi, 16)):
                v = builder.fadd(builder.fmul(part, d, flags=fl), m, flags=fl)
                p = builder.gep(o_ptr, [builder.add(o, ir.Constant(I64, off))])
                builder.store(v, builder.bitcast(p, v16f.as_pointer()), align=1)
            return []

        _block_loop(builder, builder.udiv(nitems, ir.Constant(I64, 16)), body4, [])
        builder.branch(end)

        builder.position_at_end(q8_blk)

        def body8(b, accs):
            o = builder.mul(b, ir.Constant(I64, 32))
            qf = builder.sitofp(_load_vec(builder, q_ptr, o, _vec(I8, 32)), v32f)
            v = builder.fmul(qf, _splat(builder, _half_at(builder, s_ptr, b), 32), flags=fl)
            builder.store(v, builder.bitcast(builder.gep(o_ptr, [o]), v32f.as_pointer()), align=1)
            return []

        _block_loop(builder, builder.udiv(nitems, ir.Constant(I64, 32)), body8, [])
        builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return sig, codegen
