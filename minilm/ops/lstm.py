"""LSTM layer with backpropagation through time written out by hand.

Shapes: B batch, T time, Din input features, H hidden units (in this module H is the LSTM
hidden size, not a number of heads).

    x (B, T, Din)    Wx (Din, 4H)    Wh (H, 4H)    b (4H,)    h out (B, T, H)    state (h, c), each (B, H)

The four gate blocks of every 4H axis are in the order (i, f, g, o):

    z_t = x_t Wx + h_{t-1} Wh + b                      (B, 4H)  preactivations
    i = sigmoid(z_i), f = sigmoid(z_f), g = tanh(z_g), o = sigmoid(z_o)      gates
    c_t = f * c_{t-1} + i * g                                                cell
    h_t = o * tanh(c_t)                                                      output

x_t Wx + b does not depend on the past, so it is one matmul over all time steps. The rest cannot be
parallelized over time: z_t needs h_{t-1}, and the nonlinearities in between keep the map
h_{t-1} -> h_t from being associative, so there is no scan form (unlike WKV or the linear RNNs).

Backward (BPTT), for t = T-1 .. 0, with dh_t = dh_out_t + (carry from step t+1):

    do = dh_t * tanh(c_t)
    dc_t = dc_carry + dh_t * o * (1 - tanh(c_t)^2)
    di = dc_t * g,  dg = dc_t * i,  df = dc_t * c_{t-1},  dc_carry = dc_t * f
    dz = [di i(1-i), df f(1-f), dg (1-g^2), do o(1-o)]
    dWh += h_{t-1}^T dz,  dh carry = dz Wh^T
then dx = dz Wx^T, dWx = sum_{B,T} x^T dz, db = sum_{B,T} dz.

Time O(T B H (Din + H)), memory O(B T H) for the cache. Gradients do not flow into initial_state,
nor out of the returned final state.
"""
import numpy as np

from minilm.ops._validate import as_float_array, check_bool, check_nonempty_time, check_same_dtype, \
    check_shape


def sigmoid(z):
    """1 / (1 + e^{-z}) without overflow: only e^{-|z|} <= 1 is ever computed."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def gates(z):
    """Split preactivations z (..., 4H) into activated gates i, f, g, o, each (..., H)."""
    z_i, z_f, z_g, z_o = np.split(z, 4, axis=-1)
    return sigmoid(z_i), sigmoid(z_f), np.tanh(z_g), sigmoid(z_o)


def cell_update(i, f, g, o, c_prev):
    """c_t = f c_{t-1} + i g;  h_t = o tanh(c_t). Returns (h_t, c_t)."""
    c = f * c_prev + i * g
    return o * np.tanh(c), c


def _check_weights(Wx, Wh, b, din):
    """Wx (Din, 4H), Wh (H, 4H), b (4H,); returns H."""
    if Wx.shape[1] % 4 != 0 or Wx.shape[1] == 0:
        raise ValueError(f"Wx must have shape (Din, 4H) with H >= 1 (gate blocks i, f, g, o), "
                         f"got {Wx.shape}")
    H = Wx.shape[1] // 4
    check_shape("Wx", Wx, (din, 4 * H))
    check_shape("Wh", Wh, (H, 4 * H))
    check_shape("b", b, (4 * H,))
    return H


def _check_state(state, batch, hidden, dtype, name):
    if not isinstance(state, (tuple, list)):
        raise TypeError(f"{name} must be a tuple (h, c) of two arrays, got {type(state).__name__}")
    if len(state) != 2:
        raise ValueError(f"{name} must be a tuple (h, c) of two arrays, got {len(state)} items")
    parts = []
    for index, (part, x) in enumerate(zip("hc", state)):
        full_name = f"{name}[{index}] ({part})"
        x = as_float_array(full_name, x, 2)
        check_shape(full_name, x, (batch, hidden))
        if x.dtype != dtype:
            raise TypeError(f"{full_name} must have the same dtype as x ({dtype}), got {x.dtype}")
        parts.append(x)
    return tuple(parts)


def _validate_weights(Wx, Wh, b):
    Wx = as_float_array("Wx", Wx, 2)
    Wh = as_float_array("Wh", Wh, 2)
    b = as_float_array("b", b, 1)
    return Wx, Wh, b


def forward(x, Wx, Wh, b, initial_state=None, return_state=False):
    """Run the LSTM over a sequence, one step after the other.

    x: (B, T, Din); Wx: (Din, 4H); Wh: (H, 4H); b: (4H,); gate blocks (i, f, g, o).
    initial_state: None (zeros) or (h, c), each (B, H), as returned with return_state=True.
    return_state: if True the first return value is (h_out, (h_T, c_T)).

    Returns h_out (B, T, H) in the input dtype, and a cache dict:
        x, Wx, Wh   the inputs (references)
        gates       activated gates (B, T, 4H), blocks i, f, g, o
        h, c        hidden and cell states (B, T + 1, H), index 0 holds the initial state
    """
    x = as_float_array("x", x, 3)
    Wx, Wh, b = _validate_weights(Wx, Wh, b)
    check_same_dtype([("x", x), ("Wx", Wx), ("Wh", Wh), ("b", b)])
    B, T, Din = x.shape
    H = _check_weights(Wx, Wh, b, Din)
    check_nonempty_time("x", T)
    return_state = check_bool("return_state", return_state)
    if initial_state is None:
        h0 = c0 = np.zeros((B, H), dtype=x.dtype)
    else:
        h0, c0 = _check_state(initial_state, B, H, x.dtype, "initial_state")

    x_proj = x @ Wx + b                  # the input part of z_t, for every t at once
    hs = np.empty((B, T + 1, H), dtype=x.dtype)
    cs = np.empty((B, T + 1, H), dtype=x.dtype)
    acts = np.empty((B, T, 4 * H), dtype=x.dtype)
    hs[:, 0], cs[:, 0] = h0, c0
    for t in range(T):                   # sequential: z_t needs h_{t-1}
        i, f, g, o = gates(x_proj[:, t] + hs[:, t] @ Wh)
        hs[:, t + 1], cs[:, t + 1] = cell_update(i, f, g, o, cs[:, t])
        acts[:, t] = np.concatenate([i, f, g, o], axis=-1)

    cache = {"x": x, "Wx": Wx, "Wh": Wh, "gates": acts, "h": hs, "c": cs}
    h_out = hs[:, 1:]
    out = (h_out, (hs[:, T].copy(), cs[:, T].copy())) if return_state else h_out
    return out, cache


def backward(dh_out, cache):
    """Backpropagation through time; see the module docstring for the equations.

    dh_out: (B, T, H), dL/dh_out. Returns (dx, dWx, dWh, db) with the shapes of x, Wx, Wh, b.
    """
    x, Wx, Wh, acts, hs, cs = cache["x"], cache["Wx"], cache["Wh"], cache["gates"], cache["h"], cache["c"]
    B, T, H = hs.shape[0], hs.shape[1] - 1, hs.shape[2]
    dh_out = as_float_array("dh_out", dh_out, 3)
    check_shape("dh_out", dh_out, (B, T, H))
    check_same_dtype([("x", x), ("dh_out", dh_out)])

    dz = np.empty_like(acts)             # dL/dz_t for every step
    dWh = np.zeros_like(Wh)
    dh_carry = np.zeros((B, H), dtype=x.dtype)
    dc_carry = np.zeros((B, H), dtype=x.dtype)
    for t in reversed(range(T)):
        i, f, g, o = np.split(acts[:, t], 4, axis=-1)
        c_prev, tanh_c = cs[:, t], np.tanh(cs[:, t + 1])
        dh = dh_out[:, t] + dh_carry
        # h_t = o tanh(c_t)
        do = dh * tanh_c
        dc = dc_carry + dh * o * (1.0 - tanh_c ** 2)
        # c_t = f c_{t-1} + i g
        di, df, dg = dc * g, dc * c_prev, dc * i
        dc_carry = dc * f
        # gate nonlinearities: sigmoid' = s (1 - s), tanh' = 1 - tanh^2
        dz_t = np.concatenate([di * i * (1.0 - i), df * f * (1.0 - f), dg * (1.0 - g ** 2),
                               do * o * (1.0 - o)], axis=-1)
        dz[:, t] = dz_t
        # z_t = x_t Wx + h_{t-1} Wh + b
        dWh += hs[:, t].T @ dz_t
        dh_carry = dz_t @ Wh.T

    dx = dz @ Wx.T
    dWx = np.einsum("btd,btg->dg", x, dz)
    db = dz.sum(axis=(0, 1))
    return dx, dWx, dWh, db


def step(x_t, state, Wx, Wh, b):
    """One LSTM step: the decoding form, equal to forward() token by token.

    x_t: (B, Din); state: None (zeros) or (h, c), each (B, H); Wx, Wh, b as in forward.
    Returns (h_t (B, H), new_state (h_t, c_t)). O(B H (Din + H)) per token.
    """
    x_t = as_float_array("x_t", x_t, 2)
    Wx, Wh, b = _validate_weights(Wx, Wh, b)
    check_same_dtype([("x_t", x_t), ("Wx", Wx), ("Wh", Wh), ("b", b)])
    B, Din = x_t.shape
    H = _check_weights(Wx, Wh, b, Din)
    if state is None:
        h_prev = c_prev = np.zeros((B, H), dtype=x_t.dtype)
    else:
        h_prev, c_prev = _check_state(state, B, H, x_t.dtype, "state")
    i, f, g, o = gates(x_t @ Wx + h_prev @ Wh + b)
    h, c = cell_update(i, f, g, o, c_prev)
    return h, (h, c)
