"""LayerNorm over the last axis (Ba et al. 2016; GPT-2's norm).

    mu    = mean_i(x_i)                         one value per row, shape (..., 1)
    var   = mean_i((x_i - mu)^2)                biased variance, as in PyTorch
    r     = 1 / sqrt(var + eps)
    x_hat = (x - mu) * r
    y     = x_hat * weight + bias

Backward, with g = dy * weight:

    dbias   = sum_rows(dy)
    dweight = sum_rows(dy * x_hat)
    dx      = r * (g - mean_i(g_i) - x_hat * mean_i(g_i * x_hat_i))

The cache keeps x, weight, mu and r (two numbers per row, as llm.c does), and x_hat is recomputed
in the backward instead of being stored.

Shapes legend: B batch, T time, D channels; "..." is any number of leading axes (typically (B, T)).
"""
import numpy as np

from minilm.ops._validate import as_float_array, check_same_dtype, check_scale, check_shape


def row_statistics(x, eps):
    """mu = mean(x) and r = 1/sqrt(var(x) + eps) over the last axis, each (..., 1)."""
    mean = np.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return mean, 1.0 / np.sqrt(var + eps)


def forward(x, weight, bias, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis.

    x: (..., D) float32/float64, at least 1-D.
    weight, bias: (D,), same dtype.
    eps: positive finite float added to the variance.
    Returns (y, cache): y (..., D); cache = {"x", "weight", "mean", "rstd"}, mean/rstd (..., 1).
    """
    x = as_float_array("x", x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension (..., D), got shape {x.shape}")
    weight = as_float_array("weight", weight, 1)
    check_shape("weight", weight, (x.shape[-1],))
    bias = as_float_array("bias", bias, 1)
    check_shape("bias", bias, (x.shape[-1],))
    check_same_dtype([("x", x), ("weight", weight), ("bias", bias)])
    eps = check_scale("eps", eps, 1e-5)

    mean, rstd = row_statistics(x, eps)
    mean = mean.astype(x.dtype, copy=False)
    rstd = rstd.astype(x.dtype, copy=False)
    x_hat = (x - mean) * rstd
    y = x_hat * weight + bias
    return y, {"x": x, "weight": weight, "mean": mean, "rstd": rstd}


def backward(dy, cache):
    """Gradients given dy = dL/dy of shape (..., D).

    Returns (dx (..., D), dweight (D,), dbias (D,)).
    """
    x, weight, mean, rstd = cache["x"], cache["weight"], cache["mean"], cache["rstd"]
    dy = as_float_array("dy", dy)
    check_shape("dy", dy, x.shape)
    check_same_dtype([("x", x), ("dy", dy)])

    x_hat = (x - mean) * rstd
    dy_rows = dy.reshape(-1, x.shape[-1])
    dbias = dy_rows.sum(axis=0)
    dweight = (dy * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)
    g = dy * weight
    # mu and r depend on every x_i of the row: the two mean terms remove the
    # components of g along the constant direction and along x_hat.
    dx = rstd * (g - np.mean(g, axis=-1, keepdims=True)
                 - x_hat * np.mean(g * x_hat, axis=-1, keepdims=True))
    return dx, dweight, dbias
