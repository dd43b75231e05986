"""Softmax and GELU legalized to TE that vectorises on every target the export compiles for.

TVM legalizes softmax with exp and GELU with erf, which LLVM turns into one libm call per
element (expf / erff): no vector form. Relax's FastMathTransform swaps in TOPI's fast_exp, but
that rounds with floor, which the generic x86-64 target (SSE2, no roundps) also calls libm for.
So the export legalizes the two ops itself:

  exp(x)   range reduction to x = n ln2 + r with n = floor(x log2(e) + 1/2) computed by an
           int32 truncation of a positive value (no floor) and ln2 in two parts (Cody-Waite),
           exp(r) by its degree-6 Taylor polynomial (|r| <= ln2 / 2), 2^n by building the
           float's exponent bits; x clamped to [-87.3, 88] (2^n stays a normal float);
           relative error < 5e-7 (tests/test_tvm_schedule.py);
  softmax  max-subtracted as TOPI's, with that exp;
  GELU     x / 2 (1 + erf(x / sqrt 2)) with TOPI's fast_erf (a rational polynomial).

Both are float32 only (the export's float part); other dtypes keep TVM's legalization.
"""

from __future__ import annotations

import math

EXP_LO, EXP_HI = -87.3, 88.0
LN2_HI = 0.693359375  # ln 2 in 9 significant bits (n * LN2_HI is exact), and the rest
LN2_LO = math.log(2.0) - LN2_HI
TAYLOR = [1.0 / math.factorial(i) for i in range(6, -1, -1)]  # r^6 .. r^0


def exp_expr(x):
    """exp of a float32 PrimExpr, vectorisable (see the module docstring)."""
    from tvm import tirx

    f32 = "float32"
    x = tirx.max(tirx.min(x, tirx.const(EXP_HI, f32)), tirx.const(EXP_LO, f32))
    # floor(t + 1/2) by truncation: t + 1/2 + 128 > 0 over the clamped range
    n = tirx.Cast("int32", x * tirx.const(1.0 / math.log(2.0), f32) + tirx.const(128.5, f32)) - 128
    nf = tirx.Cast(f32, n)
    r = x - nf * tirx.const(LN2_HI, f32) - nf * tirx.const(LN2_LO, f32)
    p = tirx.const(TAYLOR[0], f32)
    for c in TAYLOR[1:]:
        p = p * r + tirx.const(c, f32)
    return p * tirx.reinterpret(f32, (n + 127) << 23)


def _softmax(bb, call):
    from tvm import te, topi

    axis = int(call.attrs.axis)

    def compute(x):
        delta = topi.subtract(x, topi.max(x, axis=axis, keepdims=True))
        e = te.compute(delta.shape, lambda *i: exp_expr(delta(*i)), name="exp")
        return topi.divide(e, topi.sum(e, axis=axis, keepdims=True))

    return bb.call_te(compute, call.args[0], primfunc_name_hint="softmax")


def _gelu(bb, call):
    from tvm import topi

    def compute(x):
        return topi.multiply(x, topi.add(0.5, topi.multiply(topi.fast_erf(topi.multiply(x, math.sqrt(0.5))), 0.5)))

    return bb.call_te(compute, call.args[0], primfunc_name_hint="gelu")


def _float32_only(fn):
    """A legalization for float32 inputs; TVM's own (the op's FLegalize) for others."""

    def legalize(bb, call):
        from tvm import ir

        if str(call.args[0].ty.dtype) == "float32":
            return fn(bb, call)
        return ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)

    return legalize


LEGALIZE = {"relax.nn.softmax": _float32_only(_softmax), "relax.nn.gelu": _float32_only(_gelu)}
