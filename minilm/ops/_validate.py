"""Input checks shared by every op.

Each check raises ValueError (bad value or shape) or TypeError (bad type or dtype) with a message
that names the argument and says what was expected and what was given. Ops call these before
touching any data, so bad input never corrupts a result or a cache.
"""
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_float_array(name, x, ndim=None):
    """Return x as an ndarray of float32 or float64, checking rank and finiteness.

    Raises TypeError for non-arrays, ints, bools, complex and float16 (not supported: the ops
    accumulate in the input dtype and float16 would silently lose precision).
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def check_shape(name, x, expected):
    """Check x.shape against `expected`, a tuple of ints (or None for 'any size')."""
    ok = len(x.shape) == len(expected) and all(
        e is None or e == s for s, e in zip(x.shape, expected))
    if not ok:
        shown = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name} must have shape {shown}, got {x.shape}")


def check_same_dtype(names_and_arrays):
    """All float inputs of one op share a dtype (no silent up/down-casting)."""
    (first_name, first), *rest = [(n, a) for n, a in names_and_arrays if a is not None]
    for name, arr in rest:
        if arr.dtype != first.dtype:
            raise TypeError(f"{name} must have the same dtype as {first_name} ({first.dtype}), got {arr.dtype}")


def check_nonempty_time(name, T):
    if T == 0:
        raise ValueError(f"{name} must have at least one time step (T >= 1), got T = 0")


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_scale(name, value, default):
    """A positive finite float, or None for the default."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return float(value)


def as_int_array(name, x, ndim=None):
    """Token ids / class labels: an integer ndarray of the given rank."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return x
