"""Causal linear attention on the CPU: chunked, BLAS products per chunk, parallel over (batch, head).

Shapes: B batch, H heads, T time, Dk query/key dim, Dv value dim, F = Dk feature dim of φ,
C chunk size, M = Dv (or Dv + 1 when normalized, see below).

    q, k (B, H, T, Dk)    v (B, H, T, Dv)    out (B, H, T, Dv)    log_decay g: None, (H,) or (B, H, T)
    state S (B, H, F, Dv), and z (B, H, F) when normalize=True

Same function as minilm.ops.linear_attention (causal modes), for the feature maps identity, elu1 and
relu. With Q̃ = scale·φ(Q), K̃ = φ(K):

    S_t   = exp(g_t)·S_{t−1} + K̃_tᵀ v_t,     out_t = Q̃_t S_t
    z_t   = exp(g_t)·z_{t−1} + K̃_t,          out_t = Q̃_t S_t / (Q̃_t·z_t + EPS)     (normalize=True)

z is the state of a value column that is constantly 1, so the normalized kernel runs on [V | 1]
(M = Dv + 1 columns) and the last output column is the denominator.

Chunked form, for one chunk of C tokens entering with state S (b = cumulative log-decay inside the
chunk, restarted at every chunk so every exponent is <= 0; b_C its last entry):

    A     = (Q̃ K̃ᵀ) ⊙ D,   D_rs = exp(b_r − b_s)·[r ≥ s]        (C, C)   intra-chunk, masked
    out   = A V + exp(b) ⊙ (Q̃ S)                                (C, M)   + inter-chunk
    S_new = exp(b_C)·S + (exp(b_C − b) ⊙ K̃)ᵀ V                 (F, M)   state passing

Backward, dO the gradient of the [out | denominator] block (dO = [dout/den | −(dout·out)/den] when
normalized), G the gradient of the state leaving the chunk (zero after the last chunk: no gradient
flows out of the final state, nor into the initial state):

    dA  = (dO Vᵀ) ⊙ D
    dQ̃  = dA K̃ + exp(b) ⊙ (dO Sᵀ)                    forward sweep over chunks (recomputes S)
    dK̃  = dAᵀ Q̃ + exp(b_C − b) ⊙ (V Gᵀ)              reverse sweep over chunks
    dV  = Aᵀ dO + (exp(b_C − b) ⊙ K̃) G
    G  ← exp(b_C)·G + (exp(b) ⊙ Q̃)ᵀ dO
    ∂L/∂b_t = Q̃_t·dQ̃_t − K̃_t·dK̃_t,   ∂L/∂g_t = Σ_{r ≥ t} ∂L/∂b_r

Only the running state (F×M) is kept per (batch, head); no per-token or per-chunk state is stored.

Cost per (batch, head): forward 4 matmuls per chunk, O(T·C·(F+M) + T·F·M) time, O(C² + F·M)
working memory; backward 11 matmuls per chunk, same orders. Parallel over B·H with prange; the
products are np.dot on contiguous 2-D blocks (Numba calls BLAS), in the input dtype. No fastmath.

Not supported here (supports() says so, and the op then uses its NumPy reference): the taylor2
feature map (F = 1 + Dk + Dk² makes the state too large for this layout), and causal=False, which the
reference already computes as two BLAS products, Q̃ (K̃ᵀ V).

Also here: linear_attention_step, one decoding step of the recurrence.
"""
import math

import numpy as np
from numba import njit, prange

CHUNK = 64            # tokens per chunk (the op's default chunk_size)
EPS = 1e-6            # added to the normalizer Q̃·z; the same constant as minilm.ops.linear_attention
FEATURE_MAPS = {"identity": 0, "elu1": 1, "relu": 2}


def available():
    """(ok, reason): the Numba CPU kernels run wherever numba imports."""
    return True, ""


def supports(causal=True, feature_map="identity", **unused):
    """(ok, reason) for an option set of the op; unsupported sets fall back to the NumPy reference."""
    if not causal:
        return False, "causal=False is two BLAS products, Q̃ (K̃ᵀ V), in the NumPy reference; no kernel"
    if feature_map not in FEATURE_MAPS:
        return False, f"feature_map={feature_map!r} has no Numba kernel (supported: {sorted(FEATURE_MAPS)})"
    return True, ""


# ----------------------------------------------------------------------------------------------
# feature maps, elementwise: 0 identity, 1 elu1 (elu(x) + 1), 2 relu

@njit(cache=True)
def _phi(x, feature_map):
    if feature_map == 1:
        return x + 1.0 if x > 0 else math.exp(x)   # branch-wise: never (exp(x) − 1) + 1
    if feature_map == 2:
        return x if x > 0 else 0.0
    return x


@njit(cache=True)
def _phi_grad(x, feature_map):
    """dφ/dx."""
    if feature_map == 1:
        return 1.0 if x > 0 else math.exp(x)
    if feature_map == 2:
        return 1.0 if x > 0 else 0.0
    return 1.0


# ----------------------------------------------------------------------------------------------
# chunk blocks (explicit loops: cheap to compile, no hidden temporaries)

@njit(cache=True)
def _chunk_inputs(q, k, v, g, t0, t1, feature_map, scale, normalize, has_decay):
    """The blocks of tokens t0 .. t1−1 of one head:

        Q̃ = scale·φ(q) (n, F),  K̃ = φ(k) (n, F),  V (n, M) (with a column of ones when normalizing),
        b (n,) the cumulative log-decay from the chunk start, in float64 (zeros without decay).
    """
    n, Dk, Dv = t1 - t0, q.shape[1], v.shape[1]
    M = Dv + 1 if normalize else Dv
    Qc = np.empty((n, Dk), dtype=q.dtype)
    Kc = np.empty((n, Dk), dtype=k.dtype)
    Vc = np.ones((n, M), dtype=v.dtype)
    b = np.zeros(n)
    running = 0.0
    for r in range(n):
        for f in range(Dk):
            Qc[r, f] = scale * _phi(q[t0 + r, f], feature_map)
            Kc[r, f] = _phi(k[t0 + r, f], feature_map)
        for c in range(Dv):
            Vc[r, c] = v[t0 + r, c]
        if has_decay:
            running += g[t0 + r]
            b[r] = running
    return Qc, Kc, Vc, b


@njit(cache=True)
def _mask_and_decay(A, b, has_decay):
    """A ⊙ D in place: zero above the diagonal, exp(b_r − b_s) on and below it (every exponent <= 0)."""
    n = A.shape[0]
    for r in range(n):
        if has_decay:
            for s in range(r + 1):
                A[r, s] *= math.exp(b[r] - b[s])
        for s in range(r + 1, n):
            A[r, s] = 0.0


@njit(cache=True)
def _decay_weights(b, to_end):
    """Per-token decay factors of a chunk: exp(b_r) from the chunk start to token r, or, with to_end,
    exp(b_last − b_r) from token r to the chunk end. Both are <= 1."""
    n = b.shape[0]
    w = np.empty(n)
    for r in range(n):
        w[r] = math.exp(b[n - 1] - b[r]) if to_end else math.exp(b[r])
    return w


@njit(cache=True)
def _scale_rows(X, w):
    """diag(w) X, a fresh array."""
    out = np.empty_like(X)
    for r in range(X.shape[0]):
        for c in range(X.shape[1]):
            out[r, c] = X[r, c] * w[r]
    return out


@njit(cache=True)
def _add_scaled_rows(acc, X, w):
    """acc += diag(w) X, in place."""
    for r in range(X.shape[0]):
        for c in range(X.shape[1]):
            acc[r, c] += w[r] * X[r, c]


@njit(cache=True)
def _decay_add_product(acc, decay, a, b):
    """acc = decay·acc + a @ b, in place (one BLAS product)."""
    prod = np.dot(a, b)
    for r in range(prod.shape[0]):
        for c in range(prod.shape[1]):
            acc[r, c] = decay * acc[r, c] + prod[r, c]


# ----------------------------------------------------------------------------------------------
# forward

@njit(cache=True)
def _forward_head(q, k, v, g, has_decay, S, feature_map, scale, normalize, chunk, out, den):
    """One (batch, head): q, k (T, Dk), v (T, Dv), g (T,), S (F, M) the incoming state (updated in
    place to the final state), out (T, Dv), den (T,) the normalizer (written when normalizing)."""
    T, Dv = v.shape
    for t0 in range(0, T, chunk):
        t1 = min(t0 + chunk, T)
        n = t1 - t0
        Qc, Kc, Vc, b = _chunk_inputs(q, k, v, g, t0, t1, feature_map, scale, normalize, has_decay)

        A = np.dot(Qc, Kc.T)                               # intra-chunk scores (n, n)
        _mask_and_decay(A, b, has_decay)
        O = np.dot(A, Vc)                                  # intra
        Qd = _scale_rows(Qc, _decay_weights(b, False)) if has_decay else Qc
        _decay_add_product(O, 1.0, Qd, S)                  # + inter
        for r in range(n):
            if normalize:
                d = O[r, Dv] + EPS
                den[t0 + r] = d
                for c in range(Dv):
                    out[t0 + r, c] = O[r, c] / d
            else:
                for c in range(Dv):
                    out[t0 + r, c] = O[r, c]

        Kd = _scale_rows(Kc, _decay_weights(b, True)) if has_decay else Kc
        _decay_add_product(S, math.exp(b[n - 1]), Kd.T, Vc)   # state passing


@njit(parallel=True, cache=True)
def _forward_kernel(q, k, v, g, has_decay, S, feature_map, scale, normalize, chunk, out, den):
    B, H = q.shape[0], q.shape[1]
    for task in prange(B * H):
        b = task // H
        h = task % H
        gh = g[b, h] if has_decay else g[0, 0]
        _forward_head(q[b, h], k[b, h], v[b, h], gh, has_decay, S[b, h], feature_map, scale, normalize,
                      chunk, out[b, h], den[b, h])


def _per_token_decay(log_decay, B, H, T, dtype):
    """g (B, H, T) contiguous, or a (1, 1, 1) placeholder when there is no decay."""
    if log_decay is None:
        return np.zeros((1, 1, 1), dtype=dtype), False
    if log_decay.ndim == 1:
        return np.ascontiguousarray(np.broadcast_to(log_decay[None, :, None], (B, H, T))), True
    return np.ascontiguousarray(log_decay), True


def _core_state(initial_state, normalize, B, H, F, Dv, dtype):
    """The carried state: S (B, H, F, Dv), or [S | z] (B, H, F, Dv + 1) when normalizing (a copy)."""
    M = Dv + 1 if normalize else Dv
    S = np.zeros((B, H, F, M), dtype=dtype)
    if initial_state is not None:
        if normalize:
            S[..., :Dv] = initial_state[0]
            S[..., Dv] = initial_state[1]
        else:
            S[...] = initial_state
    return S


def forward(q, k, v, causal=True, chunk_size=CHUNK, feature_map="identity", scale=None, normalize=False,
            log_decay=None, initial_state=None, return_state=False):
    """Chunked causal linear attention; same contract as minilm.ops.linear_attention.forward (mode and
    backend aside). Inputs are already validated; check supports() first.

    q, k: (B, H, T, Dk); v: (B, H, T, Dv); log_decay None | (H,) | (B, H, T); initial_state S
    (B, H, F, Dv), or (S, z) with z (B, H, F) when normalize=True. chunk_size: tokens per chunk.
    Returns (out, cache), or ((out, final_state), cache) with return_state=True. The cache holds:
        backend "numba"; q, k, v (contiguous); g the per-token log-decay (B, H, T) or None;
        initial_core the incoming [S | z] state; out and den (B, H, T) the normalizer, when normalizing;
        log_decay_ndim and the options.
    """
    ok, reason = supports(causal=causal, feature_map=feature_map)
    if not ok:
        raise ValueError(reason)
    q, k, v = np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v)
    B, H, T, Dk = q.shape
    Dv = v.shape[3]
    dtype = q.dtype
    scale = 1.0 if scale is None else float(scale)
    g, has_decay = _per_token_decay(log_decay, B, H, T, dtype)
    initial_core = _core_state(initial_state, normalize, B, H, Dk, Dv, dtype)
    state = initial_core.copy()
    out = np.empty((B, H, T, Dv), dtype=dtype)
    den = np.empty((B, H, T) if normalize else (B, H, 0), dtype=dtype)
    _forward_kernel(q, k, v, g, has_decay, state, FEATURE_MAPS[feature_map], dtype.type(scale),
                    bool(normalize), int(chunk_size), out, den)

    cache = {"backend": "numba", "q": q, "k": k, "v": v, "g": g if has_decay else None,
             "log_decay_ndim": None if log_decay is None else log_decay.ndim,
             "initial_core": initial_core, "out": out if normalize else None, "den": den if normalize else None,
             "options": {"chunk_size": int(chunk_size), "feature_map": feature_map, "scale": scale,
                         "normalize": bool(normalize)}}
    if return_state:
        final_state = (state[..., :Dv], state[..., Dv]) if normalize else state
        return (out, final_state), cache
    return out, cache


# ----------------------------------------------------------------------------------------------
# backward

@njit(cache=True)
def _output_gradient(dout, out, den, t0, t1, normalize):
    """dO of the chunk, (n, M): dout, or [dout/den | −(dout·out)/den] when normalizing."""
    n, Dv = t1 - t0, dout.shape[1]
    dO = np.empty((n, Dv + 1 if normalize else Dv), dtype=dout.dtype)
    for r in range(n):
        if normalize:
            d = den[t0 + r]
            dot = 0.0
            for c in range(Dv):
                dO[r, c] = dout[t0 + r, c] / d
                dot += dout[t0 + r, c] * out[t0 + r, c]
            dO[r, Dv] = -dot / d
        else:
            for c in range(Dv):
                dO[r, c] = dout[t0 + r, c]
    return dO


@njit(cache=True)
def _backward_head(q, k, v, g, has_decay, S, dout, out, den, feature_map, scale, normalize, chunk,
                   dq, dk, dv, dg):
    """One (batch, head); arrays are that head's slices (see _forward_head). S is the incoming state
    (overwritten). Writes dq, dk, dv (T, D) and, with decay, dg (T,)."""
    T, Dk = q.shape
    Dv = v.shape[1]
    db = np.zeros(T)                                   # ∂L/∂b_t, accumulated in float64

    # forward sweep: recompute the state entering each chunk; dQ̃ needs it
    for t0 in range(0, T, chunk):
        t1 = min(t0 + chunk, T)
        n = t1 - t0
        Qc, Kc, Vc, b = _chunk_inputs(q, k, v, g, t0, t1, feature_map, scale, normalize, has_decay)
        dO = _output_gradient(dout, out, den, t0, t1, normalize)

        dA = np.dot(dO, Vc.T)
        _mask_and_decay(dA, b, has_decay)
        dQc = np.dot(dA, Kc)                           # intra
        if has_decay:                                  # + inter, decayed from the chunk start
            _add_scaled_rows(dQc, np.dot(dO, S.T), _decay_weights(b, False))
        else:
            _decay_add_product(dQc, 1.0, dO, S.T)
        for r in range(n):
            acc = 0.0
            for f in range(Dk):
                acc += Qc[r, f] * dQc[r, f]
                dq[t0 + r, f] = scale * dQc[r, f] * _phi_grad(q[t0 + r, f], feature_map)
            db[t0 + r] = acc

        Kd = _scale_rows(Kc, _decay_weights(b, True)) if has_decay else Kc
        _decay_add_product(S, math.exp(b[n - 1]), Kd.T, Vc)

    # reverse sweep: G = ∂L/∂(state leaving the chunk), zero after the last chunk
    G = np.zeros_like(S)
    n_chunks = (T + chunk - 1) // chunk
    for i in range(n_chunks - 1, -1, -1):
        t0 = i * chunk
        t1 = min(t0 + chunk, T)
        n = t1 - t0
        Qc, Kc, Vc, b = _chunk_inputs(q, k, v, g, t0, t1, feature_map, scale, normalize, has_decay)
        dO = _output_gradient(dout, out, den, t0, t1, normalize)

        A = np.dot(Qc, Kc.T)
        _mask_and_decay(A, b, has_decay)
        dA = np.dot(dO, Vc.T)
        _mask_and_decay(dA, b, has_decay)
        dKc = np.dot(dA.T, Qc)
        dVc = np.dot(A.T, dO)
        if has_decay:
            to_end = _decay_weights(b, True)
            _add_scaled_rows(dKc, np.dot(Vc, G.T), to_end)
            _decay_add_product(dVc, 1.0, _scale_rows(Kc, to_end), G)
        else:
            _decay_add_product(dKc, 1.0, Vc, G.T)
            _decay_add_product(dVc, 1.0, Kc, G)
        for r in range(n):
            acc = 0.0
            for f in range(Dk):
                acc += Kc[r, f] * dKc[r, f]
                dk[t0 + r, f] = dKc[r, f] * _phi_grad(k[t0 + r, f], feature_map)
            db[t0 + r] -= acc
            for c in range(Dv):
                dv[t0 + r, c] = dVc[r, c]

        Qd = _scale_rows(Qc, _decay_weights(b, False)) if has_decay else Qc
        _decay_add_product(G, math.exp(b[n - 1]), Qd.T, dO)

    if has_decay:                                      # ∂L/∂g_t = Σ_{r >= t} ∂L/∂b_r
        running = 0.0
        for t in range(T - 1, -1, -1):
            running += db[t]
            dg[t] = running


@njit(parallel=True, cache=True)
def _backward_kernel(q, k, v, g, has_decay, S, dout, out, den, feature_map, scale, normalize, chunk,
                     dq, dk, dv, dg):
    B, H = q.shape[0], q.shape[1]
    for task in prange(B * H):
        b = task // H
        h = task % H
        gh = g[b, h] if has_decay else g[0, 0]
        dgh = dg[b, h] if has_decay else dg[0, 0]
        _backward_head(q[b, h], k[b, h], v[b, h], gh, has_decay, S[b, h], dout[b, h], out[b, h], den[b, h],
                       feature_map, scale, normalize, chunk, dq[b, h], dk[b, h], dv[b, h], dgh)


def backward(dout, cache):
    """(dq, dk, dv), or (dq, dk, dv, dlog_decay) when log_decay was given (dlog_decay has its shape:
    (H,) sums over batch and time). Same contract as minilm.ops.linear_attention.backward."""
    q, k, v, g = cache["q"], cache["k"], cache["v"], cache["g"]
    opts = cache["options"]
    B, H, T, _ = q.shape
    dtype = q.dtype
    dout = np.ascontiguousarray(dout, dtype=dtype)
    has_decay = g is not None
    normalize = opts["normalize"]
    out = cache["out"] if normalize else np.empty((B, H, T, 0), dtype=dtype)
    den = cache["den"] if normalize else np.empty((B, H, 0), dtype=dtype)
    state = cache["initial_core"].copy()
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    dg = np.empty((B, H, T), dtype=dtype) if has_decay else np.zeros((1, 1, 1), dtype=dtype)
    _backward_kernel(q, k, v, g if has_decay else np.zeros((1, 1, 1), dtype=dtype), has_decay, state, dout,
                     out, den, FEATURE_MAPS[opts["feature_map"]], dtype.type(opts["scale"]), normalize,
                     opts["chunk_size"], dq, dk, dv, dg)
    if not has_decay:
        return dq, dk, dv
    if cache["log_decay_ndim"] == 1:
        dg = dg.sum(axis=(0, 2), dtype=np.float64).astype(dtype)
    return dq, dk, dv, dg


# ----------------------------------------------------------------------------------------------
# one decoding step

@njit(parallel=True, cache=True)
def _step_kernel(q_t, k_t, v_t, S, z, g_t, has_decay, feature_map, scale, normalize, out, S_new, z_new):
    B, H, Dk = q_t.shape
    Dv = v_t.shape[2]
    for task in prange(B * H):
        b = task // H
        h = task % H
        decay = math.exp(g_t[b, h]) if has_decay else 1.0
        numer = np.zeros(Dv)
        denom = 0.0
        for f in range(Dk):
            qf = scale * _phi(q_t[b, h, f], feature_map)
            kf = _phi(k_t[b, h, f], feature_map)
            for c in range(Dv):
                s = decay * S[b, h, f, c] + kf * v_t[b, h, c]
                S_new[b, h, f, c] = s
                numer[c] += qf * S_new[b, h, f, c]
            if normalize:
                zf = decay * z[b, h, f] + kf
                z_new[b, h, f] = zf
                denom += qf * z_new[b, h, f]
        for c in range(Dv):
            out[b, h, c] = numer[c] / (denom + EPS) if normalize else numer[c]


def linear_attention_step(q_t, k_t, v_t, state, feature_map="identity", scale=None, normalize=False,
                          log_decay_t=None):
    """One token of the recurrence, for generation:

        S' = exp(g)·S + φ(k_t)ᵀ v_t,   z' = exp(g)·z + φ(k_t),
        out_t = scale·φ(q_t)ᵀ S'   (/ (scale·φ(q_t)·z' + EPS) when normalize)

    q_t, k_t: (B, H, Dk); v_t: (B, H, Dv); state S (B, H, F, Dv), or (S, z) with z (B, H, F) when
    normalize=True; log_decay_t None | (H,) | (B, H). scale None means 1.0.
    Returns (out_t (B, H, Dv), new_state) with new_state in the form of state (fresh arrays).
    Equals minilm.ops.linear_attention.forward(mode="recurrent") on one token.
    Time O(B·H·F·Dv) per token, independent of how many tokens came before.
    """
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map={feature_map!r} has no Numba kernel (supported: {sorted(FEATURE_MAPS)})")
    q_t, k_t, v_t = np.ascontiguousarray(q_t), np.ascontiguousarray(k_t), np.ascontiguousarray(v_t)
    B, H, Dk = q_t.shape
    dtype = q_t.dtype
    if normalize:
        S, z = np.ascontiguousarray(state[0]), np.ascontiguousarray(state[1])
    else:
        S, z = np.ascontiguousarray(state), np.zeros((B, H, 0), dtype=dtype)
    has_decay = log_decay_t is not None
    if not has_decay:
        g_t = np.zeros((B, H), dtype=dtype)
    elif np.ndim(log_decay_t) == 1:
        g_t = np.ascontiguousarray(np.broadcast_to(log_decay_t[None, :], (B, H)), dtype=dtype)
    else:
        g_t = np.ascontiguousarray(log_decay_t, dtype=dtype)
    scale = 1.0 if scale is None else float(scale)
    out = np.empty((B, H, v_t.shape[2]), dtype=dtype)
    S_new = np.empty_like(S)
    z_new = np.empty_like(z)
    _step_kernel(q_t, k_t, v_t, S, z, g_t, has_decay, FEATURE_MAPS[feature_map], dtype.type(scale),
                 bool(normalize), out, S_new, z_new)
    return out, ((S_new, z_new) if normalize else S_new)
