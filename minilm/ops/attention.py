"""Softmax attention: the O(T^2) reference, with a hand-written backward.

Shapes: B batch, H heads, Tq query positions, Tk key positions, Dk key/query dim, Dv value dim.

    q (B, H, Tq, Dk)    k (B, H, Tk, Dk)    v (B, H, Tk, Dv)    out (B, H, Tq, Dv)

Forward, one equation per function below:

    S   = scale * q k^T                       (B, H, Tq, Tk)   attention_logits
    S_ij = -inf where key j is masked          causal only      causal_mask
    P   = softmax_j(S - max_j S)               (B, H, Tq, Tk)   stable_softmax
    out = P v                                  (B, H, Tq, Dv)   forward

Backward, given dout = dL/dout:

    dv = P^T dout
    dP = dout v^T
    dS = P * (dP - rowsum(dP * P))                               softmax_backward
    dq = scale * dS k,    dk = scale * dS^T q

Causal alignment when Tq <= Tk: the queries are the LAST Tq positions of the sequence, so query i
sits at absolute position Tk - Tq + i and sees keys 0 .. Tk - Tq + i. With Tq == Tk this is the
usual lower-triangular mask; with Tq == 1 it is one decoding step over a full KV cache.

This reference materializes the whole (Tq, Tk) probability matrix for every batch and head: O(Tq Tk)
memory and O(Tq Tk (Dk + Dv)) time. That quadratic cost in the sequence length is exactly what the
other token mixers of this package avoid. The probabilities are cached for the backward pass (as in
llm.c's attention layer), so the cache is O(B H Tq Tk) too.
"""
import numpy as np

from minilm.ops._backend import kernel_backward, select_kernel
from minilm.ops._validate import as_float_array, check_bool, check_nonempty_time, check_same_dtype, \
    check_scale, check_shape

def causal_mask(Tq, Tk):
    """(Tq, Tk) bool, True where query i may attend key j, i.e. j <= i + (Tk - Tq).

    The queries are aligned with the last Tq keys (decoding with a KV cache). Needs Tq <= Tk so
    that every query sees at least key 0.
    """
    return np.tril(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq)


def attention_logits(q, k, scale):
    """S = scale * q k^T: (B, H, Tq, Dk) x (B, H, Tk, Dk) -> (B, H, Tq, Tk)."""
    return scale * (q @ np.swapaxes(k, -1, -2))


def stable_softmax(logits):
    """Softmax over the last axis with the row max subtracted first.

    After the shift the largest exponent is exp(0) = 1, so nothing overflows (logits of +-1e4 are
    fine) and the row sum is >= 1, so nothing divides by zero. Masked entries hold -inf and become
    exactly 0; every row must contain at least one finite logit.
    """
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / np.sum(weights, axis=-1, keepdims=True)


def softmax_backward(dprobs, probs):
    """dS = P * (dP - sum_j dP_j P_j): the Jacobian of a row softmax applied to dP."""
    return probs * (dprobs - np.sum(dprobs * probs, axis=-1, keepdims=True))


def _validate(q, k, v, causal, scale, backend):
    q = as_float_array("q", q, 4)
    k = as_float_array("k", k, 4)
    v = as_float_array("v", v, 4)
    check_same_dtype([("q", q), ("k", k), ("v", v)])
    B, H, Tq, Dk = q.shape
    check_shape("k", k, (B, H, None, Dk))
    Tk = k.shape[2]
    check_shape("v", v, (B, H, Tk, None))
    check_nonempty_time("q", Tq)
    check_nonempty_time("k", Tk)
    if Dk == 0:
        raise ValueError(f"q must have a key dimension Dk >= 1, got shape {q.shape}")
    if v.shape[3] == 0:
        raise ValueError(f"v must have a value dimension Dv >= 1, got shape {v.shape}")
    causal = check_bool("causal", causal)
    if causal and Tq > Tk:
        raise ValueError(f"with causal=True, q must not have more time steps than k "
                         f"(the queries are the last Tq of the Tk positions): got Tq = {Tq}, Tk = {Tk}")
    scale = check_scale("scale", scale, 1.0 / float(np.sqrt(Dk)))  # a Python float keeps float32 float32
    kernel = select_kernel(backend, "attention")
    return q, k, v, causal, scale, kernel


def forward(q, k, v, causal=True, scale=None, backend="auto"):
    """Softmax attention, materializing the (Tq, Tk) probabilities: O(T^2) time and memory.

    q: (B, H, Tq, Dk); k: (B, H, Tk, Dk); v: (B, H, Tk, Dv); all float32 or all float64.
    causal: mask future keys; the Tq queries are the last Tq of the Tk positions (Tq <= Tk).
            Without the mask any Tq, Tk is allowed.
    scale:  multiplies q k^T; None means 1 / sqrt(Dk).
    backend: "numpy" (this reference) | "numba" (minilm.kernels.cpu.attention: flash-style tiles,
             O(T·d) memory) | "auto" (numba) | "cuda" (no kernel yet: raises).

    Returns out (B, H, Tq, Dv) in the input dtype, and a cache dict:
        q, k, v  the inputs (references, not copies)
        probs    P, (B, H, Tq, Tk): the softmax probabilities, zero where masked
        scale    the scale actually used
    """
    q, k, v, causal, scale, kernel = _validate(q, k, v, causal, scale, backend)
    if kernel is not None:
        return kernel.forward(q, k, v, causal=causal, scale=scale)

    logits = attention_logits(q, k, scale)
    if causal:
        logits = np.where(causal_mask(q.shape[2], k.shape[2]), logits, -np.inf)
    probs = stable_softmax(logits)
    out = probs @ v

    cache = {"q": q, "k": k, "v": v, "probs": probs, "scale": scale}
    return out, cache


def backward(dout, cache):
    """Gradients of softmax attention from the cached probabilities.

    dout: (B, H, Tq, Dv), dL/dout, same dtype as the forward inputs.
    Returns (dq, dk, dv) with the shapes of q, k, v. Masked entries have P = 0, so they get no
    gradient and no special case is needed.
    """
    q, v = cache["q"], cache["v"]
    dout = as_float_array("dout", dout, 4)
    check_shape("dout", dout, q.shape[:3] + v.shape[3:])
    check_same_dtype([("q", q), ("dout", dout)])
    if "backend" in cache:
        return kernel_backward(dout, cache, "attention")
    k, probs, scale = cache["k"], cache["probs"], cache["scale"]

    dv = np.swapaxes(probs, -1, -2) @ dout           # out = P v      -> dv = P^T dout
    dprobs = dout @ np.swapaxes(v, -1, -2)           #                -> dP = dout v^T
    dlogits = softmax_backward(dprobs, probs)        # P = softmax(S) -> dS
    dq = scale * (dlogits @ k)                       # S = scale q k^T -> dq, dk
    dk = scale * (np.swapaxes(dlogits, -1, -2) @ q)
    return dq, dk, dv
