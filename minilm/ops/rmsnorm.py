"""RMSNorm over the last axis (Zhang & Sennrich 2019; the norm of Mamba, LLaMA and RWKV-style stacks).

    r     = 1 / sqrt(mean_i(x_i^2) + eps)      one value per row, shape (..., 1)
    x_hat = x * r
    y     = x_hat * weight

No mean is subtracted and there is no bias, unlike LayerNorm. Backward, with g = dy * weight:

    dweight = sum_rows(dy * x_hat)
    dx      = r * (g - x_hat * mean_i(g_i * x_hat_i))

The cache keeps x, weight and r (one number per row), not x_hat: x_hat is recomputed in the
backward from x and r, which costs one multiply and saves a full-size buffer.

Shapes legend: B batch, T time, D channels; "..." is any number of leading axes (typically (B, T)).
"""
import numpy as np

from minilm.ops._validate import as_float_array, check_same_dtype, check_scale, check_shape


def inverse_rms(x, eps):
    """r = 1 / sqrt(mean(x^2, last axis) + eps), shape (..., 1)."""
    return 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def forward(x, weight, eps=1e-6):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis.

    x: (..., D) float32/float64, at least 1-D.
    weight: (D,), same dtype.
    eps: positive finite float added to the mean square.
    Returns (y, cache): y (..., D); cache = {"x", "weight", "rstd"} with rstd (..., 1).
    """
    x = as_float_array("x", x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension (..., D), got shape {x.shape}")
    weight = as_float_array("weight", weight, 1)
    check_shape("weight", weight, (x.shape[-1],))
    check_same_dtype([("x", x), ("weight", weight)])
    eps = check_scale("eps", eps, 1e-6)

    rstd = inverse_rms(x, eps).astype(x.dtype, copy=False)
    y = x * rstd * weight
    return y, {"x": x, "weight": weight, "rstd": rstd}


def backward(dy, cache):
    """Gradients given dy = dL/dy of shape (..., D). Returns (dx (..., D), dweight (D,))."""
    x, weight, rstd = cache["x"], cache["weight"], cache["rstd"]
    dy = as_float_array("dy", dy)
    check_shape("dy", dy, x.shape)
    check_same_dtype([("x", x), ("dy", dy)])

    x_hat = x * rstd
    dweight = (dy * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)
    g = dy * weight
    # r depends on every x_i of the row, hence the row-mean correction term.
    dx = rstd * (g - x_hat * np.mean(g * x_hat, axis=-1, keepdims=True))
    return dx, dweight
