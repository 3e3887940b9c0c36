"""Selective scan, the token mixer of Mamba: plain NumPy reference with a hand-written backward.

Shapes (one legend for the whole module): B batch, T time, D channels, N state size.

    u, delta, z      (B, T, D)     input, raw step size, optional gate
    A                (D, N)        state matrix (diagonal per channel; negative in practice)
    Bm, Cm           (B, T, N)     input and output projections, shared by all D channels
    D, delta_bias    (D,)          skip connection, step-size bias
    h                (B, D, N)     state

Equations, for every batch b, channel d and state index n (the function that computes each one):

    x_t   = delta_t + delta_bias                                       forward
    Δ_t   = softplus(x_t) if delta_softplus else x_t                   softplus
    a_t   = exp(Δ_t A)              decay: zero-order hold for A       _decay
    b_t   = Δ_t u_t B_t             input: Euler step for B            _input_term
    h_t   = a_t h_{t-1} + b_t       h_0 = initial_state, or 0          _recurrent_states / _scan_states
    y_t   = Σ_n C_t h_t + D u_t                                        _readout, forward
    out_t = y_t · SiLU(z_t)         only when z is given               _gate

The discretization (ZOH for A, Euler for B) is the one Mamba's reference uses; `discretize` returns
both it and full ZOH for B.

Modes (all give the same out, final state and gradients):
    "recurrent"  a loop over t, one state update per step.
    "parallel"   an inclusive associative scan over time with the operator
                 (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2)   (_combine, _associative_scan)
                 in ceil(log2 T) vectorized Hillis-Steele rounds; materializes (B, T, D, N).
    "chunked"    the sequence is cut into chunks of chunk_size steps; each chunk is scanned as in
                 "parallel", seeded with the state carried out of the previous chunk. The cache
                 keeps only the state entering each chunk, (B, n_chunks, D, N); the backward
                 rebuilds each chunk's states from it.

Backward: with dy_t = dL/dy_t, the adjoint g_t = dL/dh_t follows the same scan run backwards,

    g_t = C_t dy_t + a_{t+1} g_{t+1},     a_{t+1} g_{t+1} := 0 past the last step,

(_recurrent_adjoints / _scan_adjoints), and every input gradient is read off g_t and h_t
(_segment_grads), using a_t h_{t-1} = h_t - b_t so that h_{t-1} is never stored and no cumulative
product is ever divided by. Gradients do not flow into initial_state, nor out of the returned
final state.
"""
import numpy as np

from minilm.ops._backend import kernel_backward, select_kernel
from minilm.ops._validate import (as_float_array, check_bool, check_choice, check_nonempty_time,
                                  check_positive_int, check_same_dtype, check_shape)

MODES = ("recurrent", "parallel", "chunked")
DISCRETIZATIONS = ("zoh", "euler")

# Above this, softplus(x) equals x to within float64 rounding (log1p(e^-20) ~ 2e-9 relative to 20),
# and exp(x) could start to overflow in float32 further up: the CUDA kernel uses the same cut.
SOFTPLUS_THRESHOLD = 20.0


# ----------------------------------------------------------------------------------------------
# Elementwise helpers

def softplus(x):
    """softplus(x) = log(1 + e^x), computed as log1p(exp(x)) for x <= 20 and as x above.

    exp only ever sees min(x, 20), so there is no overflow (and no warning) for large x; for very
    negative x exp underflows quietly to 0 and the result is 0, the correct rounding.
    """
    x = np.asarray(x)
    capped = np.minimum(x, SOFTPLUS_THRESHOLD)
    return np.where(x > SOFTPLUS_THRESHOLD, x, np.log1p(np.exp(capped)))


def _sigmoid(x):
    """σ(x) = 1 / (1 + e^-x) without overflow: exp only sees -|x| <= 0."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _softplus_grad(x):
    """d softplus / dx: σ(x) where softplus is log1p(exp(x)), 1 where it is the identity (x > 20)."""
    return np.where(x > SOFTPLUS_THRESHOLD, 1.0, _sigmoid(x))


def _gate(y, z):
    """out = y · SiLU(z) = y · z σ(z)."""
    return y * z * _sigmoid(z)


def _gate_backward(dout, y, z):
    """Gradients of out = y z σ(z):  dy = dout · z σ(z),  dz = dout · y · σ(z) (1 + z (1 - σ(z)))."""
    s = _sigmoid(z)
    dy = dout * z * s
    dz = dout * y * s * (1.0 + z * (1.0 - s))
    return dy, dz


# ----------------------------------------------------------------------------------------------
# Discretization: from the continuous h' = A h + B u to the step h_t = Ā h_{t-1} + B̄ u_t

def _decay(delta, A):
    """a = exp(Δ A): ZOH discretization of A.  delta (..., D), A (D, N) -> (..., D, N)."""
    return np.exp(delta[..., None] * A)


def _input_term(delta, u, Bm):
    """b = Δ u B: Euler discretization of B, times the input.  delta, u (..., D), Bm (..., N) -> (..., D, N)."""
    return (delta * u)[..., None] * Bm[..., None, :]


def discretize(A, delta, method="zoh"):
    """Discretize the diagonal system h' = A h + B u over steps of length Δ.

    A: (D, N); delta: (B, T, D) (the step Δ, already through bias and softplus).
    Returns (A_bar, B_factor), each (B, T, D, N), such that h_t = A_bar h_{t-1} + B_factor B u_t:

        A_bar    = exp(Δ A)                       (both methods)
        B_factor = (exp(Δ A) - 1) / A             method="zoh"   (the limit Δ where A = 0)
        B_factor = Δ                              method="euler" (first order in Δ of the above)

    method="euler" is Mamba's mixed scheme: exact (ZOH) decay for A, a first-order step for B.
    It is what `forward` uses; ZOH differs from it by Δ²A/2 + O(Δ³).
    """
    A = as_float_array("A", A, 2)
    delta = as_float_array("delta", delta, 3)
    check_same_dtype([("A", A), ("delta", delta)])
    check_shape("delta", delta, (None, None, A.shape[0]))
    check_choice("method", method, DISCRETIZATIONS)

    step_A = delta[..., None] * A
    A_bar = np.exp(step_A)
    if method == "euler":
        B_factor = np.broadcast_to(delta[..., None], step_A.shape).copy()
    else:
        # expm1 keeps the digits of exp(ΔA) - 1 when ΔA is small; A = 0 takes the limit Δ.
        nonzero_A = np.where(A == 0, 1.0, A)
        B_factor = np.where(A == 0, delta[..., None], np.expm1(step_A) / nonzero_A)
    return A_bar, B_factor.astype(A.dtype, copy=False)


# ----------------------------------------------------------------------------------------------
# The scan h_t = a_t h_{t-1} + b_t, three ways

def _readout(h, Cm):
    """y = Σ_n C h.  h (..., D, N), Cm (..., N) -> (..., D).  (einsum: no (..., D, N) temporary)"""
    return np.einsum("...dn,...n->...d", h, Cm)


def _touched_empty(shape, dtype):
    """An array to be filled one time step at a time, with every memory page written once first.

    A fresh large array gets its pages from the OS on first write. Taken one step at a time, between
    the loop's small allocations, those page faults made the loops below three times slower at
    T = 8192, D = 256, N = 16 (0.55 s instead of 0.19 s; one bulk fill costs 0.02 s)."""
    array = np.empty(shape, dtype=dtype)
    array.fill(0)
    return array


def _recurrent_states(delta, A, u, Bm, h0):
    """All states by the plain loop h_t = a_t h_{t-1} + b_t.

    delta, u: (B, T, D); A: (D, N); Bm: (B, T, N); h0: (B, D, N). Returns states (B, T, D, N).
    """
    batch, T, channels = u.shape
    states = _touched_empty((batch, T, channels, A.shape[1]), u.dtype)
    h = h0
    for t in range(T):
        h = _decay(delta[:, t], A) * h + _input_term(delta[:, t], u[:, t], Bm[:, t])
        states[:, t] = h
    return states


def _combine(a1, b1, a2, b2):
    """(a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2).

    A pair (a, b) is the affine step h -> a h + b; ∘ applies the left step first, then the right
    one. Composition of maps is associative (not commutative), with identity (1, 0).
    """
    return a1 * a2, a2 * b1 + b2


def _shift_in_identity(x, offset, identity):
    """x[:, t - offset] along time (axis 1), with the identity element where t - offset < 0."""
    shifted = np.full_like(x, identity)
    shifted[:, offset:] = x[:, :-offset]
    return shifted


def _associative_scan(a, b):
    """Inclusive scan over time (axis 1) with _combine, Hillis-Steele style.

    a, b: (B, L, D, N). Round k combines every element with the one 2^k steps earlier (the
    identity (1, 0) where there is none), so after ceil(log2 L) rounds element t holds
    e_1 ∘ ... ∘ e_t = (a_1 ··· a_t, h_t with h_0 = 0). Any L works: nothing needs a power of two.
    Work O(L log L), depth O(log L); each round is one vectorized step over (B, L, D, N).
    """
    offset = 1
    while offset < a.shape[1]:
        a_prev = _shift_in_identity(a, offset, 1.0)
        b_prev = _shift_in_identity(b, offset, 0.0)
        a, b = _combine(a_prev, b_prev, a, b)
        offset *= 2
    return a, b


def _scan_states(delta, A, u, Bm, h_in):
    """States of a stretch of L steps by the associative scan, starting from the state h_in.

    delta, u: (B, L, D); A: (D, N); Bm: (B, L, N); h_in: (B, D, N). Returns (B, L, D, N).
    The carried state is folded into the first element, (a_1, a_1 h_in + b_1), which is
    (1, h_in) ∘ (a_1, b_1): the carry comes first because ∘ is not commutative.
    """
    a = _decay(delta, A)
    b = _input_term(delta, u, Bm)
    b[:, 0] += a[:, 0] * h_in
    _, states = _associative_scan(a, b)
    return states


def _chunk_bounds(T, chunk_size):
    """[(start, stop), ...] covering 0..T in chunks of chunk_size steps; the last may be shorter."""
    return [(start, min(start + chunk_size, T)) for start in range(0, T, chunk_size)]


def _chunked_forward(delta, A, u, Bm, Cm, h0, chunk_size):
    """Two-level scan: associative scan inside each chunk, the state carried across chunks in order.

    Returns y_scan (B, T, D) = Σ_n C_t h_t, carries (B, n_chunks, D, N) = the state entering each
    chunk (all the backward keeps), and the final state (B, D, N). Never holds more than one
    chunk's states, (B, chunk_size, D, N), at a time.
    """
    batch, T, channels = u.shape
    bounds = _chunk_bounds(T, chunk_size)
    carries = np.empty((batch, len(bounds), channels, A.shape[1]), dtype=u.dtype)
    y_scan = np.empty((batch, T, channels), dtype=u.dtype)
    h = h0
    for c, (start, stop) in enumerate(bounds):
        carries[:, c] = h
        span = slice(start, stop)
        states = _scan_states(delta[:, span], A, u[:, span], Bm[:, span], h)
        y_scan[:, span] = _readout(states, Cm[:, span])
        h = states[:, -1]
    return y_scan, carries, h


# ----------------------------------------------------------------------------------------------
# Backward: the adjoint g_t = dL/dh_t, then every gradient from (g_t, h_t)

def _recurrent_adjoints(delta, A, Cm, dy):
    """g_t = C_t dy_t + a_{t+1} g_{t+1} by a loop from the last step back to the first.

    delta, dy: (B, T, D); A: (D, N); Cm: (B, T, N). Returns g (B, T, D, N).
    """
    batch, T, channels = dy.shape
    adjoints = _touched_empty((batch, T, channels, A.shape[1]), dy.dtype)
    from_later = np.zeros((batch, channels, A.shape[1]), dtype=dy.dtype)   # a_{t+1} g_{t+1}
    for t in reversed(range(T)):
        g = Cm[:, t, None, :] * dy[:, t, :, None] + from_later
        adjoints[:, t] = g
        from_later = _decay(delta[:, t], A) * g
    return adjoints


def _scan_adjoints(delta, A, Cm, dy, from_later):
    """g_t = C_t dy_t + a_{t+1} g_{t+1} over a stretch of L steps, by the associative scan reversed.

    from_later (B, D, N) is a_{t+1} g_{t+1} for the step just after the stretch (zeros at the end
    of the sequence); it enters the last step, so inside the stretch the shifted decay of the
    last step is the identity 1. Reversing time turns the recurrence into the forward form
    h_s = a_s h_{s-1} + b_s with a_s = a_{t+1}, b_s = C_t dy_t.
    Returns g (B, L, D, N) and a_1 g_1 of this stretch, to carry into the stretch before it.
    """
    a = _decay(delta, A)
    shifted_decay = np.empty_like(a)
    shifted_decay[:, :-1] = a[:, 1:]
    shifted_decay[:, -1] = 1.0
    local = Cm[:, :, None, :] * dy[:, :, :, None]
    local[:, -1] += from_later
    _, reversed_adjoints = _associative_scan(shifted_decay[:, ::-1], local[:, ::-1])
    adjoints = reversed_adjoints[:, ::-1]
    return adjoints, a[:, 0] * adjoints[:, 0]


def _segment_grads(adjoints, states, delta, A, u, Bm, dy):
    """Input gradients on a stretch of L steps from g_t (adjoints) and h_t (states), both (B, L, D, N).

        a_t h_{t-1} = h_t - b_t                                  (h_{t-1} is never stored)
        du_t   = Δ_t Σ_n g_t B_t                                  (the D u_t part is added by backward)
        dΔ_t   = u_t Σ_n g_t B_t + Σ_n g_t A (a_t h_{t-1})
        dA     = Σ_{b,t} g_t Δ_t (a_t h_{t-1})
        dB_t   = Σ_d g_t Δ_t u_t            dC_t = Σ_d dy_t h_t   (B and C are shared by channels)

    delta, u, dy: (B, L, D); Bm: (B, L, N). dA is summed in float64 (it adds up B·L terms).
    """
    decayed_previous = states - _input_term(delta, u, Bm)
    g_dot_B = np.sum(adjoints * Bm[:, :, None, :], axis=-1)
    g_times_decayed = adjoints * decayed_previous
    du = g_dot_B * delta
    d_step = g_dot_B * u + np.sum(g_times_decayed * A, axis=-1)
    dA = np.einsum("bldn,bld->dn", g_times_decayed, delta, dtype=np.float64)
    dBm = np.einsum("bldn,bld->bln", adjoints, delta * u)
    dCm = np.einsum("bldn,bld->bln", states, dy)
    return du, d_step, dA, dBm, dCm


GRAD_BLOCK = 256     # time steps per block of _blockwise_segment_grads


def _blockwise_segment_grads(adjoints, states, delta, A, u, Bm, dy):
    """_segment_grads over the whole sequence, GRAD_BLOCK time steps at a time: the same sums, with
    (B, block, D, N) temporaries instead of (B, T, D, N) ones (at T = 8192, D = 256, N = 16 the
    whole-sequence temporaries made the backward 3x slower per step than at T = 1024)."""
    block = GRAD_BLOCK
    du, d_step = np.empty_like(u), np.empty_like(u)
    dBm, dCm = np.empty_like(Bm), np.empty_like(Bm)
    dA = np.zeros(A.shape, dtype=np.float64)
    for start in range(0, u.shape[1], block):
        span = slice(start, start + block)
        du[:, span], d_step[:, span], dA_block, dBm[:, span], dCm[:, span] = _segment_grads(
            adjoints[:, span], states[:, span], delta[:, span], A, u[:, span], Bm[:, span], dy[:, span])
        dA += dA_block
    return du, d_step, dA, dBm, dCm


def _chunked_scan_backward(dy, delta, A, u, Bm, Cm, carries, chunk_size):
    """Chunks from last to first: rebuild the chunk's states from its stored carry, scan its
    adjoints backwards seeded with a_{t+1} g_{t+1} from the chunk after it, read off gradients."""
    batch, T, channels = u.shape
    du = np.empty_like(u)
    d_step = np.empty_like(u)
    dBm = np.empty_like(Bm)
    dCm = np.empty_like(Cm)
    dA = np.zeros(A.shape, dtype=np.float64)
    from_later = np.zeros((batch, channels, A.shape[1]), dtype=u.dtype)
    for c, (start, stop) in reversed(list(enumerate(_chunk_bounds(T, chunk_size)))):
        span = slice(start, stop)
        states = _scan_states(delta[:, span], A, u[:, span], Bm[:, span], carries[:, c])
        adjoints, from_later = _scan_adjoints(delta[:, span], A, Cm[:, span], dy[:, span], from_later)
        du[:, span], d_step[:, span], dA_chunk, dBm[:, span], dCm[:, span] = _segment_grads(
            adjoints, states, delta[:, span], A, u[:, span], Bm[:, span], dy[:, span])
        dA += dA_chunk
    return du, d_step, dA, dBm, dCm


# ----------------------------------------------------------------------------------------------
# Public forward / backward

def _validate_inputs(u, delta, A, Bm, Cm, D, z, delta_bias, initial_state):
    """Type, rank, finiteness, shared dtype and matching sizes of every array argument."""
    u = as_float_array("u", u, 3)
    delta = as_float_array("delta", delta, 3)
    A = as_float_array("A", A, 2)
    Bm = as_float_array("Bm", Bm, 3)
    Cm = as_float_array("Cm", Cm, 3)
    D = None if D is None else as_float_array("D", D, 1)
    z = None if z is None else as_float_array("z", z, 3)
    delta_bias = None if delta_bias is None else as_float_array("delta_bias", delta_bias, 1)
    if initial_state is not None:
        initial_state = as_float_array("initial_state", initial_state, 3)
    check_same_dtype([("u", u), ("delta", delta), ("A", A), ("Bm", Bm), ("Cm", Cm), ("D", D), ("z", z),
                      ("delta_bias", delta_bias), ("initial_state", initial_state)])

    batch, T, channels = u.shape
    check_nonempty_time("u", T)
    check_shape("delta", delta, (batch, T, channels))
    check_shape("A", A, (channels, None))
    state_size = A.shape[1]
    check_shape("Bm", Bm, (batch, T, state_size))
    check_shape("Cm", Cm, (batch, T, state_size))
    if D is not None:
        check_shape("D", D, (channels,))
    if z is not None:
        check_shape("z", z, (batch, T, channels))
    if delta_bias is not None:
        check_shape("delta_bias", delta_bias, (channels,))
    if initial_state is not None:
        check_shape("initial_state", initial_state, (batch, channels, state_size))
    return u, delta, A, Bm, Cm, D, z, delta_bias, initial_state


def forward(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, delta_softplus=False, mode="chunked",
            chunk_size=64, initial_state=None, return_state=False, backend="auto"):
    """Selective scan: out_t = (Σ_n C_t h_t + D u_t) · SiLU(z_t), h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t.

    u, delta: (B, T, D); A: (D, N); Bm, Cm: (B, T, N); D, delta_bias: (D,) or None; z: (B, T, D) or
    None; initial_state: (B, D, N) or None (zeros). All arrays float32 or float64, one dtype.
    delta_softplus: Δ = softplus(delta + delta_bias) if True, else delta + delta_bias.
    mode: "recurrent" | "parallel" | "chunked" (same results; see the module docstring).
    chunk_size: steps per chunk in "chunked" mode (any positive int; need not divide T).
    A should be negative (Mamba uses A = -exp(A_log)) so that 0 < exp(Δ A) < 1 and the state
    decays; any finite A is accepted, but A > 0 makes the state grow like exp(Δ A T).
    The state is accumulated in the input dtype (float32 or float64).

    Returns (out, cache) with out (B, T, D) in the input dtype, or ((out, final_state), cache)
    with final_state (B, D, N) if return_state. The final state can be passed back as
    initial_state to continue the sequence. Gradients do not flow into initial_state, nor out
    of final_state.
    """
    u, delta, A, Bm, Cm, D, z, delta_bias, initial_state = _validate_inputs(
        u, delta, A, Bm, Cm, D, z, delta_bias, initial_state)
    check_choice("mode", mode, MODES)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    delta_softplus = check_bool("delta_softplus", delta_softplus)
    return_state = check_bool("return_state", return_state)
    kernel = select_kernel(backend, "selective_scan", mode=mode)
    if kernel is not None:   # backend "numba" / "cuda" (or "auto" choosing numba): same values, faster
        return kernel.forward(u, delta, A, Bm, Cm, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                              chunk_size=chunk_size, initial_state=initial_state, return_state=return_state)

    batch, T, channels = u.shape
    delta_in = delta if delta_bias is None else delta + delta_bias
    step = softplus(delta_in) if delta_softplus else delta_in
    h0 = initial_state if initial_state is not None else np.zeros((batch, channels, A.shape[1]), u.dtype)

    cache = {"mode": mode, "chunk_size": chunk_size, "u": u, "delta_in": delta_in, "step": step, "A": A,
             "Bm": Bm, "Cm": Cm, "D": D, "z": z, "delta_softplus": delta_softplus,
             "has_delta_bias": delta_bias is not None}
    if mode == "chunked":
        y, cache["carries"], final_state = _chunked_forward(step, A, u, Bm, Cm, h0, chunk_size)
    else:
        states_of = _recurrent_states if mode == "recurrent" else _scan_states
        cache["states"] = states = states_of(step, A, u, Bm, h0)
        y = _readout(states, Cm)
        final_state = states[:, -1]

    if D is not None:
        y = y + D * u
    if z is None:
        out = y
    else:
        cache["y"] = y
        out = _gate(y, z)

    out = out.astype(u.dtype, copy=False)
    if return_state:
        return (out, final_state.astype(u.dtype, copy=True)), cache
    return out, cache


def backward(dout, cache):
    """Gradients of the selective scan. dout: (B, T, D), same dtype as the forward inputs.

    Returns (du, ddelta, dA, dBm, dCm, dD, dz, ddelta_bias) in the input dtype, with None where
    the forward input was None. No gradient is returned for initial_state.
    """
    u = cache["u"]
    dout = as_float_array("dout", dout, 3)
    check_shape("dout", dout, u.shape)
    check_same_dtype([("u", u), ("dout", dout)])
    if "backend" in cache:
        return kernel_backward(dout, cache, "selective_scan")
    A, Bm, Cm, D, z, step = cache["A"], cache["Bm"], cache["Cm"], cache["D"], cache["z"], cache["step"]

    # out = y · SiLU(z)
    if z is None:
        dy, dz = dout, None
    else:
        dy, dz = _gate_backward(dout, cache["y"], z)

    # y_t = Σ_n C_t h_t + D u_t, h_t = a_t h_{t-1} + b_t
    mode = cache["mode"]
    if mode == "chunked":
        du, d_step, dA, dBm, dCm = _chunked_scan_backward(dy, step, A, u, Bm, Cm, cache["carries"],
                                                          cache["chunk_size"])
    else:
        if mode == "recurrent":
            adjoints = _recurrent_adjoints(step, A, Cm, dy)
        else:
            adjoints, _ = _scan_adjoints(step, A, Cm, dy, np.zeros_like(cache["states"][:, 0]))
        du, d_step, dA, dBm, dCm = _blockwise_segment_grads(adjoints, cache["states"], step, A, u, Bm, dy)

    dD = None
    if D is not None:
        du = du + D * dy
        dD = np.sum(dy * u, axis=(0, 1), dtype=np.float64)

    # Δ = softplus(delta + delta_bias) or delta + delta_bias
    ddelta = d_step * _softplus_grad(cache["delta_in"]) if cache["delta_softplus"] else d_step
    ddelta_bias = np.sum(ddelta, axis=(0, 1), dtype=np.float64) if cache["has_delta_bias"] else None

    def cast(g):
        return None if g is None else np.asarray(g).astype(u.dtype, copy=False)

    return tuple(cast(g) for g in (du, ddelta, dA, dBm, dCm, dD, dz, ddelta_bias))
