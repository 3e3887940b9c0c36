"""SiLU (swish) activation, elementwise: the gate nonlinearity of Mamba.

    sigmoid(x) = 1 / (1 + exp(-x))
    y          = x * sigmoid(x)
    dy/dx      = sigmoid(x) * (1 + x * (1 - sigmoid(x)))

The sigmoid is evaluated stably: with e = exp(-|x|), which never overflows,

    sigmoid(x) = 1 / (1 + e)      for x >= 0
               = e / (1 + e)      for x <  0

so x = +-1e4 gives 1 and 0 without an overflow warning (exp(-1e4) underflows to 0 quietly).
The cache holds only x; the sigmoid is recomputed in the backward.

Shapes legend: any shape (...), typically (B, T, D) with B batch, T time, D channels.
"""
import numpy as np

from minilm.ops._validate import as_float_array, check_same_dtype, check_shape


def sigmoid(x):
    """Numerically stable logistic function, elementwise, in x's dtype."""
    with np.errstate(under="ignore"):
        e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def forward(x):
    """y = x * sigmoid(x). x: (...) float32/float64. Returns (y, cache = {"x"})."""
    x = as_float_array("x", x)
    y = x * sigmoid(x)
    return y, {"x": x}


def backward(dy, cache):
    """Gradient given dy = dL/dy (same shape as x). Returns (dx,)."""
    x = cache["x"]
    dy = as_float_array("dy", dy)
    check_shape("dy", dy, x.shape)
    check_same_dtype([("x", x), ("dy", dy)])

    s = sigmoid(x)
    dx = dy * (s * (1.0 + x * (1.0 - s)))
    return (dx,)
