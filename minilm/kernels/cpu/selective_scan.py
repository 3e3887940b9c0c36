"""Selective scan on the CPU: fused Numba kernels for the forward, the backward and a one-token step.

Shapes: B batch, T time, D channels, N state size.

    u, delta, z      (B, T, D)     input, raw step size, optional gate
    A                (D, N)        state matrix (one diagonal per channel)
    Bm, Cm           (B, T, N)     input and output projections, shared by all channels
    D, delta_bias    (D,)          skip connection, step-size bias
    h                (B, D, N)     state

The equations are those of the NumPy reference, minilm.ops.selective_scan, for every (b, d, n):

    Δ_t   = softplus(delta_t + delta_bias) if delta_softplus else delta_t + delta_bias
    h_t   = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t              h_0 = initial_state, or 0
    y_t   = Σ_n C_t h_t + D u_t
    out_t = y_t · SiLU(z_t)                                only when z is given

and, with dy_t = dL/dy_t, the adjoint g_t = dL/dh_t runs the same recurrence backwards:

    g_t    = C_t dy_t + a_{t+1} g_{t+1}     (a_t = exp(Δ_t A); a_{T+1} g_{T+1} := 0)
    du_t   = Δ_t Σ_n g_t B_t + D dy_t
    dΔ_t   = u_t Σ_n g_t B_t + Σ_n g_t A (a_t h_{t-1}),  times σ(delta_t + delta_bias) under softplus
    dA     = Σ_{b,t} g_t Δ_t a_t h_{t-1}      dD = Σ_{b,t} dy_t u_t      ddelta_bias = Σ_{b,t} dΔ_t
    dBm_t  = Σ_d g_t Δ_t u_t                  dCm_t = Σ_d dy_t h_t
    dy_t   = dout_t z_t σ(z_t)                dz_t = dout_t y_t σ(z_t)(1 + z_t(1 - σ(z_t)))

How the kernels are organised (``_forward_kernel``, ``_backward_kernel``):

- Work is split into tasks, one per (batch entry, block of CHANNEL_BLOCK channels). Each worker
  thread (``prange``) owns a contiguous run of tasks and takes all of them through one chunk of
  CHUNK time steps before the next, so the rows of u, delta, z, out it reads and writes in a
  chunk are neighbours in memory.
- Within a task, each channel walks through the chunk step by step. Its state, N numbers, is a
  row of the (B, D, N) state array and the loop over n is the innermost loop: contiguous and
  branch-free, so LLVM turns it into SIMD code. exp is ``fastmath.exp`` (a polynomial) instead
  of the C library's, which could not be vectorized.
- Per-(t, d) work (bias, softplus, gate, writing results) is done a chunk at a time in loops
  whose inner index is the channel, contiguous in memory, so it vectorizes as well.
- Memory: the forward keeps only the state entering every chunk, ``carries`` of shape
  (B, ceil(T / CHUNK), D, N), never (B, T, D, N). The backward walks the chunks from last to
  first; for each channel it rebuilds the chunk's states h_t and decays a_t from the carry into a
  small per-worker buffer (CHUNK, 2, N), then runs the adjoint recurrence backwards through the
  chunk, using a_t h_{t-1} = h_t - Δ_t u_t B_t as the reference does. a_t g_t of the chunk's first
  step is carried into the previous chunk: that is the shift a_{t+1} across a chunk boundary.
- Races: dBm and dCm are sums over channels, which different workers own. Each worker adds into
  its own (B, T, 2, N) slice of a buffer, and the slices are summed after the kernel. dA, dD and
  ddelta_bias are per channel: each (batch entry, channel) has its own slot, summed over the batch
  afterwards, in float64.
- Arrays that the loops over n write (state, buffers) are allocated by the host wrappers and passed in:
  Numba declares a parallel kernel's array arguments non-overlapping to LLVM (noalias), which
  lets the loops vectorize without run-time overlap checks.

Floating point: arithmetic is in the input dtype (float32 or float64), except the sums over time
of dA, dD and ddelta_bias, which are accumulated in float64. No fast-math compile flag is used:
the only reordered operations are the sums over n (Σ_n C h, Σ_n g B, ...), written with
``fastmath.reduce_add`` so that they vectorize, and multiply-adds are fused where the CPU has FMA
(``fastmath.muladd``). Results match the reference to ~3e-7 (float32) and ~1e-15 (float64),
scale-aware, on the test shapes; the sums over channels of dBm and dCm depend on the number of
worker threads only through rounding.

Public API (inputs already validated by minilm.ops.selective_scan, except light shape checks here):
    available() -> (ok, reason); supports(**options) -> (ok, reason)
    forward(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, delta_softplus=False,
            chunk_size=64, initial_state=None, return_state=False, carry_every=None) -> (out, cache)
    backward(dout, cache) -> (du, ddelta, dA, dBm, dCm, dD, dz, ddelta_bias)
    step(u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, delta_softplus, state) -> (out_t, new_state)
        (one decoding step; it runs the forward kernel on a length-1 sequence)
"""
import numba
import numpy as np
from numba import prange

from minilm.kernels.cpu.fastmath import exp, muladd, reduce_add, select, sigmoid, softplus

CHUNK = 256            # time steps between stored states; the backward rebuilds one chunk at a time
CHANNEL_BLOCK = 16     # channels per parallel task
SOFTPLUS_THRESHOLD = 20.0   # softplus(x) = x above this, as in the reference


def available():
    """(ok, reason): whether these kernels can run here (they need only Numba on the CPU)."""
    return True, f"numba {numba.__version__} on the CPU, {numba.get_num_threads()} threads"


def supports(**options):
    """(ok, reason) for a set of forward options: every option of the reference is supported."""
    return True, ""


# ----------------------------------------------------------------------------------------------
# Kernels


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _forward_kernel(u, delta, A, Bm, Cm, D, z, delta_bias, has_z, delta_softplus, carry_every, n_workers,
                    state, out, carries):
    """Advance `state` (B, D, N) through time in place; write out (B, T, D) and carries
    (B, n_chunks, D, N), the state entering each chunk.

    D and delta_bias are arrays (zeros stand for "not given"); z is only read when has_z.
    n_workers <= the number of Numba threads. The loop over n writes only `state`, an argument,
    which Numba declares non-overlapping with the others, so it vectorizes without overlap checks.
    """
    batch, T, channels = u.shape
    N = A.shape[1]
    n_blocks = (channels + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    n_tasks = batch * n_blocks
    n_chunks = (T + carry_every - 1) // carry_every
    zero = u.dtype.type(0)
    for worker in prange(n_workers):
        step_blk = np.empty((carry_every, CHANNEL_BLOCK), dtype=u.dtype)   # Δ_t
        x_blk = np.empty((carry_every, CHANNEL_BLOCK), dtype=u.dtype)      # Δ_t u_t
        y_blk = np.empty((carry_every, CHANNEL_BLOCK), dtype=u.dtype)      # Σ_n C_t h_t
        # A worker owns a contiguous run of (batch, channel block) tasks and takes all of them
        # through one chunk of time before the next (see the module docstring).
        for c in range(n_chunks):
            t0 = c * carry_every
            L = min(carry_every, T - t0)
            for task in range(worker * n_tasks // n_workers, (worker + 1) * n_tasks // n_workers):
                b = task // n_blocks
                d0 = (task % n_blocks) * CHANNEL_BLOCK
                width = min(CHANNEL_BLOCK, channels - d0)
                for j in range(width):
                    for n in range(N):
                        carries[b, c, d0 + j, n] = state[b, d0 + j, n]

                # Δ_t and Δ_t u_t for the chunk (inner loop over channels)
                for i in range(L):
                    for j in range(width):
                        step_blk[i, j] = delta[b, t0 + i, d0 + j] + delta_bias[d0 + j]
                if delta_softplus:
                    for i in range(L):
                        for j in range(width):
                            step_blk[i, j] = softplus(step_blk[i, j])
                for i in range(L):
                    for j in range(width):
                        x_blk[i, j] = step_blk[i, j] * u[b, t0 + i, d0 + j]

                # h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t and Σ_n C_t h_t, channel by channel
                for j in range(width):
                    d = d0 + j
                    for i in range(L):
                        t = t0 + i
                        step = step_blk[i, j]
                        x = x_blk[i, j]
                        y = zero
                        for n in range(N):
                            hn = muladd(exp(step * A[d, n]), state[b, d, n], x * Bm[b, t, n])
                            state[b, d, n] = hn
                            y = reduce_add(y, hn * Cm[b, t, n])
                        y_blk[i, j] = y

                # out_t = (Σ_n C_t h_t + D u_t) · SiLU(z_t)
                if has_z:
                    for i in range(L):
                        for j in range(width):
                            zz = z[b, t0 + i, d0 + j]
                            y = y_blk[i, j] + D[d0 + j] * u[b, t0 + i, d0 + j]
                            out[b, t0 + i, d0 + j] = y * zz * sigmoid(zz)
                else:
                    for i in range(L):
                        for j in range(width):
                            out[b, t0 + i, d0 + j] = y_blk[i, j] + D[d0 + j] * u[b, t0 + i, d0 + j]


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _backward_kernel(dout, u, delta, A, Bm, Cm, D, z, delta_bias, has_z, delta_softplus, carries,
                     carry_every, du, ddelta, dz, dBC_parts, dA_parts, dD_parts, ddelta_bias_parts,
                     chunk_buf, h_run, from_later, dA_chunk):
    """Write du, ddelta, dz (B, T, D) and the partial sums
        dBC_parts (n_workers, B, T, 2, N)   [..., 0, :] dBm, [..., 1, :] dCm; zero on entry; one
                                            slice per worker thread
        dA_parts (B, D, N), dD_parts, ddelta_bias_parts (B, D)   float64, zero on entry
    Scratch (contents on entry do not matter), passed in so that it is known not to overlap:
        chunk_buf (n_workers, carry_every, 2, N)   a_t and h_t of one channel over one chunk
        h_run, dA_chunk (B, D, N)                  running state; dA of one chunk
        from_later (B, D, N)                       a_{t+1} g_{t+1}; zero on entry
    """
    batch, T, channels = u.shape
    N = A.shape[1]
    n_workers = dBC_parts.shape[0]
    n_blocks = (channels + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    n_tasks = batch * n_blocks
    n_chunks = (T + carry_every - 1) // carry_every
    zero = u.dtype.type(0)
    one = u.dtype.type(1)
    threshold = u.dtype.type(SOFTPLUS_THRESHOLD)
    for worker in prange(n_workers):
        step_blk = np.empty((carry_every, CHANNEL_BLOCK), dtype=u.dtype)   # Δ_t
        u_blk = np.empty((carry_every, CHANNEL_BLOCK), dtype=u.dtype)      # u_t
        dy_blk = np.empty((carry_every, CHANNEL_BLOCK), dtype=u.dtype)     # dL/dy_t
        y_blk = np.empty((carry_every, CHANNEL_BLOCK), dtype=u.dtype)      # y_t (for dz)
        gate_blk = np.empty((carry_every, CHANNEL_BLOCK), dtype=u.dtype)   # σ(z_t) (for dz)
        du_blk = np.empty((carry_every, CHANNEL_BLOCK), dtype=u.dtype)     # dL/du_t
        dstep_blk = np.empty((carry_every, CHANNEL_BLOCK), dtype=u.dtype)  # dL/dΔ_t
        dD_acc = np.empty(CHANNEL_BLOCK, dtype=np.float64)                # one chunk's sums
        ddb_acc = np.empty(CHANNEL_BLOCK, dtype=np.float64)
        # Chunks from last to first; within a chunk, the worker's contiguous run of tasks.
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * carry_every
            L = min(carry_every, T - t0)
            for task in range(worker * n_tasks // n_workers, (worker + 1) * n_tasks // n_workers):
                b = task // n_blocks
                d0 = (task % n_blocks) * CHANNEL_BLOCK
                width = min(CHANNEL_BLOCK, channels - d0)

                # Δ_t, u_t and dy_t for the chunk (inner loop over channels)
                for i in range(L):
                    for j in range(width):
                        step_blk[i, j] = delta[b, t0 + i, d0 + j] + delta_bias[d0 + j]
                        u_blk[i, j] = u[b, t0 + i, d0 + j]
                if delta_softplus:
                    for i in range(L):
                        for j in range(width):
                            step_blk[i, j] = softplus(step_blk[i, j])
                if has_z:
                    for i in range(L):
                        for j in range(width):
                            zz = z[b, t0 + i, d0 + j]
                            s = sigmoid(zz)
                            gate_blk[i, j] = s
                            dy_blk[i, j] = dout[b, t0 + i, d0 + j] * zz * s
                else:
                    for i in range(L):
                        for j in range(width):
                            dy_blk[i, j] = dout[b, t0 + i, d0 + j]

                for j in range(width):
                    d = d0 + j
                    # 1. rebuild this channel's states over the chunk from the stored carry
                    for n in range(N):
                        h_run[b, d, n] = carries[b, c, d, n]
                    for i in range(L):
                        t = t0 + i
                        step = step_blk[i, j]
                        x = step * u_blk[i, j]
                        for n in range(N):
                            a = exp(step * A[d, n])
                            hn = muladd(a, h_run[b, d, n], x * Bm[b, t, n])
                            h_run[b, d, n] = hn
                            chunk_buf[worker, i, 0, n] = a
                            chunk_buf[worker, i, 1, n] = hn
                        if has_z:       # y_t, only needed for dz
                            y = zero
                            for n in range(N):
                                y = reduce_add(y, chunk_buf[worker, i, 1, n] * Cm[b, t, n])
                            y_blk[i, j] = y + D[d] * u_blk[i, j]

                    # 2. adjoints backwards through the chunk, reading off the gradients
                    for n in range(N):
                        dA_chunk[b, d, n] = zero
                    for i in range(L - 1, -1, -1):
                        t = t0 + i
                        step = step_blk[i, j]
                        uu = u_blk[i, j]
                        x = step * uu
                        dy = dy_blk[i, j]
                        g_dot_B = zero
                        g_dot_Aah = zero
                        for n in range(N):
                            hn = chunk_buf[worker, i, 1, n]
                            g = muladd(Cm[b, t, n], dy, from_later[b, d, n])
                            g_ah = g * (hn - x * Bm[b, t, n])       # g_t a_t h_{t-1} = g_t (h_t - b_t)
                            g_dot_B = reduce_add(g_dot_B, g * Bm[b, t, n])
                            g_dot_Aah = reduce_add(g_dot_Aah, g_ah * A[d, n])
                            dA_chunk[b, d, n] += g_ah * step
                            dBC_parts[worker, b, t, 0, n] += g * x
                            dBC_parts[worker, b, t, 1, n] += dy * hn
                            from_later[b, d, n] = chunk_buf[worker, i, 0, n] * g
                        du_blk[i, j] = g_dot_B * step + D[d] * dy
                        dstep_blk[i, j] = g_dot_B * uu + g_dot_Aah
                    for n in range(N):
                        dA_parts[b, d, n] += dA_chunk[b, d, n]

                # du; ddelta = dL/dΔ times σ(delta + delta_bias) under softplus (1 where softplus
                # is the identity, and without softplus); sums over time for dD and ddelta_bias
                for j in range(width):
                    dD_acc[j] = 0.0
                    ddb_acc[j] = 0.0
                for i in range(L):
                    for j in range(width):
                        raw = delta[b, t0 + i, d0 + j] + delta_bias[d0 + j]
                        slope = select((raw <= threshold) & delta_softplus, sigmoid(raw), one)
                        dstep_blk[i, j] *= slope
                        ddelta[b, t0 + i, d0 + j] = dstep_blk[i, j]
                        du[b, t0 + i, d0 + j] = du_blk[i, j]
                for i in range(L):
                    for j in range(width):
                        ddb_acc[j] += dstep_blk[i, j]
                        dD_acc[j] += dy_blk[i, j] * u_blk[i, j]
                for j in range(width):
                    ddelta_bias_parts[b, d0 + j] += ddb_acc[j]
                    dD_parts[b, d0 + j] += dD_acc[j]
                # out = y z σ(z):  dz = dout y σ(z) (1 + z (1 - σ(z)))
                if has_z:
                    for i in range(L):
                        for j in range(width):
                            zz = z[b, t0 + i, d0 + j]
                            s = gate_blk[i, j]
                            dsilu = s * (one + zz * (one - s))
                            dz[b, t0 + i, d0 + j] = dout[b, t0 + i, d0 + j] * y_blk[i, j] * dsilu


# ----------------------------------------------------------------------------------------------
# Host wrappers


def _contiguous(x):
    return None if x is None else np.ascontiguousarray(x)


def _or_zeros(x, shape, dtype):
    return np.zeros(shape, dtype=dtype) if x is None else x


def forward(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, delta_softplus=False, chunk_size=64,
            initial_state=None, return_state=False, carry_every=None):
    """Selective scan forward, same contract as minilm.ops.selective_scan.forward.

    u, delta: (B, T, D); A: (D, N); Bm, Cm: (B, T, N); D, delta_bias: (D,) or None; z: (B, T, D)
    or None; initial_state: (B, D, N) or None (zeros). One dtype, float32 or float64.
    chunk_size: the reference's block length for its "chunked" mode; accepted for a common call
    signature, it does not change anything here.
    carry_every: time steps between stored states (default CHUNK). Any positive int: results do
    not depend on it; memory of the cache is B·D·N·ceil(T / carry_every) values.

    Returns (out, cache), or ((out, final_state), cache) if return_state. out (B, T, D) and
    final_state (B, D, N) are in the input dtype. Gradients do not flow into initial_state nor out
    of final_state. The cache holds references to the inputs, the carries and the options.
    """
    u, delta, A, Bm, Cm, D, z, delta_bias, initial_state = (
        _contiguous(x) for x in (u, delta, A, Bm, Cm, D, z, delta_bias, initial_state))
    carry_every = CHUNK if carry_every is None else int(carry_every)
    if carry_every < 1:
        raise ValueError(f"carry_every must be a positive int, got {carry_every}")
    batch, T, channels = u.shape
    N = A.shape[1]
    dtype = u.dtype
    n_chunks = -(-T // carry_every)

    n_workers = max(1, min(numba.get_num_threads(), batch * (-(-channels // CHANNEL_BLOCK))))
    out = np.empty((batch, T, channels), dtype=dtype)
    carries = np.empty((batch, n_chunks, channels, N), dtype=dtype)
    # the kernel advances `state` in place through time: it holds the final state at the end
    state = np.zeros((batch, channels, N), dtype=dtype) if initial_state is None else initial_state.copy()
    _forward_kernel(u, delta, A, Bm, Cm, _or_zeros(D, channels, dtype), u if z is None else z,
                    _or_zeros(delta_bias, channels, dtype), z is not None, bool(delta_softplus), carry_every,
                    n_workers, state, out, carries)

    cache = {"backend": "numba", "u": u, "delta": delta, "A": A, "Bm": Bm, "Cm": Cm, "D": D, "z": z,
             "delta_bias": delta_bias, "delta_softplus": bool(delta_softplus), "carries": carries,
             "carry_every": carry_every}
    if return_state:
        return (out, state), cache
    return out, cache


def backward(dout, cache):
    """Gradients of the selective scan from the cache of ``forward``. dout: (B, T, D), input dtype.

    Returns (du, ddelta, dA, dBm, dCm, dD, dz, ddelta_bias) in the input dtype, None where the
    forward input was None. No gradient for initial_state.
    """
    u, delta, A, Bm, Cm = cache["u"], cache["delta"], cache["A"], cache["Bm"], cache["Cm"]
    D, z, delta_bias = cache["D"], cache["z"], cache["delta_bias"]
    if not isinstance(dout, np.ndarray) or dout.dtype != u.dtype:
        raise TypeError(f"dout must be a numpy.ndarray of dtype {u.dtype}, got "
                        f"{getattr(dout, 'dtype', type(dout).__name__)}")
    if dout.shape != u.shape:
        raise ValueError(f"dout must have shape {u.shape}, got {dout.shape}")
    dout = np.ascontiguousarray(dout)
    batch, T, channels = u.shape
    N = A.shape[1]
    dtype = u.dtype
    n_tasks = batch * (-(-channels // CHANNEL_BLOCK))
    n_workers = max(1, min(numba.get_num_threads(), n_tasks))

    du = np.empty_like(u)
    ddelta = np.empty_like(u)
    dz = np.empty_like(u) if z is not None else np.empty((1, 1, 1), dtype=dtype)   # unused without z
    dBC_parts = np.zeros((n_workers, batch, T, 2, N), dtype=dtype)
    dA_parts = np.zeros((batch, channels, N), dtype=np.float64)
    dD_parts = np.zeros((batch, channels), dtype=np.float64)
    ddb_parts = np.zeros((batch, channels), dtype=np.float64)
    carry_every = cache["carry_every"]
    scratch = (np.empty((n_workers, carry_every, 2, N), dtype=dtype),
               np.empty((batch, channels, N), dtype=dtype),
               np.zeros((batch, channels, N), dtype=dtype),      # no gradient enters from the final state
               np.empty((batch, channels, N), dtype=dtype))
    _backward_kernel(dout, u, delta, A, Bm, Cm, _or_zeros(D, channels, dtype), u if z is None else z,
                     _or_zeros(delta_bias, channels, dtype), z is not None, cache["delta_softplus"],
                     cache["carries"], carry_every, du, ddelta, dz, dBC_parts, dA_parts, dD_parts,
                     ddb_parts, *scratch)

    dBm = dBC_parts[:, :, :, 0].sum(axis=0)     # sums over the workers' slices, new contiguous arrays
    dCm = dBC_parts[:, :, :, 1].sum(axis=0)
    dA = dA_parts.sum(axis=0).astype(dtype)
    dD = None if D is None else dD_parts.sum(axis=0).astype(dtype)
    ddelta_bias = None if delta_bias is None else ddb_parts.sum(axis=0).astype(dtype)
    return du, ddelta, dA, dBm, dCm, dD, (dz if z is not None else None), ddelta_bias


def step(u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, delta_softplus, state):
    """One decoding step of the scan: the recurrence above for a single token.

    u_t, delta_t, z_t: (B, D); A: (D, N); B_t, C_t: (B, N); D, delta_bias: (D,) or None;
    z_t may be None; state: (B, D, N), the state after the previous token (zeros to start).
    Returns (out_t (B, D), new_state (B, D, N)), input dtype; state is not modified.
    It is forward(...) on a length-1 sequence with initial_state=state, return_state=True: the
    same kernel, so a prompt run through forward and continued with step gives the same numbers.
    """
    arrays = {"u_t": u_t, "delta_t": delta_t, "A": A, "B_t": B_t, "C_t": C_t, "D": D, "z_t": z_t,
              "delta_bias": delta_bias, "state": state}
    for name, x in arrays.items():
        if x is None and name in ("u_t", "delta_t", "A", "B_t", "C_t", "state"):
            raise TypeError(f"{name} must be a numpy.ndarray, got None")
        if x is not None and not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    dtype = u_t.dtype
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"u_t must have dtype float32 or float64, got {dtype}")
    for name, x in arrays.items():
        if x is not None and x.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype} like u_t, got {x.dtype}")
    if u_t.ndim != 2:
        raise ValueError(f"u_t must have shape (B, D), got {u_t.shape}")
    batch, channels = u_t.shape
    if A.ndim != 2 or A.shape[0] != channels:
        raise ValueError(f"A must have shape ({channels}, N), got {A.shape}")
    N = A.shape[1]
    expected = {"delta_t": (batch, channels), "B_t": (batch, N), "C_t": (batch, N), "D": (channels,),
                "z_t": (batch, channels), "delta_bias": (channels,), "state": (batch, channels, N)}
    for name, shape in expected.items():
        x = arrays[name]
        if x is not None and x.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {x.shape}")

    # The forward kernel on a sequence of one step: (B, D) -> (B, 1, D) views, no copies.
    (out, new_state), _ = forward(u_t[:, None], delta_t[:, None], A, B_t[:, None], C_t[:, None], D=D,
                                  z=None if z_t is None else z_t[:, None], delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, initial_state=state, return_state=True,
                                  carry_every=1)
    return out[:, 0], new_state
