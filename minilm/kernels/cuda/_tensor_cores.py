"""Tensor cores from numba.cuda: the TF32 warp-level matrix multiply-add, through inline PTX.

numba.cuda has no API for warp-level matrix instructions; an @intrinsic can emit any PTX, so here:

    tf32(x)                            x rounded to TF32 (10 mantissa bits), still a float32
                                       (cvt.rna.tf32.f32: to nearest, ties away from zero)
    mma_tf32(a0..a3, b0, b1, c0..c3)   D = A B + C for the 16 x 8 x 8 product of one warp
                                       (mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32) -> (d0..d3)

All 32 lanes of a warp call mma_tf32 together; each passes its fragments, lane = 4 g + t
(PTX ISA, "matrix fragments for mma.m16n8k8", .tf32):

    A (16 x 8):  a0 = A[g, t]   a1 = A[g+8, t]   a2 = A[g, t+4]   a3 = A[g+8, t+4]
    B (8 x 8):   b0 = B[t, g]   b1 = B[t+4, g]
    C, D:        c0 = C[g, 2t]  c1 = C[g, 2t+1]  c2 = C[g+8, 2t]  c3 = C[g+8, 2t+1]

TF32 keeps 10 of float32's 23 mantissa bits: one product has relative errors near 1e-3. The
"3xTF32" split x = hi + lo, hi = tf32(x), lo = tf32(x - hi), and A B ~ hi·hi + hi·lo + lo·hi (three
mma; lo·lo is below float32 rounding) gets close to float32 accuracy.

Under the CUDA simulator (no inline PTX) both are emulated: tf32 rounds the bits the same way;
mma_tf32 posts each lane's fragments to a table and waits for the rest of its warp, one lane
rebuilds A and B from the table by the layout above and multiplies them, and after a second wait
each lane reads its D elements. So the simulator checks the callers' fragment bookkeeping, and
requires all 32 lanes of a warp to call mma_tf32 together.
bench/tensor_core_probe.py checks the instruction itself against NumPy on a GPU.
"""
import threading

import numpy as np

from minilm.kernels.cuda import _device
from minilm.kernels.cuda._device import cuda

MAX_WARPS = 32      # per block (1024 threads): the simulator's emulation keeps a table per warp


def _build_device():
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def tf32(typingctx, x):
        def codegen(context, builder, signature, args):
            convert = ir.InlineAsm(ir.FunctionType(ir.IntType(32), [ir.FloatType()]),
                                   "cvt.rna.tf32.f32 $0, $1;", "=r,f")
            return builder.bitcast(builder.call(convert, args), ir.FloatType())
        return types.float32(types.float32), codegen

    four = types.UniTuple(types.float32, 4)

    @intrinsic
    def mma_tf32(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        def codegen(context, builder, signature, args):
            result = ir.LiteralStructType([ir.FloatType()] * 4)
            mma = ir.InlineAsm(ir.FunctionType(result, [ir.IntType(32)] * 6 + [ir.FloatType()] * 4),
                               "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                               "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};",
                               "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
            operands = [builder.bitcast(x, ir.IntType(32)) for x in args[:6]] + list(args[6:])
            d = builder.call(mma, operands)
            return context.make_tuple(builder, four, [builder.extract_value(d, i) for i in range(4)])
        return four(*([types.float32] * 10)), codegen

    return tf32, mma_tf32


def _build_simulated():
    @cuda.jit(device=True)
    def tf32(x):
        bits = np.array([x], dtype=np.float32).view(np.uint32)
        bits = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)     # round the 13 dropped bits, ties away
        return np.float32(bits.view(np.float32)[0])

    # Where each lane's fragments sit in A (16 x 8) and B (8 x 8), and its D elements in D (16 x 8).
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    a_rows = np.stack([g, g + 8, g, g + 8], axis=1)
    a_cols = np.stack([t, t, t + 4, t + 4], axis=1)
    b_rows = np.stack([t, t + 4], axis=1)
    b_cols = np.stack([g, g], axis=1)
    d_rows = np.stack([g, g, g + 8, g + 8], axis=1)
    d_cols = np.stack([2 * t, 2 * t + 1, 2 * t, 2 * t + 1], axis=1)

    # A barrier and a table per warp, as mma.sync waits for its warp only: the simulator runs one
    # block at a time, so warp w of every block can share them. The barrier's timeout turns a lane
    # that never arrives into a failed test instead of a hung one.
    barriers = [threading.Barrier(32) for _ in range(MAX_WARPS)]
    posted = np.zeros((MAX_WARPS, 32, 6))
    product = np.zeros((MAX_WARPS, 32, 4))

    @cuda.jit(device=True)
    def mma_tf32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        warp = cuda.threadIdx.x // 32
        lane = cuda.threadIdx.x % 32
        posted[warp, lane] = (a0, a1, a2, a3, b0, b1)
        barriers[warp].wait(timeout=120)        # a lane that never comes fails the test, not hangs it
        if lane == 0:           # one lane rebuilds A and B from the fragments and multiplies
            A = np.zeros((16, 8))
            B = np.zeros((8, 8))
            A[a_rows, a_cols] = posted[warp, :, :4]
            B[b_rows, b_cols] = posted[warp, :, 4:]
            product[warp] = (A @ B)[d_rows, d_cols]
        barriers[warp].wait(timeout=120)        # (the next call's first wait keeps lane 0 from writing early)
        d = product[warp, lane]
        return (np.float32(d[0] + c0), np.float32(d[1] + c1), np.float32(d[2] + c2), np.float32(d[3] + c3))

    return tf32, mma_tf32


if cuda is None:  # pragma: no cover - numba.cuda missing: the kernels are not available either
    tf32 = mma_tf32 = None
elif _device.simulator_enabled():
    tf32, mma_tf32 = _build_simulated()
else:
    tf32, mma_tf32 = _build_device()
