"""Checks of MemoryPool's bookkeeping, run as a script in a process of its own.

The pool builds real Numba device arrays (DeviceNDArray) on buffers it keeps, and relies on Numba's
count of the arrays viewing a buffer. The CUDA simulator replaces those classes, so these checks run
without it (NUMBA_ENABLE_CUDASIM=0), with a stand-in context and stand-in buffers: nothing touches a
device. test_cuda_device.py runs this file and reports each check.

    python tests/cuda/_memory_pool_checks.py      prints "<check> ok" or "<check> FAILED <why>" per check
"""
import ctypes
import gc
import os
import sys
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from minilm.kernels.cuda._device import MemoryPool, pool_size  # noqa: E402


class Deallocations:
    def __init__(self):
        self.cleared = 0

    def clear(self):
        self.cleared += 1


class Context:
    """Stands in for a CUDA context: the pool only asks it to run pending frees."""

    def __init__(self):
        self.deallocations = Deallocations()


class Buffer:
    def __init__(self, address):
        self.device_pointer = ctypes.c_void_p(address)     # as Numba's own buffers carry it


class Allocator:
    """Hands out fake addresses, 256 MiB apart; fails the next `fail` requests with MemoryError."""

    def __init__(self):
        self.sizes = []
        self.fail = 0

    def __call__(self, nbytes):
        if self.fail:
            self.fail -= 1
            raise MemoryError("out of memory (stand-in)")
        self.sizes.append(nbytes)
        return Buffer((len(self.sizes)) << 28)


def make_pool():
    allocate = Allocator()
    return MemoryPool(Context(), allocate), allocate


def address(array):
    return array.__cuda_array_interface__["data"][0]


def check_freed_buffer_is_reused():
    pool, allocate = make_pool()
    first = pool.empty((4, 8), np.float32)
    assert (first.shape, first.strides, first.dtype) == ((4, 8), (32, 4), np.float32)
    where = address(first)
    del first
    second = pool.empty((8, 4), np.float32)
    assert address(second) == where, "a freed buffer of the same size class was not handed out again"
    assert (pool.hits, pool.misses, len(allocate.sizes)) == (1, 1, 1)


def check_buffer_in_use_is_not_lent():
    pool, _ = make_pool()
    first = pool.empty((4, 8), np.float32)
    second = pool.empty((4, 8), np.float32)
    assert address(first) != address(second)


def check_views_keep_the_buffer():
    pool, _ = make_pool()
    array = pool.empty((4, 8), np.float32)
    where = address(array)
    flat = array.reshape(32)            # a view: same buffer
    del array
    gc.collect()
    other = pool.empty((4, 8), np.float32)
    assert address(other) != where, "a buffer was lent again while a view of it was alive"
    assert address(flat) == where
    del flat
    again = pool.empty((32,), np.float32)
    assert address(again) == where, "the buffer did not come back once its last view was gone"


def check_size_classes():
    assert [pool_size(n) for n in (0, 1, 512, 513, 1 << 20)] == [512, 512, 512, 1024, 1 << 20]
    assert [pool_size(n) for n in ((1 << 20) + 1, 3 << 20, 4 << 20)] == [2 << 20, 4 << 20, 4 << 20]
    pool, allocate = make_pool()
    small = pool.empty((100,), np.float32)          # 400 bytes: the 512-byte class
    where = address(small)
    del small
    same_class = pool.empty((64,), np.float64)      # 512 bytes
    assert address(same_class) == where
    bigger = pool.empty((129,), np.float32)         # 516 bytes: the next class, a new buffer
    assert address(bigger) != where
    assert allocate.sizes == [512, 1024]


def check_release_drops_idle_buffers_only():
    pool, allocate = make_pool()
    kept = pool.empty((1000,), np.float32)
    dropped = pool.empty((1000,), np.float32)
    del dropped
    assert pool.held_bytes() == (4096, 4096)
    pool.release()
    assert pool.held_bytes() == (4096, 0)
    assert pool.context.deallocations.cleared == 1
    fresh = pool.empty((1000,), np.float32)
    assert address(fresh) not in (address(kept),) and len(allocate.sizes) == 3


def check_out_of_memory_releases_then_retries():
    pool, allocate = make_pool()
    idle = pool.empty((10,), np.float32)
    del idle
    allocate.fail = 1
    array = pool.empty((1 << 20,), np.float32)      # 4 MiB: a new buffer; the first try fails
    assert array.shape == (1 << 20,) and pool.held_bytes() == (4 << 20, 0)
    assert pool.context.deallocations.cleared == 1
    allocate.fail = 1                               # nothing idle to give back: the error surfaces
    try:
        pool.empty((1 << 21,), np.float32)
    except MemoryError:
        return
    raise AssertionError("an allocation failure with nothing to release was swallowed")


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    for name, check in CHECKS.items():
        try:
            check()
            print(f"{name} ok")
        except Exception:
            why = traceback.format_exc().strip().splitlines()
            print(f"{name} FAILED {' | '.join(why[-3:])}")
