"""Linear (affine) map over the last axis.

    y = x W + b                 x (..., Din), W (Din, Dout), b (Dout,) -> y (..., Dout)

Backward, with every leading axis flattened into one row axis M = prod(...):

    dx = dy W^T                 (..., Din)
    dW = x^T dy                 (Din, Dout)   summed over all rows
    db = sum_rows dy            (Dout,)

W is stored (Din, Dout) so that the forward is a plain `x @ W` (picoGPT's convention), not
PyTorch's (Dout, Din).

Shapes legend: B batch, T time, H heads, D channels; "..." is any number of leading axes
(for example (B, T)). Din / Dout are the input and output channel counts.
"""
import numpy as np

from minilm.ops._validate import as_float_array, check_same_dtype, check_shape


def forward(x, W, b=None):
    """y = x @ W + b.

    x: (..., Din) float32/float64, at least 1-D.
    W: (Din, Dout), same dtype as x.
    b: (Dout,) or None.
    Returns (y, cache): y (..., Dout) in x's dtype; cache = {"x", "W", "has_bias"}.
    """
    x = as_float_array("x", x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension (..., Din), got shape {x.shape}")
    W = as_float_array("W", W, 2)
    din, dout = W.shape
    if x.shape[-1] != din:
        raise ValueError(f"x last dimension must equal W.shape[0] = {din} (Din), got x shape {x.shape}")
    if b is not None:
        b = as_float_array("b", b, 1)
        check_shape("b", b, (dout,))
    check_same_dtype([("x", x), ("W", W), ("b", b)])

    y = x @ W
    if b is not None:
        y = y + b
    cache = {"x": x, "W": W, "has_bias": b is not None}
    return y, cache


def backward(dy, cache):
    """Gradients of a scalar loss L given dy = dL/dy.

    dy: (..., Dout), same dtype as x.
    Returns (dx, dW, db): dx (..., Din), dW (Din, Dout), db (Dout,) or None when b was None.
    """
    x, W = cache["x"], cache["W"]
    dy = as_float_array("dy", dy)
    check_shape("dy", dy, x.shape[:-1] + (W.shape[1],))
    check_same_dtype([("x", x), ("dy", dy)])

    dx = dy @ W.T
    # Every leading axis is just another row of the matrix product.
    x_rows = x.reshape(-1, W.shape[0])
    dy_rows = dy.reshape(-1, W.shape[1])
    dW = x_rows.T @ dy_rows
    db = dy_rows.sum(axis=0) if cache["has_bias"] else None
    return dx, dW, db
