"""RWKV-4 time mixing (WKV): a decayed, softmax-like average over the past, with a bonus for now.

Shapes: B batch, T time, D channels (called C in the RWKV code).

    w, u (D,)    k, v (B, T, D)    wkv (B, T, D)    state (a, b, p), each (B, D)

Per channel, with per-step decay factor exp(w) and bonus u for the current token:

    wkv_t = ( sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t )
          / ( sum_{i<t} e^{(t-1-i) w + k_i}     + e^{u + k_t}     )

RWKV-4 passes w = -exp(time_decay) < 0, so the past fades; the caller does that reparametrization
(and chains dw through it). Any finite w is accepted here.

Recurrent form. Numerator and denominator of the past are
    A_t = e^w A_{t-1} + e^{k_t} v_t,    Bd_t = e^w Bd_{t-1} + e^{k_t},
    wkv_t = (A_{t-1} + e^{u+k_t} v_t) / (Bd_{t-1} + e^{u+k_t}).
Computed like this, e^{k} overflows for k above ~709 (float64) or ~88 (float32). The stable
form keeps a shared exponent p: A_t = a_t e^{p_t}, Bd_t = b_t e^{p_t}, and the state is (a, b, p).
Each step only ever exponentiates numbers <= 0:

    output  (output_weights):  m = max(p, u + k_t),  alpha = e^{p - m},  beta = e^{u + k_t - m}
                               wkv_t = (alpha a + beta v_t) / (alpha b + beta)
    update  (update_weights):  p' = max(w + p, k_t),  alpha' = e^{w + p - p'},  beta' = e^{k_t - p'}
                               a' = alpha' a + beta' v_t,  b' = alpha' b + beta'

The factor e^m cancels in the ratio. The empty state is a = b = 0, p = -inf (used when
initial_state is None); a state with a = b = 0 is treated as empty whatever its p.

Backward (reverse time, also stable). Let g_t = dL/dwkv_t and carry the adjoints of the state
after step t scaled by e^{p_t}: ga_t = e^{p_t} dL/dA_t, gb_t = e^{p_t} dL/dBd_t (both 0 after the
last step). For t = T-1 .. 0, with den_t = alpha b + beta and the weights of step t:

    through wkv_t:   c = g_t beta / den_t
                     dv_t += c,  dk_t += c (v_t - wkv_t),  du += c (v_t - wkv_t)
    through state:   dv_t += ga_t beta',  dk_t += (ga_t v_t + gb_t) beta'
                     dw += alpha' (ga_t a_{t-1} + gb_t b_{t-1})
    carry back:      ga_{t-1} = alpha g_t / den_t + alpha' ga_t
                     gb_{t-1} = -alpha g_t wkv_t / den_t + alpha' gb_t

Every factor is an alpha or beta (<= 1) or a ratio over den_t, so the backward is as safe as the
forward. Time O(B T D), memory O(B T D) for the cache.

Gradients do not flow into initial_state, nor out of the returned final state.
"""
import numpy as np

from minilm.ops._validate import as_float_array, check_bool, check_nonempty_time, check_same_dtype, \
    check_shape


def output_weights(p, u, k_t):
    """alpha = e^{p - m}, beta = e^{u + k_t - m} with m = max(p, u + k_t); both in [0, 1]."""
    bonus = u + k_t
    m = np.maximum(p, bonus)
    return np.exp(p - m), np.exp(bonus - m)


def update_weights(p, w, k_t):
    """alpha' = e^{w + p - p'}, beta' = e^{k_t - p'} with the new exponent p' = max(w + p, k_t)."""
    decayed = w + p
    p_new = np.maximum(decayed, k_t)
    return np.exp(decayed - p_new), np.exp(k_t - p_new), p_new


def _step(w, u, k_t, v_t, a, b, p):
    """One token, no validation: returns wkv_t and the new state (a, b, p), all (B, D)."""
    alpha, beta = output_weights(p, u, k_t)
    wkv_t = (alpha * a + beta * v_t) / (alpha * b + beta)
    alpha2, beta2, p_new = update_weights(p, w, k_t)
    return wkv_t, (alpha2 * a + beta2 * v_t, alpha2 * b + beta2, p_new)


def _empty_state(batch, channels, dtype):
    zeros = np.zeros((batch, channels), dtype=dtype)
    return zeros, zeros.copy(), np.full((batch, channels), -np.inf, dtype=dtype)


def _check_state(state, batch, channels, dtype, name):
    """Validate a carried state (a, b, p); returns it with p = -inf where a = b = 0 (empty)."""
    if not isinstance(state, (tuple, list)):
        raise TypeError(f"{name} must be a tuple (a, b, p) of three arrays, got {type(state).__name__}")
    if len(state) != 3:
        raise ValueError(f"{name} must be a tuple (a, b, p) of three arrays, got {len(state)} items")
    parts = []
    for part_name, x in zip("abp", state):
        full_name = f"{name}[{'abp'.index(part_name)}] ({part_name})"
        x = as_float_array(full_name, x, 2)
        check_shape(full_name, x, (batch, channels))
        if x.dtype != dtype:
            raise TypeError(f"{full_name} must have the same dtype as k ({dtype}), got {x.dtype}")
        parts.append(x)
    a, b, p = parts
    if np.any(b < 0):
        raise ValueError(f"{name}[1] (b) is a sum of exponentials and must be >= 0, got min {b.min()}")
    p = np.where((a == 0) & (b == 0), -np.inf, p)
    return a, b, p


def _check_params(w, u, channels):
    for name, x in (("w", w), ("u", u)):
        check_shape(name, x, (channels,))


def _validate(w, u, k, v, initial_state, return_state):
    w = as_float_array("w", w, 1)
    u = as_float_array("u", u, 1)
    k = as_float_array("k", k, 3)
    v = as_float_array("v", v, 3)
    check_same_dtype([("k", k), ("v", v), ("w", w), ("u", u)])
    B, T, D = k.shape
    check_shape("v", v, (B, T, D))
    _check_params(w, u, D)
    check_nonempty_time("k", T)
    return_state = check_bool("return_state", return_state)
    if initial_state is None:
        state = _empty_state(B, D, k.dtype)
    else:
        state = _check_state(initial_state, B, D, k.dtype, "initial_state")
    return w, u, k, v, state, return_state


def forward(w, u, k, v, initial_state=None, return_state=False):
    """WKV over a whole sequence, with the running-max exponent (stable form).

    w: (D,) log of the per-step decay (RWKV-4 passes -exp(time_decay)); u: (D,) bonus of the
    current token; k, v: (B, T, D). All float32 or all float64.
    initial_state: None (empty) or (a, b, p), each (B, D), as returned with return_state=True.
    return_state: if True the first return value is (wkv, final_state).

    Returns wkv (B, T, D) in the input dtype (or (wkv, (a, b, p))), and a cache dict:
        w, u, k, v       the inputs (references)
        wkv              the outputs (B, T, D)
        a_in, b_in, p_in the state entering each step, (B, T, D) each
    """
    w, u, k, v, (a, b, p), return_state = _validate(w, u, k, v, initial_state, return_state)
    B, T, D = k.shape
    wkv = np.empty_like(k)
    a_in, b_in, p_in = np.empty_like(k), np.empty_like(k), np.empty_like(k)
    for t in range(T):
        a_in[:, t], b_in[:, t], p_in[:, t] = a, b, p
        wkv[:, t], (a, b, p) = _step(w, u, k[:, t], v[:, t], a, b, p)

    cache = {"w": w, "u": u, "k": k, "v": v, "wkv": wkv, "a_in": a_in, "b_in": b_in, "p_in": p_in}
    out = (wkv, (a, b, p)) if return_state else wkv
    return out, cache


def backward(dwkv, cache):
    """Reverse-time recurrence for (dw, du, dk, dv); see the module docstring for the equations.

    dwkv: (B, T, D), dL/dwkv. Returns dw (D,), du (D,), dk (B, T, D), dv (B, T, D).
    """
    w, u, k, v, wkv = cache["w"], cache["u"], cache["k"], cache["v"], cache["wkv"]
    a_in, b_in, p_in = cache["a_in"], cache["b_in"], cache["p_in"]
    dwkv = as_float_array("dwkv", dwkv, 3)
    check_shape("dwkv", dwkv, k.shape)
    check_same_dtype([("k", k), ("dwkv", dwkv)])

    B, T, D = k.shape
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    dw, du = np.zeros_like(w), np.zeros_like(u)
    ga = np.zeros((B, D), dtype=k.dtype)   # e^{p_t} dL/dA_t for the state after step t
    gb = np.zeros((B, D), dtype=k.dtype)   # e^{p_t} dL/dBd_t
    for t in reversed(range(T)):
        a, b, p = a_in[:, t], b_in[:, t], p_in[:, t]
        k_t, v_t, y_t, g_t = k[:, t], v[:, t], wkv[:, t], dwkv[:, t]
        alpha, beta = output_weights(p, u, k_t)
        alpha2, beta2, _ = update_weights(p, w, k_t)
        den = alpha * b + beta

        # wkv_t = (alpha a + beta v_t) / den: the direct path through the current token.
        c = g_t * beta / den
        dv[:, t] = c + ga * beta2
        dk[:, t] = c * (v_t - y_t) + (ga * v_t + gb) * beta2
        du += np.sum(c * (v_t - y_t), axis=0)
        # a' = alpha' a + beta' v_t, b' = alpha' b + beta': the path through the carried state.
        dw += np.sum(alpha2 * (ga * a + gb * b), axis=0)

        ga = alpha * g_t / den + alpha2 * ga
        gb = -alpha * g_t * y_t / den + alpha2 * gb
    return dw, du, dk, dv


def step(w, u, k_t, v_t, state=None):
    """One token of WKV: the decoding form, equal to forward() token by token.

    w, u: (D,); k_t, v_t: (B, D); state: None (empty) or (a, b, p), each (B, D).
    Returns (wkv_t (B, D), new_state (a, b, p)). O(B D) time and memory per token.
    """
    w = as_float_array("w", w, 1)
    u = as_float_array("u", u, 1)
    k_t = as_float_array("k_t", k_t, 2)
    v_t = as_float_array("v_t", v_t, 2)
    check_same_dtype([("k_t", k_t), ("v_t", v_t), ("w", w), ("u", u)])
    B, D = k_t.shape
    check_shape("v_t", v_t, (B, D))
    _check_params(w, u, D)
    if state is None:
        a, b, p = _empty_state(B, D, k_t.dtype)
    else:
        a, b, p = _check_state(state, B, D, k_t.dtype, "state")
    return _step(w, u, k_t, v_t, a, b, p)
