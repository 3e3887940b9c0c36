"""GELU activation, tanh approximation (GPT-2's "gelu_new"), elementwise.

    u     = sqrt(2/pi) * (x + 0.044715 x^3)
    y     = 0.5 x (1 + tanh(u))
    dy/dx = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2)

Stability: x^3 overflows for |x| beyond ~7e12 in float32. Once |x| >= SATURATION (= 20),
|u| > 300 and tanh(u) is exactly +-1 in float32 and float64, so the cubic is evaluated on x
clipped to [-SATURATION, SATURATION]: y and dy/dx are unchanged (the tanh' term is exactly 0
there) and nothing overflows. The cache holds only x.

Shapes legend: any shape (...), typically (B, T, D) with B batch, T time, D channels.
"""
import math

import numpy as np

from minilm.ops._validate import as_float_array, check_same_dtype, check_shape

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC_COEFF = 0.044715
SATURATION = 20.0   # |x| beyond which tanh(u) == +-1 exactly in float32 and float64


def tanh_argument(x, with_derivative=False):
    """u = sqrt(2/pi) (x + 0.044715 x^3) on x clipped to +-SATURATION (and du/dx there, if asked)."""
    xc = np.clip(x, -SATURATION, SATURATION)
    x2 = xc * xc                      # x^3 as x * x^2: NumPy's power function is several times slower
    u = (SQRT_2_OVER_PI * xc * (1.0 + CUBIC_COEFF * x2)).astype(x.dtype, copy=False)
    if not with_derivative:
        return u
    du_dx = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC_COEFF * x2)
    return u, du_dx.astype(x.dtype, copy=False)


def forward(x):
    """y = 0.5 x (1 + tanh(u)). x: (...) float32/float64. Returns (y, cache = {"x"})."""
    x = as_float_array("x", x)
    y = 0.5 * x * (1.0 + np.tanh(tanh_argument(x)))
    return y, {"x": x}


def backward(dy, cache):
    """Gradient given dy = dL/dy (same shape as x). Returns (dx,)."""
    x = cache["x"]
    dy = as_float_array("dy", dy)
    check_shape("dy", dy, x.shape)
    check_same_dtype([("x", x), ("dy", dy)])

    u, du_dx = tanh_argument(x, with_derivative=True)
    t = np.tanh(u)
    dx = dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)
    return (dx,)
