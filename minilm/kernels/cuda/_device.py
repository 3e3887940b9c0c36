"""What the CUDA kernels share: is a device here, and moving arrays in and out without copies.

Arrays come in three kinds and go back out in the kind they came in:

    "numpy"    a numpy.ndarray: copied to the device, results copied back to NumPy
    "device"   anything with __cuda_array_interface__ (a Numba device array, a CuPy array, a
               PyTorch CUDA tensor): wrapped in place with cuda.as_cuda_array, no copy
    "torch" / "cupy" are "device" arrays whose results are wrapped back into that library's type
               (torch.as_tensor(..., device="cuda"), cupy.asarray), again without a copy

Memory for outputs, caches and work buffers: PyTorch and CuPy callers get it from their library's
pool; everyone else from minilm's MemoryPool, which keeps a buffer whose arrays are gone and hands
it out again (or, with MEMORY_POOL off, from Numba: cuMemAlloc per call).

Under NUMBA_ENABLE_CUDASIM=1 Numba's CUDA simulator runs the same kernels on the CPU, one Python
thread per CUDA thread: slow, but it checks the kernels where no GPU exists. It counts as available.
"""
import itertools
import math
import os
import weakref
from functools import partial, wraps

import numpy as np

try:  # numba.cuda is the numba-cuda package (or Numba's own deprecated copy of it)
    from numba import config as _numba_config
    from numba import cuda
    _IMPORT_ERROR = None
except Exception as error:  # pragma: no cover - depends on the installation
    cuda = _numba_config = None
    _IMPORT_ERROR = error

# Take the device memory of Numba device arrays (outputs, caches, NumPy inputs' copies) from
# minilm's MemoryPool instead of cuMemAlloc. On an H200 (bench/gpu_check.py) it took the linear
# attention forward at L=16K from 2.63 to 1.98 ms and the scan forward at L=4K from 1.70 to 1.51 ms;
# the price is memory kept after a call (1.2 GiB there; use_memory_pool(False) and
# memory_pool().release() give it back). Ignored by the simulator.
MEMORY_POOL = True

# Fill every output buffer with NaN before a kernel runs, so that an element the kernel forgets to
# write shows up in a comparison. Off by default (it costs a pass over memory); bench/gpu_check.py
# turns it on.
POISON_OUTPUTS = False


def simulator_enabled():
    """True when Numba's CUDA simulator stands in for a GPU (NUMBA_ENABLE_CUDASIM=1)."""
    if getattr(_numba_config, "ENABLE_CUDASIM", 0):
        return True
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def warp_shuffles_available():
    """Whether kernels may use warp shuffles (cuda.shfl_xor_sync): on a GPU always; Numba's CUDA
    simulator has none (the tests lend it one)."""
    if not simulator_enabled():
        return True
    from numba.cuda.simulator import kernelapi
    return hasattr(kernelapi.FakeCUDAModule, "shfl_xor_sync")


def available():
    """(ok, reason): whether numba.cuda kernels can run here, and if not, why not."""
    if cuda is None:
        return False, f"numba.cuda cannot be imported (install numba-cuda): {_IMPORT_ERROR!r}"
    if simulator_enabled():
        return True, "Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): correct results, CPU speed"
    try:
        if not cuda.is_available():
            error = None
            try:
                error = cuda.cuda_error()
            except Exception:  # pragma: no cover - older/newer numba-cuda
                pass
            detail = " ".join(str(error).split()) if error else "no GPU or no driver found"
            return False, f"no usable CUDA device ({detail})"
        device = cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
        return True, f"{name} (compute capability {device.compute_capability[0]}.{device.compute_capability[1]})"
    except Exception as error:  # driver present but broken
        return False, f"CUDA driver error: {error!r}"


def device_name():
    """A short description of the device the kernels run on (for benchmark headers)."""
    ok, reason = available()
    return reason if ok else f"unavailable: {reason}"


GRID_YZ_LIMIT = 65535    # the most blocks a CUDA grid has along its y or z axis


def check_grid_axis(name, what, blocks):
    """ValueError naming the argument `name` when a launch would need more than GRID_YZ_LIMIT blocks
    along a grid's y or z axis, one for each of `what` (the kernels put the batch there)."""
    if blocks > GRID_YZ_LIMIT:
        raise ValueError(f"{name} has {blocks} {what}; the CUDA kernels launch a block for each along a "
                         f"grid axis that holds at most {GRID_YZ_LIMIT}: split the batch")


def jit_kernel(threads, min_blocks):
    """cuda.jit with launch bounds: the compiler keeps each thread's registers low enough for
    `min_blocks` blocks of `threads` threads to share a multiprocessor (0: no bound). The simulator,
    and a numba-cuda without launch bounds, get plain cuda.jit."""
    if min_blocks and not simulator_enabled():
        try:
            return cuda.jit(launch_bounds=(threads, min_blocks))
        except TypeError:
            pass
    return cuda.jit


def in_one_context(host_function):
    """Decorator for the kernels' host wrappers: everything the wrapper does (allocations, copies,
    launches) runs inside one numba-cuda ensure_context block. Outside such a block every Numba
    CUDA call asks the driver for the current context and looks up its Numba object again (the
    host profile on an H200 put ~10 of those look-ups in each linear-attention forward); inside it
    they find both cached. The simulator has no contexts."""
    @wraps(host_function)
    def wrapper(*args, **kwargs):
        if cuda is None or simulator_enabled():
            return host_function(*args, **kwargs)
        from numba.cuda.cudadrv.devices import _runtime
        with _runtime.ensure_context():
            return host_function(*args, **kwargs)
    return wrapper


# ----------------------------------------------------------------------------------------------
# array kinds in and out

def array_kind(x):
    """'numpy', 'torch', 'cupy' or 'device' (any other __cuda_array_interface__ object)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if _is_numba_device_array(x):   # first: its __cuda_array_interface__ is a dict built on every access
        return "device"
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        return "torch"
    if module == "cupy":
        return "cupy"
    if hasattr(x, "__cuda_array_interface__"):
        return "device"
    raise TypeError(f"expected a numpy.ndarray or a CUDA array (__cuda_array_interface__), got {type(x).__name__}")


def _is_numba_device_array(x):
    """A Numba device array (the simulator's too, which has no __cuda_array_interface__)."""
    return bool(getattr(x, "__cuda_ndarray__", False))


def to_device(name, x):
    """A Numba device array viewing x (no copy for device arrays; one host-to-device copy for NumPy).

    Device arrays must be C-contiguous: the kernels index them as dense row-major arrays.
    """
    if x is None:
        return None
    kind = array_kind(x)
    if kind == "numpy":
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
        x = np.ascontiguousarray(x)
        if _pool_serves(x.size):
            array = memory_pool().empty(x.shape, x.dtype)
            array.copy_to_device(x)
            return array
        return cuda.to_device(x)
    # a Numba device array is used as it is: wrapping it again would cost the host a new array object
    array = x if _is_numba_device_array(x) else cuda.as_cuda_array(x)
    if array.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float32 or float64, got {array.dtype}")
    if not array.is_c_contiguous():
        raise ValueError(f"{name} must be C-contiguous on the device (call .contiguous() / ascontiguousarray)")
    return array


def from_device(array, kind):
    """Return a device result in the caller's kind (see the module docstring)."""
    if array is None:
        return None
    if kind == "numpy":
        return array.copy_to_host()
    if kind == "torch":
        import torch
        return torch.as_tensor(array, device="cuda")
    if kind == "cupy":
        import cupy
        return cupy.asarray(array)
    return array


def _allocate(shape, dtype, kind):
    """Uninitialised device memory. PyTorch and CuPy callers get it from their library's memory pool
    (a pooled allocation costs the host microseconds; cudaMalloc and cudaFree of a large buffer far
    more, and cudaFree waits for the device); everyone else from minilm's own pool (MemoryPool), or
    from Numba when MEMORY_POOL is off."""
    if kind == "torch":
        import torch
        tensor = torch.empty(tuple(shape), dtype=getattr(torch, np.dtype(dtype).name), device="cuda")
        return cuda.as_cuda_array(tensor, sync=False)      # fresh memory: nothing to wait for
    if kind == "cupy":
        import cupy
        return cuda.as_cuda_array(cupy.empty(tuple(shape), dtype=dtype), sync=False)
    if _pool_serves(math.prod(shape)):
        return memory_pool().empty(shape, dtype)
    return cuda.device_array(shape, dtype=dtype)


def empty(shape, dtype, kind="device"):
    """An uninitialised device array for a caller of `kind` (see _allocate), filled with NaN when
    POISON_OUTPUTS is set."""
    array = _allocate(shape, dtype, kind)
    if POISON_OUTPUTS:
        fill(array, np.nan)
    return array


def zeros(shape, dtype, kind="device"):
    """A device array of zeros (accumulation buffers: atomics add into them)."""
    array = _allocate(shape, dtype, kind)
    fill(array, 0.0)
    return array


def zeros_together(shapes, dtype, kind="device"):
    """Zeroed device arrays of the given shapes, views into one allocation cleared by one kernel.

    Each allocation and each launch costs the host tens of microseconds; a backward pass that
    needs five accumulators pays once instead of five times.
    """
    sizes = [math.prod(shape) for shape in shapes]
    flat = zeros((max(1, sum(sizes)),), dtype, kind)
    views, start = [], 0
    for shape, size in zip(shapes, sizes):
        views.append(flat[start:start + size].reshape(shape))
        start += size
    return views


_PLACEHOLDERS = {}


def placeholder(shape, dtype):
    """Zeros standing in for an optional input that is None (D, delta_bias, z, initial_state, ...).

    Made once per (device context, shape, dtype) and reused, so that leaving an input out costs
    no allocation and no launch. Kernels only ever read a placeholder, never write it.
    """
    # Numba keeps one context object per device (the simulator makes a new stand-in on every call).
    # Contexts are not hashable: key on id() and keep the context alive, so that its id stays unique
    # (after cuda.close() a fresh context gets fresh placeholders).
    context = None if simulator_enabled() else cuda.current_context()
    key = (id(context), tuple(shape), np.dtype(dtype).name)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = (context, zeros(shape, dtype))
    return _PLACEHOLDERS[key][1]


_FILL_THREADS = 256

if cuda is not None:
    @cuda.jit
    def _fill_kernel(flat, value):
        i = cuda.grid(1)
        if i < flat.shape[0]:
            flat[i] = value


def fill(array, value):
    """Set every element of a contiguous device array to value."""
    size = math.prod(array.shape)
    if size == 0:
        return
    flat = array.reshape(size)
    _fill_kernel[(size + _FILL_THREADS - 1) // _FILL_THREADS, _FILL_THREADS](flat, flat.dtype.type(value))


def synchronize():
    """Wait for every queued kernel (for timing)."""
    cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# reusing device memory across calls

def pool_size(nbytes):
    """The size class a request of nbytes is served from: up to 1 MiB rounded up to 512 bytes,
    beyond that to 2 MiB, so that a buffer freed by one call serves the same request of the next."""
    step = 512 if nbytes <= 1 << 20 else 2 << 20
    return max(step, -(-int(nbytes) // step) * step)


def _c_strides(shape, itemsize):
    strides, stride = [], itemsize
    for extent in reversed(shape):
        strides.append(stride)
        stride *= max(extent, 1)
    return tuple(reversed(strides))


class MemoryPool:
    """Device buffers kept for reuse, as PyTorch's caching allocator keeps them.

    Without a pool every call's outputs and caches come from cuMemAlloc, and Numba frees them in
    batches with cuMemFree, which waits for the device: for the 100-MB buffers of the benchmarks,
    the host then spends a large part of a call on memory. Here a buffer whose last array is gone
    goes back to the pool, and the next request of its size class (pool_size) gets it again.

        empty(shape, dtype)   a C-contiguous Numba device array on a pooled buffer
        release()             hand the idle buffers back to the driver

    When is a buffer free again? Numba counts the arrays viewing a buffer (the array, its reshapes
    and its slices all hold a reference to the same pointer); the buffer returns when that count
    reaches zero. Handing it out again at once is safe because everything here runs on the default
    stream, in order: the next kernel that writes the buffer starts after every queued kernel that
    read it has finished.

    context: the CUDA context the buffers belong to; allocate(nbytes): a new device buffer, an
    object with .device_pointer (the context's memalloc).
    """

    def __init__(self, context, allocate):
        self.context = context
        self.allocate = allocate
        self.idle = {}              # size class -> buffers ready to hand out
        self.lent = {}              # key -> the pointer of a buffer in use (kept alive until its last view is gone)
        self._keys = itertools.count()
        self.hits = 0               # requests served from the pool
        self.misses = 0             # requests that needed a new buffer

    def empty(self, shape, dtype):
        from numba.cuda.cudadrv import devicearray, driver
        dtype = np.dtype(dtype)
        shape = tuple(int(extent) for extent in shape)
        size = pool_size(math.prod(shape) * dtype.itemsize)
        idle = self.idle.get(size)
        if idle:
            buffer = idle.pop()
            self.hits += 1
        else:
            buffer = self._new_buffer(size)
            self.misses += 1
        key = next(self._keys)
        # An AutoFreePointer calls its finalizer when the count of arrays viewing it reaches zero.
        pointer = driver.AutoFreePointer(weakref.proxy(self.context), buffer.device_pointer, size,
                                         finalizer=partial(self._give_back, key, size, buffer))
        self.lent[key] = pointer
        return devicearray.DeviceNDArray(shape, _c_strides(shape, dtype.itemsize), dtype,
                                         gpu_data=pointer.own())

    def _give_back(self, key, size, buffer):
        del self.lent[key]
        self.idle.setdefault(size, []).append(buffer)

    def _new_buffer(self, size):
        try:
            return self.allocate(size)
        except Exception:           # out of memory: return the idle buffers to the driver, try once more
            if not self.idle:
                raise
            self.release()
            return self.allocate(size)

    def release(self):
        """Drop the idle buffers (Numba frees them); buffers in use stay with their arrays."""
        self.idle.clear()
        deallocations = getattr(self.context, "deallocations", None)
        if deallocations is not None:       # Numba defers frees: do them now
            deallocations.clear()

    def held_bytes(self):
        """Bytes of device memory the pool holds: (in use, idle)."""
        in_use = sum(pointer.size for pointer in list(self.lent.values()))
        idle = sum(size * len(buffers) for size, buffers in list(self.idle.items()))
        return in_use, idle


def _pool_serves(size):
    """Whether an array of `size` elements comes from the memory pool: the pool is on, there is a
    real device, and the array is not empty."""
    return MEMORY_POOL and size > 0 and not simulator_enabled()


def use_memory_pool(enabled=True):
    """Turn the memory pool for Numba device arrays on or off (MEMORY_POOL); returns the previous
    setting. Turning it off does not free what the pool holds: memory_pool().release() does."""
    global MEMORY_POOL
    previous, MEMORY_POOL = MEMORY_POOL, bool(enabled)
    return previous


_POOLS = {}


def memory_pool():
    """The MemoryPool of the current CUDA context (made on first use)."""
    context = cuda.current_context()
    key = id(context)                # the context is kept alive with its pool, so its id stays unique
    if key not in _POOLS:
        _POOLS[key] = (context, MemoryPool(context, context.memalloc))
    return _POOLS[key][1]
