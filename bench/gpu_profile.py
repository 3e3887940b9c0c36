"""Run one op's numba.cuda forward and backward a few times at the target shape, for a profiler.

Nsight Compute attaches to the process and profiles the launches it is told to, for example the
scan's second forward and backward (the first ones run while Numba compiles):

    ncu --clock-control none --kernel-name regex:'forward_kernel|backward_kernel' \\
        --launch-skip 2 --launch-count 2 --section SpeedOfLight --section WarpStateStats \\
        --section MemoryWorkloadAnalysis_Tables -o /tmp/scan python3 bench/gpu_profile.py scan
    ncu --import /tmp/scan.ncu-rep --page raw      # every metric collected, stall reasons included

(bench/gpu_run.sh runs it with more sections, for both ops.)

    python3 bench/gpu_profile.py scan|linear_attention [--calls 3]

Shapes: selective scan B=4 T=4096 D=1536 N=16, linear attention B=2 H=16 T=16384 d=64 (float32),
the shapes of bench/gpu_check.py's targets.
"""
import argparse

import numpy as np


def scan_calls():
    from minilm.kernels.cuda import selective_scan as scan
    from numba import cuda
    B, T, D, N = 4, 4096, 1536, 16
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((B, T, D)), 0.5 * rng.standard_normal((B, T, D)),
              -np.exp(rng.standard_normal((D, N))), rng.standard_normal((B, T, N)),
              rng.standard_normal((B, T, N))]
    u, delta, A, Bm, Cm = (cuda.to_device(x.astype(np.float32)) for x in arrays)
    dout = cuda.to_device(rng.standard_normal((B, T, D)).astype(np.float32))

    def call():
        out, cache = scan.forward(u, delta, A, Bm, Cm, delta_softplus=True)
        scan.backward(dout, cache)
    return call


def linear_attention_calls():
    from minilm.kernels.cuda import linear_attention as la
    from numba import cuda
    B, H, T, d = 2, 16, 16384, 64
    rng = np.random.default_rng(0)
    q, k, v, do = (cuda.to_device((rng.standard_normal((B, H, T, d)) / 8).astype(np.float32))
                   for _ in range(4))

    def call():
        out, cache = la.forward(q, k, v)
        la.backward(do, cache)
    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("op", choices=["scan", "linear_attention"])
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    from numba import cuda
    call = scan_calls() if args.op == "scan" else linear_attention_calls()
    for _ in range(args.calls):
        call()
    cuda.synchronize()
    print(f"{args.op}: {args.calls} forward and backward calls done")


if __name__ == "__main__":
    main()
