"""Linear attention (plain NumPy reference): causal and non-causal, decay, normalization, feature maps.

Shapes: B batch, H heads, T time, Dk query/key dim, Dv value dim, F feature dim of φ
(F = Dk for "identity", "elu1", "relu"; F = 1 + Dk + Dk² for "taylor2").

    q, k: (B, H, T, Dk)      v: (B, H, T, Dv)      out: (B, H, T, Dv)
    log_decay g: None, (H,) fixed per head (RetNet) or (B, H, T) per token (GLA / Mamba-2 style), g <= 0
    state S: (B, H, F, Dv)   normalizer z: (B, H, F)

Causal recurrence (the current token is included in its own output):

    S_t   = exp(g_t) · S_{t-1} + φ(k_t)ᵀ v_t           S_{-1} = initial_state (zeros by default)
    out_t = scale · φ(q_t)ᵀ S_t

normalize=True divides by the same recurrence run on keys alone:

    z_t   = exp(g_t) · z_{t-1} + φ(k_t)
    out_t = scale · φ(q_t)ᵀ S_t / (scale · φ(q_t) · z_t + EPS)

Non-causal (causal=False), by associativity:  out = scale · φ(Q) (φ(K)ᵀ V)  — the T×T matrix is never formed.

Three causal modes compute the same function (same output, final state and gradients):

    parallel    out = ((Q̃ K̃ᵀ) ⊙ D) V + exp(b) ⊙ (Q̃ S_{-1}),  D_ts = exp(b_t − b_s)·[t ≥ s],  b = cumsum(g)
    recurrent   the recurrence above, one token at a time, carrying the F×Dv state
    chunked     the parallel form inside each chunk of chunk_size tokens, the state carried between chunks

with Q̃ = scale·φ(Q) and K̃ = φ(K). The code works on Q̃, K̃ ("scaled features") throughout.

Two identities keep the code small:
  * z is the state of a value column that is constantly 1, so the normalized op runs the plain op on
    [V | 1] and splits the last column off as the denominator (`_append_ones_column`).
  * the output depends on the decay only through Q̃_t·exp(b_t) and K̃_s·exp(−b_s), so
    ∂L/∂b_t = Q̃_t·dQ̃_t − K̃_t·dK̃_t and ∂L/∂g_r = Σ_{t ≥ r} ∂L/∂b_t (`decay_gradient`). No mode needs to
    keep per-token states for the decay gradient.

Gradients flow into q, k, v and log_decay; not into initial_state and not out of the final state.
"""
import math

import numpy as np

from minilm.ops import _validate
from minilm.ops._backend import kernel_backward, select_kernel

EPS = 1e-6  # added to the normalizer φ(q)·z; it only matters where the denominator underflows
MODES = ("parallel", "recurrent", "chunked")
FEATURE_MAPS = ("identity", "elu1", "relu", "taylor2")


# ----------------------------------------------------------------------------------------------
# feature maps φ: (..., Dk) -> (..., F), and their backward dφ -> dx

def feature_dim(feature_map, Dk):
    """F, the size of φ(x) for an input of size Dk."""
    return 1 + Dk + Dk * Dk if feature_map == "taylor2" else Dk


def taylor2_constants(Dk):
    """(c1, c2) of Based's map φ(x) = [1, x/c1, vec(x⊗x)/c2], chosen so that
    φ(x)·φ(y) = 1 + s + s²/2 with s = x·y/√Dk (2nd-order Taylor expansion of exp(s))."""
    # plain Python floats: a NumPy float64 scalar would promote float32 features to float64
    return math.sqrt(math.sqrt(Dk)), math.sqrt(2.0) * math.sqrt(Dk)


def apply_feature_map(x, feature_map):
    """φ(x) for x (..., Dk); returns (..., F) in x's dtype."""
    if feature_map == "identity":
        return x
    if feature_map == "elu1":
        # elu(x) + 1 = x + 1 for x > 0 and exp(x) otherwise; written branch-wise so the negative side
        # never computes (exp(x) − 1) + 1, which cancels to 0 in low precision.
        return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))
    if feature_map == "relu":
        return np.maximum(x, 0)
    if feature_map == "taylor2":
        Dk = x.shape[-1]
        c1, c2 = taylor2_constants(Dk)
        outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], Dk * Dk)
        ones = np.ones((*x.shape[:-1], 1), dtype=x.dtype)
        return np.concatenate([ones, x / c1, outer / c2], axis=-1)
    raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")


def feature_map_backward(dphi, x, feature_map):
    """dx = (∂φ/∂x)ᵀ dphi for dphi (..., F), x (..., Dk)."""
    if feature_map == "identity":
        return dphi
    if feature_map == "elu1":
        return dphi * np.where(x > 0, 1, np.exp(np.minimum(x, 0)))
    if feature_map == "relu":
        return dphi * (x > 0)
    if feature_map == "taylor2":
        Dk = x.shape[-1]
        c1, c2 = taylor2_constants(Dk)
        d_linear = dphi[..., 1:1 + Dk]
        d_outer = dphi[..., 1 + Dk:].reshape(*x.shape[:-1], Dk, Dk)
        # φ_ij = x_i x_j / c2  ->  ∂/∂x_m = (Σ_j d_mj x_j + Σ_i d_im x_i) / c2
        d_quadratic = (np.einsum("...mj,...j->...m", d_outer, x) + np.einsum("...im,...i->...m", d_outer, x)) / c2
        return d_linear / c1 + d_quadratic
    raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")


# ----------------------------------------------------------------------------------------------
# decay

def log_decay_per_step(log_decay, B, H, T, dtype):
    """g (B, H, T) from log_decay None (zeros: no decay), (H,) or (B, H, T)."""
    if log_decay is None:
        return np.zeros((B, H, T), dtype=dtype)
    if log_decay.ndim == 1:
        return np.broadcast_to(log_decay[None, :, None], (B, H, T))
    return log_decay


def decay_mask(b):
    """D (..., T, T) with D_ts = exp(b_t − b_s) for t >= s and 0 above the diagonal.

    b (..., T) is a cumulative log-decay (non-increasing), so every exponent used is <= 0; the upper
    triangle, where b_t − b_s would be positive, is replaced by −inf before exp instead of masked after.
    """
    T = b.shape[-1]
    lower = np.tril(np.ones((T, T), dtype=bool))
    exponent = np.where(lower, b[..., :, None] - b[..., None, :], -np.inf)
    return np.exp(exponent)


def decay_gradient(qs, dqs, kf, dkf):
    """∂L/∂g (B, H, T) from the scaled features and their gradients.

    The output depends on b = cumsum(g) only through Q̃_t·exp(b_t) and K̃_s·exp(−b_s) (the incoming
    state acts as a key at b = 0), hence ∂L/∂b_t = Q̃_t·dQ̃_t − K̃_t·dK̃_t, and g_r enters every b_t
    with t >= r: ∂L/∂g_r = Σ_{t>=r} ∂L/∂b_t (a reverse cumulative sum over time).
    """
    db = np.sum(qs * dqs, axis=-1) - np.sum(kf * dkf, axis=-1)
    return np.flip(np.cumsum(np.flip(db, axis=-1), axis=-1), axis=-1)


# ----------------------------------------------------------------------------------------------
# causal core on scaled features. qs = Q̃ (B,H,T,F), kf = K̃ (B,H,T,F), v (B,H,T,M), g (B,H,T),
# S_in (B,H,F,M). M is Dv, or Dv + 1 when the normalizer rides along as a column of ones.

def block_forward(qs, kf, v, g, S_in):
    """One block of consecutive tokens that starts from state S_in.

        b_t   = Σ_{r<=t} g_r                       (cumulative log-decay from the block start, <= 0)
        out_t = exp(b_t)·Q̃_t S_in + Σ_{s<=t} exp(b_t − b_s)(Q̃_t·K̃_s) v_s
        S_out = exp(b_last)·S_in + Σ_s exp(b_last − b_s) K̃_sᵀ v_s

    Returns out (B,H,T,M), S_out (B,H,F,M). Time O(T²(F+M) + TFM), memory O(T² + FM) per (b, h).
    """
    b = np.cumsum(g, axis=-1)
    scores = (qs @ kf.swapaxes(-1, -2)) * decay_mask(b)                       # (B,H,T,T)
    from_state = np.exp(b)[..., None] * (qs @ S_in)                           # inter-block part
    out = scores @ v + from_state
    to_end = np.exp(b[..., -1:] - b)                                          # decay from s to the block end
    S_out = np.exp(b[..., -1])[..., None, None] * S_in + (kf * to_end[..., None]).swapaxes(-1, -2) @ v
    return out, S_out


def block_backward(dout, dS_out, qs, kf, v, g, S_in):
    """Backward of block_forward: (dQ̃, dK̃, dv, dS_in) from dout (B,H,T,M) and dS_out (B,H,F,M) or None."""
    b = np.cumsum(g, axis=-1)
    D = decay_mask(b)
    from_start = np.exp(b)                                                    # S_in -> token t
    scores = (qs @ kf.swapaxes(-1, -2)) * D
    d_scores = (dout @ v.swapaxes(-1, -2)) * D                                # ∂L/∂(Q̃K̃ᵀ), masked
    dqs = d_scores @ kf + from_start[..., None] * (dout @ S_in.swapaxes(-1, -2))
    dkf = d_scores.swapaxes(-1, -2) @ qs
    dv = scores.swapaxes(-1, -2) @ dout
    dS_in = (qs * from_start[..., None]).swapaxes(-1, -2) @ dout
    if dS_out is not None:
        to_end = np.exp(b[..., -1:] - b)[..., None]                           # token s -> S_out
        dkf = dkf + to_end * (v @ dS_out.swapaxes(-1, -2))
        dv = dv + to_end * (kf @ dS_out)
        dS_in = dS_in + np.exp(b[..., -1])[..., None, None] * dS_out
    return dqs, dkf, dv, dS_in


def parallel_forward(qs, kf, v, g, S_in):
    """Masked O(T²) form over the whole sequence: one block of length T. Returns out, final state."""
    return block_forward(qs, kf, v, g, S_in)


def parallel_backward(dout, qs, kf, v, g, S_in):
    """Backward of parallel_forward: the T×T masked products transposed. Returns dQ̃, dK̃, dv."""
    dqs, dkf, dv, _ = block_backward(dout, None, qs, kf, v, g, S_in)
    return dqs, dkf, dv


def recurrent_forward(qs, kf, v, g, S_in):
    """Token by token: S_t = exp(g_t) S_{t-1} + K̃_tᵀ v_t, out_t = Q̃_t S_t. Returns out, final state.

    Time O(T·F·M), memory O(F·M) per (b, h) besides the output.
    """
    T = qs.shape[2]
    out = np.empty(v.shape, dtype=v.dtype)
    S = S_in
    for t in range(T):
        S = np.exp(g[:, :, t])[..., None, None] * S + kf[:, :, t, :, None] * v[:, :, t, None, :]
        out[:, :, t] = np.einsum("bhf,bhfm->bhm", qs[:, :, t], S)
    return out, S


def recurrent_backward(dout, qs, kf, v, g, S_in):
    """Backward of recurrent_forward in two sweeps, each O(F·M) memory:

        forward sweep (recomputes S_t):     dQ̃_t = S_t dout_t
        reverse sweep, R_t = ∂L/∂S_t:       R_t  = exp(g_{t+1}) R_{t+1} + Q̃_tᵀ dout_t
                                            dK̃_t = R_t v_t,   dv_t = R_tᵀ K̃_t
    """
    T = qs.shape[2]
    dqs, dkf, dv = np.empty_like(qs), np.empty_like(kf), np.empty_like(v)
    S = S_in
    for t in range(T):
        S = np.exp(g[:, :, t])[..., None, None] * S + kf[:, :, t, :, None] * v[:, :, t, None, :]
        dqs[:, :, t] = np.einsum("bhfm,bhm->bhf", S, dout[:, :, t])
    R = np.zeros_like(S_in)
    for t in reversed(range(T)):
        if t + 1 < T:
            R = np.exp(g[:, :, t + 1])[..., None, None] * R    # the decay of the *next* step carries R back
        R = R + qs[:, :, t, :, None] * dout[:, :, t, None, :]
        dkf[:, :, t] = np.einsum("bhfm,bhm->bhf", R, v[:, :, t])
        dv[:, :, t] = np.einsum("bhfm,bhf->bhm", R, kf[:, :, t])
    return dqs, dkf, dv


def chunk_slices(T, chunk_size):
    """Consecutive slices of at most chunk_size tokens covering 0..T-1 (the last one may be shorter)."""
    return [slice(start, min(start + chunk_size, T)) for start in range(0, T, chunk_size)]


def chunked_forward(qs, kf, v, g, S_in, chunk_size):
    """Chunk by chunk: block_forward inside each chunk (cumulative log-decays restart at every chunk,
    so no exponent is positive), the state passed from chunk to chunk.

    Returns out, final state and the states entering each chunk (B,H,n_chunks,F,M), which are all the
    backward keeps. Time O(T·C·(F+M) + T·F·M), memory O(C² + F·M) per (b, h) with C = chunk_size.
    """
    slices = chunk_slices(qs.shape[2], chunk_size)
    out = np.empty(v.shape, dtype=v.dtype)
    chunk_states = np.empty((*S_in.shape[:2], len(slices), *S_in.shape[2:]), dtype=S_in.dtype)
    S = S_in
    for i, sl in enumerate(slices):
        chunk_states[:, :, i] = S
        out[:, :, sl], S = block_forward(qs[:, :, sl], kf[:, :, sl], v[:, :, sl], g[:, :, sl], S)
    return out, S, chunk_states


def chunked_backward(dout, qs, kf, v, g, chunk_states, chunk_size):
    """Backward of chunked_forward: chunks in reverse order, each recomputed from its stored incoming
    state; dS carries ∂L/∂(state leaving the chunk) back to the previous chunk."""
    slices = chunk_slices(qs.shape[2], chunk_size)
    dqs, dkf, dv = np.empty_like(qs), np.empty_like(kf), np.empty_like(v)
    dS = None  # no gradient flows out of the final state
    for i in reversed(range(len(slices))):
        sl = slices[i]
        dqs[:, :, sl], dkf[:, :, sl], dv[:, :, sl], dS = block_backward(
            dout[:, :, sl], dS, qs[:, :, sl], kf[:, :, sl], v[:, :, sl], g[:, :, sl], chunk_states[:, :, i])
    return dqs, dkf, dv


# ----------------------------------------------------------------------------------------------
# non-causal core

def noncausal_forward(qs, kf, v):
    """out = Q̃ (K̃ᵀ V): associativity, O(T·F·M) time and O(F·M) extra memory."""
    return qs @ (kf.swapaxes(-1, -2) @ v)


def noncausal_backward(dout, qs, kf, v):
    """Backward of noncausal_forward through the F×M product KV = K̃ᵀV. Returns dQ̃, dK̃, dv."""
    kv = kf.swapaxes(-1, -2) @ v
    dqs = dout @ kv.swapaxes(-1, -2)
    dkv = qs.swapaxes(-1, -2) @ dout
    return dqs, v @ dkv.swapaxes(-1, -2), kf @ dkv


# ----------------------------------------------------------------------------------------------
# normalization: the normalizer z is the state of an all-ones value column

def _append_ones_column(v):
    return np.concatenate([v, np.ones((*v.shape[:-1], 1), dtype=v.dtype)], axis=-1)


def normalize_forward(out_with_ones):
    """Split [numerator | Q̃·z] (…, Dv+1) into out = numerator / (Q̃·z + EPS) and the denominator (…,)."""
    denominator = out_with_ones[..., -1] + EPS
    return out_with_ones[..., :-1] / denominator[..., None], denominator


def normalize_backward(dout, out, denominator):
    """Gradient w.r.t. [numerator | Q̃·z]: dnum = dout/den, dden = −(dout·out)/den."""
    d_numerator = dout / denominator[..., None]
    d_denominator = -np.sum(dout * out, axis=-1) / denominator
    return np.concatenate([d_numerator, d_denominator[..., None]], axis=-1)


# ----------------------------------------------------------------------------------------------
# validation

def _check_arguments(q, k, v, causal, mode, chunk_size, feature_map, scale, normalize, log_decay,
                     initial_state, return_state, backend):
    """Check every argument before any computation; return the cleaned options."""
    q = _validate.as_float_array("q", q, 4)
    k = _validate.as_float_array("k", k, 4)
    v = _validate.as_float_array("v", v, 4)
    _validate.check_same_dtype([("q", q), ("k", k), ("v", v)])
    B, H, T, Dk = q.shape
    _validate.check_nonempty_time("q", T)
    for name, size in (("B", B), ("H", H), ("Dk", Dk)):
        if size == 0:
            raise ValueError(f"q must have a nonzero {name} dimension, got shape {q.shape}")
    _validate.check_shape("k", k, (B, H, T, Dk))
    _validate.check_shape("v", v, (B, H, T, None))
    if v.shape[3] == 0:
        raise ValueError(f"v must have a nonzero Dv dimension, got shape {v.shape}")
    Dv = v.shape[3]

    causal = _validate.check_bool("causal", causal)
    mode = _validate.check_choice("mode", mode, MODES)
    chunk_size = _validate.check_positive_int("chunk_size", chunk_size)
    feature_map = _validate.check_choice("feature_map", feature_map, FEATURE_MAPS)
    scale = _validate.check_scale("scale", scale, 1.0)
    normalize = _validate.check_bool("normalize", normalize)
    return_state = _validate.check_bool("return_state", return_state)
    F = feature_dim(feature_map, Dk)

    if not causal:
        for name, value in (("log_decay", log_decay), ("initial_state", initial_state)):
            if value is not None:
                raise ValueError(f"{name} must be None when causal=False (a non-causal sum has no order), "
                                 f"got {type(value).__name__}")
        if return_state:
            raise ValueError("return_state must be False when causal=False (a non-causal sum has no final state)")

    if log_decay is not None:
        log_decay = _validate.as_float_array("log_decay", log_decay)
        if log_decay.shape not in ((H,), (B, H, T)):
            raise ValueError(f"log_decay must have shape (H,) = ({H},) or (B, H, T) = {(B, H, T)}, "
                             f"got {log_decay.shape}")
        _validate.check_same_dtype([("q", q), ("log_decay", log_decay)])
        if np.any(log_decay > 0):
            raise ValueError(f"log_decay must be <= 0 (the log of a decay factor in (0, 1]), "
                             f"got a maximum of {float(np.max(log_decay))}")

    if initial_state is not None:
        if normalize:
            if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
                raise TypeError(f"initial_state must be a tuple (S, z) with S {(B, H, F, Dv)} and z {(B, H, F)} "
                                f"when normalize=True, got {type(initial_state).__name__}")
            S0 = _validate.as_float_array("initial_state[0]", initial_state[0], 4)
            z0 = _validate.as_float_array("initial_state[1]", initial_state[1], 3)
            _validate.check_shape("initial_state[0]", S0, (B, H, F, Dv))
            _validate.check_shape("initial_state[1]", z0, (B, H, F))
            _validate.check_same_dtype([("q", q), ("initial_state[0]", S0), ("initial_state[1]", z0)])
            initial_state = (S0, z0)
        else:
            if isinstance(initial_state, (tuple, list)):
                raise TypeError(f"initial_state must be an ndarray S of shape {(B, H, F, Dv)} when normalize=False "
                                f"(the (S, z) tuple is the normalized state), got {type(initial_state).__name__}")
            initial_state = _validate.as_float_array("initial_state", initial_state, 4)
            _validate.check_shape("initial_state", initial_state, (B, H, F, Dv))
            _validate.check_same_dtype([("q", q), ("initial_state", initial_state)])

    kernel = select_kernel(backend, "linear_attention", mode=mode, causal=causal, feature_map=feature_map,
                           normalize=normalize)
    return dict(causal=causal, mode=mode, chunk_size=chunk_size, feature_map=feature_map, scale=scale,
                normalize=normalize, return_state=return_state, log_decay=log_decay, initial_state=initial_state,
                kernel=kernel)


def _core_initial_state(initial_state, normalize, B, H, F, Dv, dtype):
    """The state the core recurrences carry: S (B,H,F,Dv), or [S | z] (B,H,F,Dv+1) when normalized."""
    M = Dv + 1 if normalize else Dv
    if initial_state is None:
        return np.zeros((B, H, F, M), dtype=dtype)
    if normalize:
        S0, z0 = initial_state
        return np.concatenate([S0, z0[..., None]], axis=-1)
    return initial_state


# ----------------------------------------------------------------------------------------------
# public API

def forward(q, k, v, causal=True, mode="chunked", chunk_size=64, feature_map="identity", scale=None,
            normalize=False, log_decay=None, initial_state=None, return_state=False, backend="auto"):
    """Linear attention out_t = scale·φ(q_t)ᵀ S_t (see the module docstring for every equation).

    q, k: (B, H, T, Dk); v: (B, H, T, Dv). Returns (out, cache) with out (B, H, T, Dv) in the input
    dtype, or ((out, final_state), cache) when return_state=True. The state is S (B, H, F, Dv), or the
    tuple (S, z) with z (B, H, F) when normalize=True; initial_state takes the same form and continues
    a sequence. causal=False ignores mode and rejects log_decay, initial_state and return_state.
    """
    opts = _check_arguments(q, k, v, causal, mode, chunk_size, feature_map, scale, normalize, log_decay,
                            initial_state, return_state, backend)
    kernel = opts.pop("kernel")
    if kernel is not None:   # backend "numba" / "cuda" (or "auto" choosing numba): same values, faster
        return kernel.forward(q, k, v, **{key: opts[key] for key in opts if key != "mode"})
    B, H, T, Dk = q.shape
    Dv = v.shape[3]
    F = feature_dim(opts["feature_map"], Dk)
    qs = opts["scale"] * apply_feature_map(q, opts["feature_map"])
    kf = apply_feature_map(k, opts["feature_map"])
    v_core = _append_ones_column(v) if opts["normalize"] else v

    S_in = chunk_states = final_core = None
    if not opts["causal"]:
        out_core = noncausal_forward(qs, kf, v_core)
    else:
        g = log_decay_per_step(opts["log_decay"], B, H, T, q.dtype)
        S_in = _core_initial_state(opts["initial_state"], opts["normalize"], B, H, F, Dv, q.dtype)
        if opts["mode"] == "parallel":
            out_core, final_core = parallel_forward(qs, kf, v_core, g, S_in)
        elif opts["mode"] == "recurrent":
            out_core, final_core = recurrent_forward(qs, kf, v_core, g, S_in)
        else:
            out_core, final_core, chunk_states = chunked_forward(qs, kf, v_core, g, S_in, opts["chunk_size"])

    denominator = None
    if opts["normalize"]:
        out, denominator = normalize_forward(out_core)
    else:
        out = out_core

    cache = {
        "q": q, "k": k, "v": v,
        "log_decay": opts["log_decay"],
        "core_initial_state": S_in if opts["mode"] != "chunked" else None,  # chunked keeps it in chunk_states
        "chunk_states": chunk_states,          # (B,H,n_chunks,F,M): state entering each chunk (chunked only)
        "out": out if opts["normalize"] else None,
        "denominator": denominator,            # (B,H,T) = scale·φ(q)·z + EPS (normalize only)
        "options": {key: opts[key] for key in ("causal", "mode", "chunk_size", "feature_map", "scale", "normalize")},
    }
    if opts["return_state"]:
        final_state = (final_core[..., :Dv], final_core[..., Dv]) if opts["normalize"] else final_core
        return (out, final_state), cache
    return out, cache


def backward(dout, cache):
    """Gradients of forward: (dq, dk, dv), or (dq, dk, dv, dlog_decay) when log_decay was given.

    dout: (B, H, T, Dv), same dtype as the inputs. dlog_decay has the shape log_decay had ((H,) sums over
    batch and time). Each mode runs its own backward; none stores per-token states.
    """
    q, k, v = cache["q"], cache["k"], cache["v"]
    dout = _validate.as_float_array("dout", dout, 4)
    _validate.check_shape("dout", dout, v.shape)
    _validate.check_same_dtype([("q", q), ("dout", dout)])
    if "backend" in cache:
        return kernel_backward(dout, cache, "linear_attention")
    opts = cache["options"]
    B, H, T, _ = q.shape
    Dv = v.shape[3]

    qs = opts["scale"] * apply_feature_map(q, opts["feature_map"])
    kf = apply_feature_map(k, opts["feature_map"])
    if opts["normalize"]:
        v_core = _append_ones_column(v)
        dout_core = normalize_backward(dout, cache["out"], cache["denominator"])
    else:
        v_core, dout_core = v, dout

    if not opts["causal"]:
        dqs, dkf, dv_core = noncausal_backward(dout_core, qs, kf, v_core)
    else:
        g = log_decay_per_step(cache["log_decay"], B, H, T, q.dtype)
        if opts["mode"] == "parallel":
            dqs, dkf, dv_core = parallel_backward(dout_core, qs, kf, v_core, g, cache["core_initial_state"])
        elif opts["mode"] == "recurrent":
            dqs, dkf, dv_core = recurrent_backward(dout_core, qs, kf, v_core, g, cache["core_initial_state"])
        else:
            dqs, dkf, dv_core = chunked_backward(dout_core, qs, kf, v_core, g, cache["chunk_states"],
                                                 opts["chunk_size"])

    dq = feature_map_backward(opts["scale"] * dqs, q, opts["feature_map"])
    dk = feature_map_backward(dkf, k, opts["feature_map"])
    dv = dv_core[..., :Dv]
    if cache["log_decay"] is None:
        return dq, dk, dv
    dg = decay_gradient(qs, dqs, kf, dkf)
    if cache["log_decay"].ndim == 1:
        dg = dg.sum(axis=(0, 2))
    return dq, dk, dv, dg
