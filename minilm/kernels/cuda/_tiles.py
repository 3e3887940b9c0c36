"""Which element of a shared-memory tile each thread of a block handles, on each pass.

    tile_element(tid, i, threads, width) -> (row, column)

A block of `threads` threads walks a row-major tile of `width` columns in turn: on pass i, thread
tid handles element tid + i · threads, so consecutive threads take consecutive columns (coalesced
global accesses, different shared-memory banks).
"""
from minilm.kernels.cuda._device import cuda

try:
    from numba import uint32 as _u32
except Exception:  # pragma: no cover - numba missing: the kernels are not available either
    _u32 = None

if cuda is not None:
    @cuda.jit(device=True)
    def tile_element(tid, i, threads, width):
        """(row, column) of element tid + i · threads of a tile of `width` columns, unsigned 32-bit.

        threads and width are compile-time constants of the kernel. When threads is a multiple of
        width, a thread keeps one column and moves threads / width rows per pass: written that way,
        the row is the thread's own part plus a constant of the (unrolled) pass, and the compiler
        adds a constant to one address instead of forming each anew (on sm_90 about 7 instructions
        per element of a tile store with its shared-memory load, not 17)."""
        if threads % width == 0:
            return _u32(tid // width + i * (threads // width)), _u32(tid % width)
        index = _u32(tid + i * threads)
        return _u32(index // width), _u32(index % width)
