"""Gradient-check helpers used by the tests (and handy when writing a new op).

    rel_error(a, n) = max|a - n| / max(1e-8, max|a| + max|n|)

Finite differences are centred, (f(x + h) - f(x - h)) / 2h, in float64.
"""
import functools
import types

import numpy as np


def rel_error(analytic, numeric):
    """Relative error of two gradient arrays: max|a - n| / max(1e-8, max|a| + max|n|)."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    return float(np.max(np.abs(a - n), initial=0.0) /
                 max(1e-8, np.max(np.abs(a), initial=0.0) + np.max(np.abs(n), initial=0.0)))


def numerical_grad(f, x, h=1e-6):
    """d(f())/dx by centred differences; f takes no argument and reads x, which is perturbed in place."""
    grad = np.zeros_like(x, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        f_plus = f()
        x[i] = old - h
        f_minus = f()
        x[i] = old
        grad[i] = (f_plus - f_minus) / (2 * h)
    return grad


def check_op_gradients(forward, backward, inputs, wrt, seed=0, h=1e-6, **options):
    """Compare an op's hand-written backward with centred finite differences.

    forward(*inputs, **options) -> (out, cache); backward(dout, cache) -> tuple of grads in input
    order. The scalar loss is sum(out * R) for a fixed random R, so every output element counts.
    wrt: indices of the inputs to check. Returns {index: rel_error}.
    """
    rng = np.random.default_rng(seed)
    out, cache = forward(*inputs, **options)
    weights = rng.standard_normal(out.shape)
    grads = backward(weights.astype(out.dtype), cache)

    def loss():
        return float(np.sum(forward(*inputs, **options)[0] * weights))

    return {i: rel_error(grads[i], numerical_grad(loss, inputs[i], h)) for i in wrt}


def numpy_reference(op_module):
    """The op module with backend="numpy" as the default of its forward.

    The ops default to backend="auto", which runs a fast kernel where one exists; tests of the
    reference itself (and tests comparing a kernel against it) must run the NumPy code. A backend
    passed explicitly still wins.
    """
    members = {name: getattr(op_module, name) for name in dir(op_module) if not name.startswith("__")}
    members["forward"] = functools.partial(op_module.forward, backend="numpy")
    return types.SimpleNamespace(**members)
