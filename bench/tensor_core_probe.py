"""Can numba.cuda use tensor cores? One warp multiplies a 16 x 8 by an 8 x 8 float32 matrix with the
TF32 mma instruction, through the inline-PTX intrinsics of minilm/kernels/cuda/_tensor_cores.py
(tf32, mma_tf32; the fragment layout is in that module's docstring), which the linear-attention
kernels use with TENSOR_CORES set. This checks the instruction and the layout on their own.

Two products: plain TF32 (each input rounded to 10 mantissa bits, relative error ~1e-3, what fla's
fp32 tiles get from Triton's default) and 3xTF32 (x = hi + lo with hi = tf32(x), lo = tf32(x - hi);
A B ~ hi hi + hi lo + lo hi in three mma: near float32 accuracy at a third of the tensor-core rate).

Without a GPU it compiles both kernels for sm_90 and, where ptxas and cuobjdump are found (the
nvidia-cuda-nvcc and nvidia-cuda-cuobjdump wheels), prints the tensor-core instructions of the
machine code. On a GPU it also runs both on random inputs against float64 NumPy and exits 1 if
either misses its tolerance. Not under the CUDA simulator (it cannot run inline PTX).

    python bench/tensor_core_probe.py
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)                         # cuda_registers (find_tool)
sys.path.insert(0, os.path.dirname(HERE))        # minilm, from the working tree

TOLERANCE = {"tf32": 5e-3, "3xtf32": 1e-5}     # max |error| / max |A B| over the 16 x 8 product


def build():
    """The two probe kernels, on minilm's intrinsics (numba.cuda imported here, not at module import)."""
    from numba import cuda
    from minilm.kernels.cuda._tensor_cores import mma_tf32, tf32

    @cuda.jit
    def product_tf32(A, B, C):
        """C = A B for A (16, 8), B (8, 8): one warp, one mma."""
        lane = cuda.threadIdx.x
        g, t = lane >> 2, lane & 3
        zero = np.float32(0)
        d = mma_tf32(tf32(A[g, t]), tf32(A[g + 8, t]), tf32(A[g, t + 4]), tf32(A[g + 8, t + 4]),
                     tf32(B[t, g]), tf32(B[t + 4, g]), zero, zero, zero, zero)
        C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1] = d

    @cuda.jit
    def product_3xtf32(A, B, C):
        """The same in three mma: hi·hi + hi·lo + lo·hi, each operand split as x = hi + lo."""
        lane = cuda.threadIdx.x
        g, t = lane >> 2, lane & 3
        a = (A[g, t], A[g + 8, t], A[g, t + 4], A[g + 8, t + 4])
        b = (B[t, g], B[t + 4, g])
        a_hi = (tf32(a[0]), tf32(a[1]), tf32(a[2]), tf32(a[3]))
        a_lo = (tf32(a[0] - a_hi[0]), tf32(a[1] - a_hi[1]), tf32(a[2] - a_hi[2]), tf32(a[3] - a_hi[3]))
        b_hi = (tf32(b[0]), tf32(b[1]))
        b_lo = (tf32(b[0] - b_hi[0]), tf32(b[1] - b_hi[1]))
        zero = np.float32(0)
        d = mma_tf32(*a_lo, *b_hi, zero, zero, zero, zero)      # small terms first
        d = mma_tf32(*a_hi, *b_lo, *d)
        d = mma_tf32(*a_hi, *b_hi, *d)
        C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1] = d

    return {"tf32": product_tf32, "3xtf32": product_3xtf32}


def machine_code(kernel):
    """The sm_90 SASS lines of a kernel that use the tensor cores (HMMA), or why there are none."""
    from numba import cuda, types
    from cuda_registers import find_tool
    signature = (types.float32[:, ::1],) * 3
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
    ptxas, cuobjdump = find_tool("ptxas"), find_tool("cuobjdump")
    if not (ptxas and cuobjdump):
        return ["(ptxas or cuobjdump not found: PTX only) " + line.strip() for line in ptx.splitlines() if "mma" in line]
    with tempfile.TemporaryDirectory() as folder:
        source, binary = os.path.join(folder, "k.ptx"), os.path.join(folder, "k.cubin")
        with open(source, "w") as f:
            f.write(ptx)
        subprocess.run([ptxas, "-arch=sm_90", source, "-o", binary], check=True, capture_output=True)
        sass = subprocess.run([cuobjdump, "-sass", binary], check=True, capture_output=True, text=True).stdout
    return [" ".join(line.split("/*")[1].split("*/")[1].split()) for line in sass.splitlines() if "HMMA" in line]


def run_on_device(kernels, seed=0):
    """{name: max |C - A B| / max |A B|} for each kernel on fresh random inputs (float64 reference)."""
    from numba import cuda
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((16, 8)).astype(np.float32)
    B = rng.standard_normal((8, 8)).astype(np.float32)
    exact = A.astype(np.float64) @ B.astype(np.float64)
    errors = {}
    for name, kernel in kernels.items():
        C = cuda.to_device(np.full((16, 8), np.nan, np.float32))       # every element must be written
        kernel[1, 32](cuda.to_device(A), cuda.to_device(B), C)
        errors[name] = float(np.max(np.abs(C.copy_to_host() - exact)) / np.max(np.abs(exact)))
    return errors


def main():
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        raise SystemExit("the CUDA simulator cannot run inline PTX: run without NUMBA_ENABLE_CUDASIM")
    from numba import cuda
    kernels = build()
    for name, kernel in kernels.items():
        try:
            lines = machine_code(kernel)
        except Exception as error:      # the device check below still runs
            lines = [f"(machine code not shown: {error!r})"]
        for line in lines:
            print(f"{name:7s} sm_90: {line}")
    if not cuda.is_available():
        print("no GPU here: compiled only")
        return
    ok = True
    for name, error in run_on_device(kernels).items():
        passed = error <= TOLERANCE[name]
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'}  {name} 16x8x8 product on {cuda.get_current_device().name}: "
              f"max rel. error {error:.2e} (tolerance {TOLERANCE[name]:g})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
