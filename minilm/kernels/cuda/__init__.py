"""numba.cuda kernels behind backend="cuda": same signatures as the ops they speed up.

    selective_scan      forward / backward of Mamba's selective scan (two-level chunked scan)
    linear_attention    forward / backward of chunked causal linear attention (tiles per chunk)
    _device             available(), moving NumPy / Numba / CuPy / PyTorch arrays in and out, and
                        use_memory_pool(): reuse the device memory of Numba arrays across calls
    _tensor_cores       tf32() and mma_tf32(): the TF32 tensor-core instruction through inline PTX
                        (emulated under the simulator), for linear attention's TENSOR_CORES modes
    _exp2               exp2_for(dtype): the scan's decays 2^x, in float32 the bare hardware
                        instruction (ex2.approx.ftz through inline PTX; emulated under the simulator)

Each kernel module exposes available() -> (ok, reason), supports(**options) -> (ok, reason),
forward(...) -> (out, cache) with cache["backend"] == "cuda", and backward(dout, cache). They run on
a GPU, or on the CPU under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set before numba is
imported), which the tests in tests/cuda use. Importing this package never fails: without numba.cuda,
available() says why.
"""
from minilm.kernels.cuda._device import available, use_memory_pool

__all__ = ["available", "use_memory_pool"]
