"""2^x for the scan's decays a_t = exp(Δ A) = 2^(Δ A log2 e), by the dtype of the kernel.

    exp2_for(real)   the device function a kernel built for `real` (numba.float32 or float64) calls

float32: the hardware's approximate exp2 as one instruction, ex2.approx.ftz.f32 through inline PTX
(numba.cuda offers no way to ask for it). math.exp2 without fast-math flags compiles to the same
approximation (relative error about 2^-22) wrapped in a compare and two conditional multiplies that
compute results below 2^-126 exactly as subnormals; here those results are zero ("ftz": flush to
zero). For a decay that is no loss: a_t < 1.2e-38 forgets the state either way, and it changes h_t
by less than 1.2e-38 |h_{t-1}|. Each exp2 is then one instruction instead of four (sm_90: FSETP and
two conditional FMUL around MUFU.EX2); the forward takes two per state and step (local scan and
fix-up), the backward one.

float64: math.exp2 (libdevice, exact to an ulp).

Under the CUDA simulator (no inline PTX) the float32 version is math.exp2 with the same flush.
"""
import math

from minilm.kernels.cuda import _device
from minilm.kernels.cuda._device import cuda

SMALLEST_NORMAL = 1.1754943508222875e-38      # 2^-126: float32 results below it are flushed to zero


def _build_device():
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def exp2_flush(typingctx, x):
        def codegen(context, builder, signature, args):
            ex2 = ir.InlineAsm(ir.FunctionType(ir.FloatType(), [ir.FloatType()]),
                               "ex2.approx.ftz.f32 $0, $1;", "=f,f")
            return builder.call(ex2, args)
        return types.float32(types.float32), codegen

    return exp2_flush


def _build_simulated():
    @cuda.jit(device=True)
    def exp2_flush(x):
        y = math.exp2(x)
        return y if y >= SMALLEST_NORMAL else y - y
    return exp2_flush


if cuda is None:  # pragma: no cover - numba.cuda missing: the kernels are not available either
    exp2_flush = exp2_exact = None
else:
    exp2_flush = _build_simulated() if _device.simulator_enabled() else _build_device()

    @cuda.jit(device=True)
    def exp2_exact(x):
        return math.exp2(x)


def exp2_for(real):
    """exp2_flush for float32 kernels, exp2_exact for float64 ones."""
    import numba
    return exp2_flush if real == numba.float32 else exp2_exact
