"""Vectorizable exp, softplus and sigmoid for Numba kernels.

Numba compiles ``math.exp`` to a call into the C math library. A loop that contains a call cannot
be turned into SIMD code, and in the selective scan that one call per state element is most of the
time. The functions here use only arithmetic, selects and one bit-cast, and Numba inlines them
(inline="always"), so LLVM can vectorize the loop around them. Three small LLVM intrinsics help:
``select`` (a branch-free conditional), ``muladd`` (a·b + c, fused where possible) and
``reduce_add`` (an addition LLVM may reorder, so that a sum over a loop vectorizes).

exp(x), the classic method:

    k = round(x / ln 2)                   so that  x = k·ln 2 + r,  |r| <= ln 2 / 2
    r = (x - k·LN2_HI) - k·LN2_LO         ln 2 split in two (Cody-Waite): k·LN2_HI is exact
    e^r ≈ 1 + r + r²/2! + ... + r^m/m!    Taylor polynomial, Horner form (m = 7 float32, 13 float64)
    e^x = e^r · 2^k                       2^k written directly into the exponent bits

The truncation error of the polynomial, about |r|^(m+1)/(m+1)!, is 1e-8 (float32) and 1e-17
(float64) relative, below half an ulp. Multiply-adds are fused where the CPU has FMA.
Measured maximum relative error against exp in extended precision (2 million points each):

    float32  x in [-87.3, 0]: 7.7e-8 (0.6 ulp)      float64  x in [-708.3, 0]: 1.4e-16 (0.6 ulp)
             x in [0, 88.7]:  6.0e-7 (5 ulp)                 x in [0, 709.7]:  6.5e-15 (29 ulp)

(the larger error for x > 0 comes only from x > 127.5·ln 2 = 88.4, resp. 1023.5·ln 2 = 709.4, where
k is capped at the largest normal exponent and |r| grows to ln 2). ``tests/test_kernels_cpu_scan.py``
checks these bounds.

Edge behaviour, exact by construction:
  exp(0) == 1;  exp(-inf) == 0 and exp(x) == 0 for x < FLUSH (-87.68 float32, -708.74 float64):
  k is then the all-zero exponent and 2^k is built as +0.0. Between FLUSH and EXP_MIN (e^x below
  the smallest normal number) the result is a correctly scaled subnormal within a few subnormal
  ulps.  exp(x) == inf for x > EXP_MAX (88.72, 709.78) and exp(inf) == inf.  NaN is not
  propagated (kernel inputs are validated to be finite).

softplus(x) = log(1 + e^x) is computed as max(x, 0) + log1p(e^-|x|), with log1p(e) for e in [0, 1]
from the atanh series log1p(e) = 2·atanh(s) = 2(s + s³/3 + s⁵/5 + ...), s = e / (2 + e) <= 1/3,
summed to s^15 (float32) or s^33 (float64): truncation error < 2e-8 and 2e-17 relative. Above 20 it
returns x itself, the same threshold as the NumPy reference. sigmoid(x) = 1 / (1 + e^-x).

Use these only inside ``@numba.njit`` code: ``exp``, ``softplus`` and ``sigmoid`` are generic over
float32/float64 (the implementation is chosen from the argument type at compile time). The
``*_array`` functions apply them elementwise to a NumPy array, for tests and measurements.
They are inlined into the kernels that call them, and Numba's on-disk cache (cache=True) keys a
kernel on its own source file only: after editing this file, delete the cached kernels
(``__pycache__/*.nbi``, ``*.nbc`` next to the kernel modules) so that they are rebuilt.
"""
import decimal
import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

# ---------------------------------------------------------------------------------------------
# Constants. All are stored in the dtype they are used with: a Python float in a float32 kernel
# would promote the arithmetic to float64 and halve the SIMD width.

_LN2_EXACT = decimal.Decimal(2).ln(decimal.Context(prec=50))


def _split_ln2(dtype, high_bits):
    """ln 2 = hi + lo with hi having only `high_bits` significant bits, so k·hi is exact."""
    scale = 2 ** high_bits
    hi = float(round(_LN2_EXACT * scale)) / scale
    lo = float(_LN2_EXACT - decimal.Decimal(hi))
    return dtype(hi), dtype(lo)


# float32: |k| <= 127 needs 7 bits, hi keeps 9 bits -> k·hi has <= 16 bits, exact in 24.
LN2_HI_F32, LN2_LO_F32 = _split_ln2(np.float32, 9)
# float64: |k| <= 1023 needs 10 bits, hi keeps 32 bits -> <= 42 bits, exact in 53.
LN2_HI_F64, LN2_LO_F64 = _split_ln2(np.float64, 32)

LOG2E_F32 = np.float32(1.0 / math.log(2.0))
LOG2E_F64 = np.float64(1.0 / math.log(2.0))

EXP_MIN_F32 = np.float32(math.log(np.finfo(np.float32).tiny))   # -87.3365, e^x smallest normal
EXP_MAX_F32 = np.float32(math.log(np.finfo(np.float32).max))    # 88.7228, e^x largest finite
EXP_MIN_F64 = np.float64(math.log(np.finfo(np.float64).tiny))   # -708.3964
EXP_MAX_F64 = np.float64(math.log(np.finfo(np.float64).max))    # 709.7827

# x is clamped to [CLAMP_LO, CLAMP_HI] before k is formed, so k stays a small integer:
#   CLAMP_LO gives k = -127 (float32) / -1023 (float64), whose exponent bits are all zero, so
#   2^k is built as +0.0 and e^x comes out exactly 0 with no extra test;
#   CLAMP_HI is above EXP_MAX, so e^CLAMP_HI still overflows to inf.
# k is capped at K_MAX, the largest exponent of a normal number.
CLAMP_LO_F32, CLAMP_HI_F32, K_MAX_F32 = np.float32(-88.0), np.float32(89.0), np.float32(127.0)
CLAMP_LO_F64, CLAMP_HI_F64, K_MAX_F64 = np.float64(-709.0), np.float64(710.0), np.float64(1023.0)
# Below FLUSH, e^x is exactly 0 (round(x / ln 2) <= -127 / -1023).
FLUSH_F32 = np.float32(-126.5 * math.log(2.0))      # -87.68
FLUSH_F64 = np.float64(-1022.5 * math.log(2.0))     # -708.74

# Taylor coefficients 1/j!, highest degree first (Horner order).
INV_FACT_F32 = tuple(np.float32(1.0 / math.factorial(j)) for j in range(7, -1, -1))
INV_FACT_F64 = tuple(np.float64(1.0 / math.factorial(j)) for j in range(13, -1, -1))

# atanh series coefficients 1/(2j+1), highest first.
ATANH_F32 = tuple(np.float32(1.0 / (2 * j + 1)) for j in range(7, -1, -1))
ATANH_F64 = tuple(np.float64(1.0 / (2 * j + 1)) for j in range(16, -1, -1))

SOFTPLUS_THRESHOLD = 20.0

_ZERO_F32, _ONE_F32, _TWO_F32, _HALF_F32 = (np.float32(v) for v in (0.0, 1.0, 2.0, 0.5))
_ZERO_F64, _ONE_F64, _TWO_F64, _HALF_F64 = (np.float64(v) for v in (0.0, 1.0, 2.0, 0.5))
_THRESH_F32 = np.float32(SOFTPLUS_THRESHOLD)
_THRESH_F64 = np.float64(SOFTPLUS_THRESHOLD)

# ---------------------------------------------------------------------------------------------
# 2^k from the exponent bits. k arrives as an integral float; the integer work happens in LLVM IR
# so that it stays in 32-bit lanes for float32 (Numba's own integer typing would widen to int64).


def _pow2_codegen(int_bits, mantissa_bits, bias, float_type):
    def codegen(context, builder, signature, args):
        int_type = ir.IntType(int_bits)
        k = builder.fptosi(args[0], int_type)
        biased = builder.add(k, ir.Constant(int_type, bias))
        bits = builder.shl(biased, ir.Constant(int_type, mantissa_bits))
        return builder.bitcast(bits, float_type)
    return codegen


@intrinsic
def _pow2_f32(typingctx, k):
    """2^k for an integral float32 k in [-126, 127], and +0.0 for k = -127.

    float32 bits: 1 sign, 8 exponent (bias 127), 23 fraction.
    """
    return types.float32(types.float32), _pow2_codegen(32, 23, 127, ir.FloatType())


@intrinsic
def _pow2_f64(typingctx, k):
    """2^k for an integral float64 k in [-1022, 1023], and +0.0 for k = -1023.

    float64 bits: 1 sign, 11 exponent (bias 1023), 52 fraction.
    """
    return types.float64(types.float64), _pow2_codegen(64, 52, 1023, ir.DoubleType())


@intrinsic
def select(typingctx, condition, if_true, if_false):
    """`if_true if condition else if_false` as one LLVM select: no branch, so loops stay vectorizable.

    (A Python conditional expression becomes a branch in Numba's IR; LLVM usually, not always,
    turns it back into a select, and inlining one into another trips Numba's SSA checks.)
    """
    if not isinstance(condition, types.Boolean) or if_true != if_false:
        return None

    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])
    return if_true(condition, if_true, if_false), codegen


@intrinsic
def muladd(typingctx, a, b, c):
    """a·b + c, fused into one FMA instruction where the CPU has one (llvm.fmuladd).

    A fused multiply-add rounds once instead of twice, so it is never less accurate.
    """
    if not isinstance(a, types.Float) or not (a == b == c):
        return None

    def codegen(context, builder, signature, args):
        float_type = args[0].type
        fn = builder.module.declare_intrinsic(
            "llvm.fmuladd", [float_type], ir.FunctionType(float_type, [float_type] * 3))
        return builder.call(fn, args)
    return a(a, b, c), codegen


@intrinsic
def reduce_add(typingctx, total, x):
    """total + x, with permission for LLVM to reorder a chain of these additions.

    Written as ``total = reduce_add(total, x)`` in a loop, it lets the loop vectorizer keep one
    partial sum per SIMD lane and add the lanes at the end. Only this addition carries the
    permission (the 'reassoc' fast-math flag): the rest of the kernel is compiled with strict
    IEEE semantics. The sum may differ from the sequential one by rounding only.
    """
    if not isinstance(total, types.Float) or total != x:
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1], flags=("reassoc",))
    return total(total, x), codegen


# ---------------------------------------------------------------------------------------------
# exp


@numba.njit(cache=True, inline="always", error_model="numpy")
def exp_f32(x):
    """e^x in float32 without a library call (see the module docstring for accuracy)."""
    # select, not min/max: Numba's min/max branch on NaN, which blocks vectorization
    xc = select(x > CLAMP_LO_F32, x, CLAMP_LO_F32)
    xc = select(xc < CLAMP_HI_F32, xc, CLAMP_HI_F32)
    k = np.floor(muladd(xc, LOG2E_F32, _HALF_F32))      # round(x / ln 2)
    k = select(k < K_MAX_F32, k, K_MAX_F32)
    r = muladd(-k, LN2_HI_F32, xc)          # exact: k·LN2_HI has few significant bits
    r = muladd(-k, LN2_LO_F32, r)
    c = INV_FACT_F32
    p = c[0]
    p = muladd(p, r, c[1])
    p = muladd(p, r, c[2])
    p = muladd(p, r, c[3])
    p = muladd(p, r, c[4])
    p = muladd(p, r, c[5])
    p = muladd(p, r, c[6])
    p = muladd(p, r, c[7])
    return p * _pow2_f32(k)


@numba.njit(cache=True, inline="always", error_model="numpy")
def exp_f64(x):
    """e^x in float64 without a library call (see the module docstring for accuracy)."""
    # select, not min/max: Numba's min/max branch on NaN, which blocks vectorization
    xc = select(x > CLAMP_LO_F64, x, CLAMP_LO_F64)
    xc = select(xc < CLAMP_HI_F64, xc, CLAMP_HI_F64)
    k = np.floor(muladd(xc, LOG2E_F64, _HALF_F64))      # round(x / ln 2)
    k = select(k < K_MAX_F64, k, K_MAX_F64)
    r = muladd(-k, LN2_HI_F64, xc)          # exact: k·LN2_HI has few significant bits
    r = muladd(-k, LN2_LO_F64, r)
    c = INV_FACT_F64
    p = c[0]
    p = muladd(p, r, c[1])
    p = muladd(p, r, c[2])
    p = muladd(p, r, c[3])
    p = muladd(p, r, c[4])
    p = muladd(p, r, c[5])
    p = muladd(p, r, c[6])
    p = muladd(p, r, c[7])
    p = muladd(p, r, c[8])
    p = muladd(p, r, c[9])
    p = muladd(p, r, c[10])
    p = muladd(p, r, c[11])
    p = muladd(p, r, c[12])
    p = muladd(p, r, c[13])
    return p * _pow2_f64(k)


# ---------------------------------------------------------------------------------------------
# log1p on [0, 1], softplus, sigmoid


@numba.njit(cache=True, inline="always", error_model="numpy")
def log1p_unit_f32(e):
    """log(1 + e) for e in [0, 1], float32, from the atanh series."""
    s = e / (_TWO_F32 + e)
    s2 = s * s
    c = ATANH_F32
    p = c[0]
    p = muladd(p, s2, c[1])
    p = muladd(p, s2, c[2])
    p = muladd(p, s2, c[3])
    p = muladd(p, s2, c[4])
    p = muladd(p, s2, c[5])
    p = muladd(p, s2, c[6])
    p = muladd(p, s2, c[7])
    return _TWO_F32 * s * p


@numba.njit(cache=True, inline="always", error_model="numpy")
def log1p_unit_f64(e):
    """log(1 + e) for e in [0, 1], float64, from the atanh series."""
    s = e / (_TWO_F64 + e)
    s2 = s * s
    c = ATANH_F64
    p = c[0]
    p = muladd(p, s2, c[1])
    p = muladd(p, s2, c[2])
    p = muladd(p, s2, c[3])
    p = muladd(p, s2, c[4])
    p = muladd(p, s2, c[5])
    p = muladd(p, s2, c[6])
    p = muladd(p, s2, c[7])
    p = muladd(p, s2, c[8])
    p = muladd(p, s2, c[9])
    p = muladd(p, s2, c[10])
    p = muladd(p, s2, c[11])
    p = muladd(p, s2, c[12])
    p = muladd(p, s2, c[13])
    p = muladd(p, s2, c[14])
    p = muladd(p, s2, c[15])
    p = muladd(p, s2, c[16])
    return _TWO_F64 * s * p


@numba.njit(cache=True, inline="always", error_model="numpy")
def softplus_f32(x):
    """log(1 + e^x), and x itself above 20 (float32)."""
    positive = select(x > _ZERO_F32, x, _ZERO_F32)
    sp = positive + log1p_unit_f32(exp_f32(-abs(x)))
    return select(x > _THRESH_F32, x, sp)


@numba.njit(cache=True, inline="always", error_model="numpy")
def softplus_f64(x):
    """log(1 + e^x), and x itself above 20 (float64)."""
    positive = select(x > _ZERO_F64, x, _ZERO_F64)
    sp = positive + log1p_unit_f64(exp_f64(-abs(x)))
    return select(x > _THRESH_F64, x, sp)


@numba.njit(cache=True, inline="always", error_model="numpy")
def sigmoid_f32(x):
    """1 / (1 + e^-x) (float32); e^-x may overflow to inf, giving exactly 0."""
    return _ONE_F32 / (_ONE_F32 + exp_f32(-x))


@numba.njit(cache=True, inline="always", error_model="numpy")
def sigmoid_f64(x):
    """1 / (1 + e^-x) (float64); e^-x may overflow to inf, giving exactly 0."""
    return _ONE_F64 / (_ONE_F64 + exp_f64(-x))


# ---------------------------------------------------------------------------------------------
# Generic names for kernels written once for both dtypes. The Python bodies are what a reader
# would compute; inside @njit code the overloads below replace them.


def exp(x):
    """e^x; in Numba code dispatches to exp_f32 / exp_f64 by the argument type."""
    return np.exp(x)


def softplus(x):
    """log(1 + e^x), x above 20; in Numba code dispatches to softplus_f32 / softplus_f64."""
    return np.where(x > SOFTPLUS_THRESHOLD, x, np.logaddexp(0.0, x))


def sigmoid(x):
    """1 / (1 + e^-x); in Numba code dispatches to sigmoid_f32 / sigmoid_f64."""
    return 1.0 / (1.0 + np.exp(-x))


def _by_dtype(f32_impl, f64_impl):
    """Overload typer: the Python body of the float32 or float64 version, chosen by x's type."""
    def typer(x):
        if x == types.float32:
            return f32_impl.py_func
        if x == types.float64:
            return f64_impl.py_func
        return None
    return typer


overload(exp, inline="always")(_by_dtype(exp_f32, exp_f64))
overload(softplus, inline="always")(_by_dtype(softplus_f32, softplus_f64))
overload(sigmoid, inline="always")(_by_dtype(sigmoid_f32, sigmoid_f64))


# ---------------------------------------------------------------------------------------------
# Array versions (tests, measurements)


@numba.njit(cache=True, error_model="numpy")
def _apply_exp(x, out):
    flat_in = x.ravel()
    flat_out = out.ravel()
    for i in range(flat_in.size):
        flat_out[i] = exp(flat_in[i])


@numba.njit(cache=True, error_model="numpy")
def _apply_softplus(x, out):
    flat_in = x.ravel()
    flat_out = out.ravel()
    for i in range(flat_in.size):
        flat_out[i] = softplus(flat_in[i])


@numba.njit(cache=True, error_model="numpy")
def _apply_sigmoid(x, out):
    flat_in = x.ravel()
    flat_out = out.ravel()
    for i in range(flat_in.size):
        flat_out[i] = sigmoid(flat_in[i])


def _apply(kernel, x):
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x must have dtype float32 or float64, got {x.dtype}")
    out = np.empty_like(x)
    kernel(x, out)
    return out


def exp_array(x):
    """exp applied elementwise to a float32/float64 array (same dtype out)."""
    return _apply(_apply_exp, x)


def softplus_array(x):
    """softplus applied elementwise to a float32/float64 array (same dtype out)."""
    return _apply(_apply_softplus, x)


def sigmoid_array(x):
    """sigmoid applied elementwise to a float32/float64 array (same dtype out)."""
    return _apply(_apply_sigmoid, x)
