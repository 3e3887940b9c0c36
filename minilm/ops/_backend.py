"""Choosing an implementation: backend="numpy" | "numba" | "cuda" | "auto".

"numpy" is the readable reference in minilm/ops and always works. "numba" and "cuda" run the
kernel modules minilm/kernels/cpu/<op>.py and minilm/kernels/cuda/<op>.py, which take the same
arguments and return the same values. "auto" picks the Numba kernel when it exists and supports
the options, else the reference; it never moves NumPy inputs to a GPU behind the user's back.

A kernel module exposes available() -> (ok, reason), supports(**options) -> (ok, reason),
forward(...) -> (out, cache) with cache["backend"] set, and backward(dout, cache).
"""
import importlib

BACKENDS = ("numpy", "numba", "cuda", "auto")
KERNEL_PACKAGES = {"numba": "minilm.kernels.cpu", "cuda": "minilm.kernels.cuda"}
KERNEL_MODE = "chunked"   # the fast kernels implement the chunked algorithm of the scan ops


class BackendUnavailable(RuntimeError):
    """Raised when a backend is asked for by name but cannot run this op (with these options) here."""


def kernel_module(backend, op_name):
    """The kernel module of `backend` for `op_name`, or None when there is none."""
    try:
        return importlib.import_module(f"{KERNEL_PACKAGES[backend]}.{op_name}")
    except ModuleNotFoundError:
        return None


def _usable(backend, op_name, options):
    """(module, None) when the kernel can run these options here, else (None, reason)."""
    module = kernel_module(backend, op_name)
    if module is None:
        return None, f"there is no {backend} kernel for {op_name}"
    mode = options.pop("mode", KERNEL_MODE)
    if mode != KERNEL_MODE:
        return None, f"the {backend} kernel implements mode={KERNEL_MODE!r}, got mode={mode!r}"
    for probe in (module.available, lambda: module.supports(**options)):
        ok, reason = probe()
        if not ok:
            return None, reason
    return module, None


def select_kernel(backend, op_name, **options):
    """Return the kernel module to run, or None for the NumPy reference.

    options: the op's options that decide whether a kernel applies (mode, feature map, ...).
    An explicitly named backend that cannot run raises BackendUnavailable saying why.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "numpy":
        return None
    module, reason = _usable("numba" if backend == "auto" else backend, op_name, dict(options))
    if module is None and backend != "auto":
        raise BackendUnavailable(f"backend={backend!r} cannot run {op_name}: {reason}")
    return module


def kernel_backward(dout, cache, op_name):
    """Run the backward of the kernel that produced `cache`."""
    return kernel_module(cache["backend"], op_name).backward(dout, cache)
