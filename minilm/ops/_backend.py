"""Choosing an implementation: backend="numpy" | "numba" | "cuda" | "auto".

"numpy" is the readable reference and always works. "auto" picks the fastest backend that is
available for the op. An op lists the backends it has in a dict name -> module-or-None; a
backend that is not implemented (None) or cannot run here raises a clear error.
"""
BACKENDS = ("numpy", "numba", "cuda", "auto")


class BackendUnavailable(RuntimeError):
    """Raised when a backend is asked for by name but cannot run for this op here."""


def resolve_backend(backend, op_name, implemented):
    """Return the name of the backend to use.

    implemented: dict "numba"/"cuda" -> probe(), where probe() returns (ok, reason). The numpy
    reference needs no entry. "auto" picks numba when its probe says ok, else numpy; it never
    moves NumPy inputs to a GPU behind the user's back.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "numpy":
        return "numpy"
    if backend == "auto":
        probe = implemented.get("numba")
        if probe is not None and probe()[0]:
            return "numba"
        return "numpy"
    probe = implemented.get(backend)
    if probe is None:
        raise BackendUnavailable(f"backend={backend!r} is not implemented for {op_name} yet; use backend='numpy'")
    ok, reason = probe()
    if not ok:
        raise BackendUnavailable(f"backend={backend!r} cannot run {op_name}: {reason}")
    return backend
