"""Causal depthwise 1-D convolution over time: the short convolution in front of Mamba's scan.

Each channel d has its own K taps w[d, :]; the output at time t sees the current input and the
K-1 before it, never the future:

    y[b, t, d] = bias[d] + sum_{j=0}^{K-1} w[d, j] * x[b, t - K + 1 + j, d]

The LAST tap w[d, K-1] multiplies the current token x[b, t, d] and the first tap the oldest one,
exactly as PyTorch's Conv1d(groups=D, padding=K-1) sliced to the first T outputs. Inputs at
negative time come from `initial_state` (B, K-1, D), the K-1 previous inputs oldest first, or are
zero. Writing xp = concat(initial_state, x) along time (length K-1+T), the sum is

    y[:, t, :] = bias + sum_j w[:, j] * xp[:, t + j, :]                     (one slice per tap)

and the carried state after the sequence is the last K-1 rows of xp (which mixes in the initial
state when T < K-1). `step` applies the same formula to one token and shifts the state by one,
so forward over a sequence equals step applied token by token.

Backward (gradients do not flow into initial_state nor out of final_state):

    dxp[:, t + j, :] += dy[:, t, :] * w[:, j]       dx = dxp[:, K-1:, :]
    dw[:, j]          = sum_{b,t} dy[b, t, :] * xp[b, t + j, :]
    dbias             = sum_{b,t} dy[b, t, :]

Cost: O(B T D K) time for forward and backward, O(B (T + K) D) memory for the cache (the padded
input); step is O(B D K) time with an O(B (K-1) D) state.

Shapes legend: B batch, T time, D channels, K kernel size (taps).
"""
import numpy as np

from minilm.ops._validate import (as_float_array, check_bool, check_nonempty_time, check_same_dtype,
                                  check_shape)


def _check_taps(w, channels):
    """w: (D, K) with K >= 1. Returns K."""
    w = as_float_array("w", w, 2)
    check_shape("w", w, (channels, None))
    if w.shape[1] < 1:
        raise ValueError(f"w must have at least one tap (K >= 1) in shape (D, K), got shape {w.shape}")
    return w.shape[1]


def _check_bias(b, channels):
    if b is None:
        return None
    b = as_float_array("b", b, 1)
    check_shape("b", b, (channels,))
    return b


def _check_state(name, state, batch, taps, channels):
    if state is None:
        return None
    state = as_float_array(name, state, 3)
    check_shape(name, state, (batch, taps - 1, channels))
    return state


def prepend_history(x, state, taps):
    """xp = concat(state or zeros, x) along time: (B, K-1+T, D)."""
    batch, _, channels = x.shape
    if state is None:
        state = np.zeros((batch, taps - 1, channels), dtype=x.dtype)
    return np.concatenate([state, x], axis=1)


def causal_conv(xp, w, T):
    """y[:, t] = sum_j w[:, j] * xp[:, t + j] for t < T; xp (B, K-1+T, D), w (D, K) -> (B, T, D)."""
    y = np.zeros((xp.shape[0], T, xp.shape[2]), dtype=xp.dtype)
    for j in range(w.shape[1]):
        y += w[:, j] * xp[:, j:j + T, :]
    return y


def forward(x, w, b=None, initial_state=None, return_state=False):
    """Causal depthwise convolution of a whole sequence.

    x: (B, T, D) float32/float64, T >= 1.
    w: (D, K) taps, K >= 1; w[:, K-1] multiplies the current token.
    b: (D,) or None.
    initial_state: (B, K-1, D), the K-1 inputs before x (oldest first), or None for zeros.
    return_state: when True the first return value is (y, final_state), final_state (B, K-1, D)
        holding the last K-1 inputs (continue with `step` or another `forward`).
    Returns (y, cache) or ((y, final_state), cache); y (B, T, D);
    cache = {"xp", "w", "has_bias"} with xp (B, K-1+T, D) the input with its history prepended.
    """
    x = as_float_array("x", x, 3)
    batch, T, channels = x.shape
    check_nonempty_time("x", T)
    taps = _check_taps(w, channels)
    b = _check_bias(b, channels)
    initial_state = _check_state("initial_state", initial_state, batch, taps, channels)
    return_state = check_bool("return_state", return_state)
    check_same_dtype([("x", x), ("w", w), ("b", b), ("initial_state", initial_state)])

    xp = prepend_history(x, initial_state, taps)
    y = causal_conv(xp, w, T)
    if b is not None:
        y += b
    cache = {"xp": xp, "w": w, "has_bias": b is not None}
    if return_state:
        final_state = xp[:, T:, :].copy()          # the last K-1 rows of history + input
        return (y, final_state), cache
    return y, cache


def step(x_t, state, w, b=None):
    """One token of the same convolution, for generation.

    x_t: (B, D) the current input; state: (B, K-1, D) the previous K-1 inputs, oldest first
    (None for zeros, i.e. the start of a sequence); w: (D, K); b: (D,) or None.
    Returns (y_t (B, D), new_state (B, K-1, D)); new_state drops the oldest input and appends x_t.
    """
    x_t = as_float_array("x_t", x_t, 2)
    batch, channels = x_t.shape
    taps = _check_taps(w, channels)
    b = _check_bias(b, channels)
    state = _check_state("state", state, batch, taps, channels)
    check_same_dtype([("x_t", x_t), ("w", w), ("b", b), ("state", state)])

    window = prepend_history(x_t[:, None, :], state, taps)       # (B, K, D), oldest first
    y_t = causal_conv(window, w, 1)[:, 0, :]
    if b is not None:
        y_t += b
    return y_t, window[:, 1:, :].copy()


def backward(dy, cache):
    """Gradients given dy = dL/dy (B, T, D); the final state (if returned) gets no gradient.

    Returns (dx (B, T, D), dw (D, K), db (D,) or None when b was None).
    """
    xp, w = cache["xp"], cache["w"]
    taps = w.shape[1]
    T = xp.shape[1] - (taps - 1)
    dy = as_float_array("dy", dy, 3)
    check_shape("dy", dy, (xp.shape[0], T, xp.shape[2]))
    check_same_dtype([("x", xp), ("dy", dy)])

    dxp = np.zeros_like(xp)
    dw = np.empty_like(w)
    for j in range(taps):
        dxp[:, j:j + T, :] += dy * w[:, j]
        dw[:, j] = np.sum(dy * xp[:, j:j + T, :], axis=(0, 1))
    dx = dxp[:, taps - 1:, :]
    db = dy.sum(axis=(0, 1)) if cache["has_bias"] else None
    return dx, dw, db
