"""Selective scan on a GPU: numba.cuda kernels for the forward and the backward of Mamba's scan.

Shapes: B batch, T time, D channels, N state size.

    u, delta, z      (B, T, D)     input, raw step size, optional gate
    A                (D, N)        state matrix (one diagonal per channel)
    Bm, Cm           (B, T, N)     input and output projections, shared by all channels
    D, delta_bias    (D,)          skip connection, step-size bias
    h                (B, D, N)     state

The equations are those of the NumPy reference, minilm.ops.selective_scan, for every (b, d, n):

    Δ_t   = softplus(delta_t + delta_bias) if delta_softplus else delta_t + delta_bias
    a_t   = exp(Δ_t A)          b_t = Δ_t u_t B_t
    h_t   = a_t h_{t-1} + b_t                                  h_0 = initial_state, or 0
    y_t   = Σ_n C_t h_t + D u_t          out_t = y_t · SiLU(z_t)   (when z is given)

Backward, with dy_t = dL/dy_t and the adjoint g_t = dL/dh_t:

    g_t   = C_t dy_t + a_{t+1} g_{t+1}                          (a_{T+1} g_{T+1} := 0)
    du_t  = Δ_t Σ_n g_t B_t + D dy_t       dΔ_t = u_t Σ_n g_t B_t + Σ_n g_t A (a_t h_{t-1})
    dA    = Σ_{b,t} g_t Δ_t a_t h_{t-1}    dB_t = Σ_d g_t Δ_t u_t      dC_t = Σ_d dy_t h_t
    dD    = Σ_{b,t} dy_t u_t               ddelta_bias = Σ_{b,t} ddelta_t

How the work is laid out (one CUDA block per batch entry and group of CHANNELS channels):

    forward (_make_forward_kernel): all states of a channel in one thread
        thread = (channel lane, time segment)                 lane varies fastest: loads along D coalesce
        each thread owns all N states of one channel (up to 16 at a time) and STEPS consecutive steps
    backward (_make_backward_kernel): states spread over threads
        thread = (channel lane, state thread, time segment)
        each thread owns STATES_PER_THREAD states of one channel and STEPS consecutive time steps
    a chunk = SEGMENTS × STEPS steps; the block walks the chunks in order (the backward: in reverse)

Inside a chunk the scan is two-level, with the associative operator of the reference,

    (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2):

  1. each thread scans its own STEPS steps from h = 0 in registers; its segment's aggregate is
     (Π a_t, h_local);
  2. the aggregates are scanned across the segments through shared memory, starting from the state
     carried out of the previous chunk, so every segment learns the state it starts from: in the
     forward, one thread per (channel, state) walks the chunk's segments in order; in the
     backward, every segment folds the aggregates of the segments before it (_fold_segments);
  3. fix-up: each thread replays its steps from that state, h_t = a_t h_{t-1} + b_t (computing a_t
     and b_t again: keeping them would take 2 × STEPS registers per state), and adds C_t h_t into y.

The C-contraction y_t = Σ_n C_t h_t is a sum in registers in the forward (a thread holds all
states), and a reduction over the state threads in the backward.

The only per-step state that reaches global memory is the state entering every chunk of the
backward, `carries` (B, n_chunks, D, N): the backward rebuilds each chunk's states from it (steps
1-3 again), runs the adjoint recurrence backwards the same two-level way (the reverse scan carries
a_t g_t of a chunk's first step into the chunk before it: the a_{t+1} shift across the boundary),
and reads the gradients off (g_t, h_t). The adjoint's local scan needs only a_t, C_t and dy_t, not
the states, so both local scans run before one barrier, after which both folds run. dB and dC (sums
over channels) are added with atomics, first into shared-memory tiles and then, once per chunk, into
float32/float64 global buffers; dA, dD and ddelta_bias too. The backward is therefore not
bit-for-bit deterministic. With ScanConfig.bwd_warp_sums the sums over a warp's lanes are taken by
shuffles first: a step's dB, dC terms over the channel lanes by a reduce-scatter (_scatter_sums:
each of the 2 × STATES_PER_THREAD sums ends on its own lane), the sums over state threads by a
butterfly (_xor_sum). Each warp stores its sums in shared memory with plain stores (the sums over
state threads in a slot of its own, added in the epilogue).

When N exceeds the states one block holds at a time (the forward: fwd_thread_states per thread;
the backward: STATE_THREADS × STATES_PER_THREAD), the block walks the states in groups, adding each
group's partial sums into the output buffers.

Floating point: the state math is in the input dtype (float32 inputs: float32 throughout, the speed
path; float64 works too). exp(Δ A) is computed as exp2(Δ · A log2 e): in float32 the hardware's
approximate exp2 (~2 ulp) as one instruction, results below 2^-126 flushed to zero (_exp2.py says
why that is safe for a decay); the float32 forward's softplus is that exp2 and a polynomial
(_softplus_f32, within 4e-6 relative, 3.4e-7 for x in [-5, 20]); no fast-math flags otherwise.
Results match the reference to ~1e-6 relative in float32.

Public API (inputs already validated by minilm.ops.selective_scan; NumPy arrays or CUDA arrays):
    available() -> (ok, reason); supports(**options) -> (ok, reason)
    forward(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, delta_softplus=False,
            chunk_size=64, initial_state=None, return_state=False) -> (out, cache)
    backward(dout, cache) -> (du, ddelta, dA, dBm, dCm, dD, dz, ddelta_bias)
"""
import math
from dataclasses import dataclass, replace

import numpy as np

from minilm.kernels.cuda import _device
from minilm.kernels.cuda._device import cuda
from minilm.kernels.cuda._exp2 import exp2_flush, exp2_for
from minilm.kernels.cuda._tiles import tile_element

try:
    from numba import uint32 as _u32, uint64 as _u64
except Exception:  # pragma: no cover - numba missing: available() says so
    _u32 = _u64 = None

SOFTPLUS_THRESHOLD = 20.0   # softplus(x) = x above this, as in the reference
LOG2E = 1.4426950408889634  # exp(x) = exp2(x log2 e)


@dataclass(frozen=True)
class ScanConfig:
    """Block shape of the scan kernels (module constants; tests shrink them).

    channels           channels per block, the fastest thread index (coalesced loads along D)
    state_threads      backward: threads along the state axis (at most; fewer when N is small)
    states_per_thread  backward: states one thread keeps in registers
    fwd_thread_states  forward: states one thread holds, at most (more: the states are walked in
                       groups)
    fwd_segments, fwd_steps    forward: time segments per chunk, steps per segment
    bwd_segments, bwd_steps    backward: the same. The backward restarts every chunk of its own from
                               the state the forward stored there, so the forward's segments must
                               divide the backward's chunk
    fwd_min_blocks, bwd_min_blocks   0, or the blocks per multiprocessor to ask the compiler to make
                               room for (CUDA launch bounds: it then caps the registers per thread)
    bwd_warp_sums              backward: add the per-thread terms of dB, dC (over the channel lanes)
                               and of Σ_n g B, Σ_n g A a h, Σ_n C h (over a warp's state threads) with
                               warp shuffles, instead of shared-memory atomics on one address per
                               lane group (on sm_90 a float atomic on shared memory is a compare-and-
                               swap loop, retried once per colliding lane); each warp then stores
                               its sums with no atomic at all. Used where the layout allows it
                               (channels and state threads powers of two, whole warps, a
                               segment's state threads in at most two warps)
    """
    channels: int = 8
    state_threads: int = 8
    states_per_thread: int = 2
    fwd_thread_states: int = 16
    fwd_segments: int = 16      # H200, B=4 L=4K D=1536 N=16: forward kernel 0.65-0.76 ms; 8: 0.60-0.77
    fwd_steps: int = 8
    bwd_segments: int = 8
    bwd_steps: int = 8
    fwd_min_blocks: int = 6     # 80 registers (sm_90): 6 blocks of 128 threads per SM, 768 in one wave
    bwd_min_blocks: int = 2     # 64 registers, two 512-thread blocks per SM: backward 1.55 ms; one: 2.12
    bwd_warp_sums: bool = True      # H200: backward 2.97 ms instead of 7.25 (B=4 L=4K D=1536 N=16)

    @property
    def chunk(self):
        """Steps between the states the forward stores: the backward's chunk."""
        return self.bwd_segments * self.bwd_steps

    def check(self):
        if self.chunk % self.fwd_steps:
            raise ValueError(f"the forward's segments ({self.fwd_steps} steps) do not divide the "
                             f"backward's chunk ({self.bwd_segments}x{self.bwd_steps})")
        return self


# float64 tiles take twice the shared memory: half the backward's chunk keeps a block under the
# 48 KiB that a kernel may use statically.
CONFIGS = {
    "float32": ScanConfig(),
    "float64": ScanConfig(bwd_segments=4, fwd_min_blocks=0),
}


def set_config(dtype, **changes):
    """Change the block shape used for `dtype` ("float32" / "float64"); returns the previous one."""
    previous = CONFIGS[dtype]
    CONFIGS[dtype] = replace(previous, **changes).check()
    return previous


def available():
    """(ok, reason): whether numba.cuda can run these kernels here (a GPU, or the simulator)."""
    return _device.available()


def supports(**options):
    """(ok, reason) for a set of forward options: every option of the reference is supported."""
    return True, ""


# ----------------------------------------------------------------------------------------------
# small device functions

# log(1 + e) / e for e in [0, 1]: a degree-9 polynomial (a Chebyshev fit; evaluated in float32 it
# is within 1.7e-7 relative of log1p(e) / e), lowest power first
LOG1P_UNIT_F32 = tuple(np.float32(c) for c in (
    1.0, -0.4999985098838806, 0.3332909941673279, -0.24947808682918549, 0.19651488959789276,
    -0.15251445770263672, 0.10533220320940018, -0.05643497034907341, 0.019649142399430275,
    -0.003214032156392932))
LOG2E_F32 = np.float32(LOG2E)
ZERO_F32 = np.float32(0)

if cuda is not None:
    @cuda.jit(device=True)
    def _softplus(x, threshold):
        """log(1 + e^x), the identity above the threshold (as the reference)."""
        if x > threshold:
            return x
        return math.log1p(math.exp(x))

    @cuda.jit(device=True)
    def _softplus_f32(x, threshold):
        """float32 softplus in about 15 instructions, where _softplus takes about 45 (expf and
        log1pf): max(x, 0) + log1p(e) with e = 2^(-|x| log2 e) from the hardware exp2
        (_exp2.exp2_flush) and log1p(e) = e · LOG1P_UNIT_F32(e); x itself above the threshold.
        Relative error (with exact exp2; the hardware's adds up to 2.4e-7): 3.4e-7 for x in
        [-5, 20], 9.6e-7 down to -15, 1.8e-6 down to -30, 3.9e-6 down to -87. It grows with |x|
        because -|x| log2 e is rounded to float32 before the exp2, as the decays' arguments are."""
        e = exp2_flush(-abs(x) * LOG2E_F32)
        c = LOG1P_UNIT_F32
        q = c[9]
        q = q * e + c[8]
        q = q * e + c[7]
        q = q * e + c[6]
        q = q * e + c[5]
        q = q * e + c[4]
        q = q * e + c[3]
        q = q * e + c[2]
        q = q * e + c[1]
        q = q * e + c[0]
        positive = x if x > ZERO_F32 else ZERO_F32
        if x > threshold:
            return x
        return positive + e * q

    def softplus_for(real):
        """_softplus_f32 for float32 kernels, _softplus (exact to an ulp or two) for float64."""
        import numba
        return _softplus_f32 if real == numba.float32 else _softplus

    @cuda.jit(device=True)
    def _sigmoid(x, one):
        """σ(x) without overflow: exp only ever sees -|x|."""
        e = math.exp(-abs(x))
        if x >= 0:
            return one / (one + e)
        return e / (one + e)


def _rows_per_thread(elements, threads):
    """How many of `elements` one thread handles when `threads` threads share them in turn."""
    return -(-elements // threads)


def _state_rows(chunk, states, threads):
    """Rows of a `staged` local array that _stage_states fills: one thread's (B, C) pairs."""
    return _rows_per_thread(chunk * states, threads)


def _staged_rows(chunk, channels, states, threads):
    """Rows of the `staged` local array _stage_inputs needs (its loads per thread, in pairs)."""
    return _rows_per_thread(chunk * channels, threads) + _state_rows(chunk, states, threads)


def _fold_rows(nt, states_per_thread):
    """The first row that state thread nt's states take in the backward's buffers of segment
    aggregates, (S, rows, DG): nt · states_per_thread, plus a spare row after state threads 1, 5,
    9, ... With 8 channels a row is 8 words, so rows 4 apart share their banks; a warp's 4 state
    threads (2 states each) would store and fold rows j, 2 + j, 4 + j, 6 + j, two to a bank, and
    with the spare rows they take four bank groups (rows j, 2 + j, 5 + j, 7 + j). On an H200 the
    backward's bank conflicts fell from 20 M to 0.8 M (docs/kernels.md, ninth run)."""
    return nt * states_per_thread + (nt + 2) // 4


_fold_rows_device = cuda.jit(device=True)(_fold_rows) if cuda is not None else None


def _numba_type(dtype):
    import numba
    return numba.float32 if np.dtype(dtype) == np.float32 else numba.float64


def _layout(config, N):
    """(state_threads, states_per_thread) used for N states: no more threads than states need (one
    thread of one state for N = 0: y = D u then, which the kernels still compute)."""
    per_thread = max(1, min(config.states_per_thread, N))
    threads = max(1, min(config.state_threads, -(-N // per_thread)))
    return threads, per_thread


# ----------------------------------------------------------------------------------------------
# forward kernel

_KERNELS = {}


def _forward_kernel(dtype, config, N):
    """(kernel, threads per block) of the forward for this dtype, block shape and state count."""
    DG, S, K = config.channels, config.fwd_segments, config.fwd_steps
    NS = _thread_states(config, N)
    key = ("fwd", np.dtype(dtype).name, DG, NS, S, K, config.chunk, config.fwd_min_blocks, N)
    if key not in _KERNELS:
        _KERNELS[key] = _make_forward_kernel(_numba_type(dtype), DG, NS, S, K, config.chunk,
                                             config.fwd_min_blocks, N)
    return _KERNELS[key], DG * S


def _thread_states(config, N):
    """States one thread of the forward holds in registers: all N, or N split into as few equal
    groups as fwd_thread_states allows (at least one, for N = 0)."""
    groups = max(1, -(-N // config.fwd_thread_states))
    return max(1, -(-N // groups))


def _make_forward_kernel(real, DG, NS, S, K, CC, min_blocks, N_ROW):
    """The forward, all NS states of a channel in one thread.

    thread = (channel lane, time segment); a chunk = S segments × K steps; CC: the spacing of the
    stored carries (the backward's chunk, a multiple of K); N_ROW: the state count N, the row
    length of B and C, which the kernel takes flattened (see _stage_states).

    A thread runs its segment's steps for all of its channel's states at once, so everything that
    depends on (t, d) only, the loads of Δ_t and u_t, the softplus, the sum y_t = Σ_n C_t h_t, the
    skip and the gate, is paid once per NS states, and y_t is finished in registers (the backward,
    which spreads the states over threads, sums it through shared memory). A thread stages its own
    steps' Δ_t and u_t; the block stages B_t and C_t, which all of its channels read. The scan across
    segments runs per (channel, state) pair instead of per thread: after the local scans, each of
    the DG × NS pairs is walked through the chunk's S segments by one thread, which turns every
    segment's aggregate into the state entering it. A segment's Π a_t is exp2(A log2e Σ_t Δ_t),
    one exp2 from the sum of its steps, so the local scan keeps no product.
    """
    CH = S * K                    # steps per chunk
    THREADS = DG * S
    STAGED = _state_rows(CH, NS, THREADS)     # B, C values one thread stages
    PAIRS = DG * NS               # (channel, state) pairs, each folded by one thread
    FOLDS = _rows_per_thread(PAIRS, THREADS)
    # Row length of the fold buffer, padded by 2: a warp's folding threads (16 states × 2 channels
    # at N = 16) then read 32 different banks, and the local scans' stores (8 channels × 4
    # segments) still do.
    ROW = S * DG + 2
    exp2 = exp2_for(real)
    softplus = softplus_for(real)

    @_device.jit_kernel(THREADS, min_blocks)
    def forward_kernel(u, delta, A, Bm, Cm, Dskip, z, bias, h0, out, carries, final_state,
                       has_z, has_h0, has_softplus):
        # Global indices are unsigned 64-bit (see _stage_states), shared-memory ones unsigned 32-bit.
        b = _u64(cuda.blockIdx.y)
        d_first = _u32(cuda.blockIdx.x * DG)
        tid = _u32(cuda.threadIdx.x)
        lane = _u32(tid % DG)            # channel within the block
        seg = _u32(tid // DG)            # time segment within a chunk
        column0 = _u32(seg * DG + lane)  # this thread's column of s_fold
        T = u.shape[1]
        N = A.shape[1]
        T64 = _u64(T)
        N64 = _u64(N)
        channels = _u64(u.shape[2])
        d = _u64(d_first + lane)
        d_ok = d < channels
        zero = real(0)
        one = real(1)
        log2e = real(LOG2E)
        threshold = real(SOFTPLUS_THRESHOLD)
        step_bias = bias[d] if d_ok else zero
        skip = Dskip[d] if d_ok else zero

        # one chunk of the inputs, rows step-major: step k of segment seg is row k S + seg, so the
        # four segments a warp spans read four rows in a row, in different banks
        # (no tile of Δ_t u_t: a step's product is one multiply for all of its states, and without
        # it six blocks of 128 threads fit a multiprocessor's shared memory, enough for 768 blocks)
        s_step = cuda.shared.array((CH, DG), real)      # Δ_t
        s_u = cuda.shared.array((CH, DG), real)         # u_t
        s_B = cuda.shared.array((CH, NS), real)
        s_C = cuda.shared.array((CH, NS), real)
        s_A2 = cuda.shared.array((NS, DG), real)        # A log2 e of the block's channels
        # [j, seg DG + lane]: h of segment seg's local scan, which the fold replaces by the state
        # entering the segment
        s_fold = cuda.shared.array((NS, ROW), real)
        s_steps_sum = cuda.shared.array((S, DG), real)  # Σ Δ_t over each segment

        raw = cuda.local.array((K, 2), real)            # this thread's steps: delta + bias, u
        staged = cuda.local.array((STAGED, 2), real)    # its share of the chunk's B, C
        A2 = cuda.local.array(NS, real)
        h = cuda.local.array(NS, real)
        fold_A2 = cuda.local.array(FOLDS, real)         # A log2 e of the pairs this thread folds
        fold_state = cuda.local.array(FOLDS, real)      # their state, carried from chunk to chunk
        y_steps = cuda.local.array(K, real)             # Σ_n C_t h_t + D u_t of this thread's steps

        n_chunks = (T + CH - 1) // CH
        n_groups = max(1, (N + NS - 1) // NS)    # one pass even for N = 0: the skip term D u
        for group in range(n_groups):
            n_first = _u64(group * NS)
            if seg == 0:       # read after the first chunk's barrier
                for j in range(NS):
                    n = n_first + _u64(j)
                    s_A2[j, lane] = A[d, n] * log2e if (d_ok and n < N64) else zero
            for f in range(FOLDS):
                pair = _u32(tid + f * THREADS)
                n = n_first + _u64(pair % NS)
                dd = _u64(d_first + pair // NS)
                ok = pair < PAIRS and dd < channels and n < N64
                fold_A2[f] = A[dd, n] * log2e if ok else zero
                fold_state[f] = h0[b, dd, n] if (ok and has_h0) else zero

            for chunk in range(n_chunks):
                t_first = _u64(chunk * CH)
                t0 = t_first + _u64(seg * K)     # this thread's first step
                cuda.syncthreads()       # everyone is done with the previous chunk's tiles
                # Stage the chunk: this thread's steps (loads first, stores after the block's
                # B and C loads, so that all are in flight together); steps past T and channels
                # past D get Δ = 0, u = 0: a = 1, b = 0.
                inside = d_ok and t0 + _u64(K) <= T64      # the whole segment: no checks per step
                if inside:      # (then the compiler forms one address per array, not one per load)
                    for k in range(K):
                        raw[k, 0] = delta[b, t0 + _u64(k), d] + step_bias
                        raw[k, 1] = u[b, t0 + _u64(k), d]
                else:
                    for k in range(K):
                        t = t0 + _u64(k)
                        raw[k, 0] = zero
                        raw[k, 1] = zero
                        if d_ok and t < T64:
                            raw[k, 0] = delta[b, t, d] + step_bias
                            raw[k, 1] = u[b, t, d]
                _stage_states(Bm, Cm, s_B, s_C, b, t_first, n_first, T64, N_ROW, zero, staged, 0, THREADS, S)
                for k in range(K):
                    step = raw[k, 0]
                    if has_softplus and d_ok and t0 + _u64(k) < T64:
                        step = softplus(step, threshold)
                    row = _u32(k * S + seg)
                    s_step[row, lane] = step
                    s_u[row, lane] = raw[k, 1]
                cuda.syncthreads()

                # 1. local scan of this segment from h = 0, all states at once
                for j in range(NS):
                    A2[j] = s_A2[j, lane]
                    h[j] = zero
                steps_sum = zero
                # A while loop on a 32-bit counter, not `for k in range(K)`: Numba lowers range() to
                # a 64-bit iterator whose bookkeeping (~7 instructions per step in the sm_90 code)
                # the compiler repeats in every unrolled copy.
                k = _u32(0)
                while k < K:
                    row = _u32(k * S + seg)
                    step = s_step[row, lane]
                    step_u = step * s_u[row, lane]
                    steps_sum += step
                    for j in range(NS):
                        h[j] = exp2(step * A2[j]) * h[j] + step_u * s_B[row, j]
                    k = _u32(k + 1)
                for j in range(NS):
                    s_fold[j, column0] = h[j]
                s_steps_sum[seg, lane] = steps_sum
                cuda.syncthreads()

                # 2. fold, per (channel, state) pair, in segment order: entering ← state, then
                #    state ← (Π a) state + h, with Π a = exp2(A log2e Σ Δ). The state entering every
                #    CC-th step is stored for the backward.
                for f in range(FOLDS):
                    pair = _u32(tid + f * THREADS)
                    if pair < PAIRS:
                        j = _u32(pair % NS)
                        pair_lane = _u32(pair // NS)
                        n = n_first + _u64(j)
                        dd = _u64(d_first + pair_lane)
                        keep = dd < channels and n < N64
                        state = fold_state[f]
                        t_seg = t_first
                        column = pair_lane
                        s = _u32(0)
                        while s < S:           # 32-bit counters, as in the step loops
                            if keep and t_seg % _u64(CC) == 0 and t_seg < T64:
                                carries[b, t_seg // _u64(CC), dd, n] = state
                            local = s_fold[j, column]
                            s_fold[j, column] = state
                            state = exp2(fold_A2[f] * s_steps_sum[s, pair_lane]) * state + local
                            t_seg += _u64(K)
                            column = _u32(column + DG)
                            s = _u32(s + 1)
                        fold_state[f] = state
                        if keep and chunk == n_chunks - 1:
                            final_state[b, dd, n] = state
                cuda.syncthreads()

                # 3. fix-up: replay the steps from the segment's true starting state; y_t = Σ_n C_t h_t
                #    in registers, then the skip connection and the gate
                first = group == 0
                last = group == n_groups - 1
                group_skip = skip if last else zero      # D u is added once
                for j in range(NS):
                    h[j] = s_fold[j, column0]
                k = _u32(0)
                while k < K:
                    row = _u32(k * S + seg)
                    step = s_step[row, lane]
                    step_u = step * s_u[row, lane]
                    y = zero
                    for j in range(NS):
                        h[j] = exp2(step * A2[j]) * h[j] + step_u * s_B[row, j]
                        y += s_C[row, j] * h[j]
                    y_steps[k] = y + group_skip * s_u[row, lane]
                    k = _u32(k + 1)
                if inside:
                    for k in range(K):
                        _emit_output(out, z, b, t0 + _u64(k), d, y_steps[k], first, last, has_z, one)
                else:
                    for k in range(K):
                        if d_ok and t0 + _u64(k) < T64:
                            _emit_output(out, z, b, t0 + _u64(k), d, y_steps[k], first, last, has_z, one)

    return forward_kernel


if cuda is not None:
    @cuda.jit(device=True)
    def _stage_inputs(u, delta, bias, Bm, Cm, n_row, s_step, s_step_u, s_B, s_C,
                      batch, t_first, d_first, n_first, softplus, threshold, zero, staged, threads):
        """Copy one chunk of the inputs into shared memory, Δ already through bias and softplus.

        Steps past T and channels past D get Δ = 0, u = 0 (the identity step a = 1, b = 0); states
        past N get B = C = 0. Consecutive threads read consecutive channels (coalesced).

        A thread issues its loads of (delta + bias, u) first, into the first rows of `staged` (a
        local array in registers of _staged_rows(...) rows), then _stage_states loads and stores
        B and C (into the rows after them), then the thread stores its (Δ, Δ u): the loads are
        in flight together, one trip to memory per chunk instead of one per element (a store to
        shared memory between two loads keeps the second waiting for the first).
        u stays in `staged` (rows 0, 1, ..., column 1): the backward, short of shared memory, has
        no tile for it, and its epilogue handles the same (t, d) elements as this thread.
        """
        tid = _u32(cuda.threadIdx.x)
        CH = s_step.shape[0]
        DG = s_step.shape[1]
        # Global indices are unsigned 64-bit, as in _stage_states.
        T = _u64(u.shape[1])
        channels = _u64(u.shape[2])
        b = _u64(batch)
        per_channel = (CH * DG + threads - 1) // threads          # rows of staged for (delta + bias, u)
        # threads is a multiple of DG: a thread's channel is the same in all of its rows.
        # (Every result is cast: Numba types uint32 // int as int64, and int64 with uint64 as
        # int64 again, or compares them as float64.)
        ln = _u32(tid % DG)
        dd = _u64(d_first) + _u64(ln)
        step_bias = zero
        if dd < channels:
            step_bias = bias[dd]
        for r in range(per_channel):
            t_local = _u32(tid // DG + r * (threads // DG))
            t = _u64(t_first) + _u64(t_local)
            step = zero
            value = zero
            if t_local < CH and t < T and dd < channels:
                step = delta[b, t, dd] + step_bias
                value = u[b, t, dd]
            staged[r, 0] = step
            staged[r, 1] = value
        _stage_states(Bm, Cm, s_B, s_C, b, _u64(t_first), _u64(n_first), T, n_row, zero, staged,
                      per_channel, threads, 1)
        for r in range(per_channel):
            t_local = _u32(tid // DG + r * (threads // DG))
            if t_local < CH:
                step = staged[r, 0]
                if softplus and _u64(t_first) + _u64(t_local) < T and dd < channels:
                    step = _softplus(step, threshold)
                s_step[t_local, ln] = step
                s_step_u[t_local, ln] = step * staged[r, 1]

    @cuda.jit(device=True)
    def _emit_output(out, z, b, t, d, y, first_group, last_group, has_z, one):
        """out[b, t, d] from y, this state group's part of Σ_n C_t h_t (the last group's with D u_t):
        added to the earlier groups' part, then through the gate y · SiLU(z) after the last."""
        if not first_group:
            y += out[b, t, d]
        if last_group and has_z:
            gate = z[b, t, d]
            y = y * gate * _sigmoid(gate, one)
        out[b, t, d] = y

    @cuda.jit(device=True)
    def _stage_states(Bm, Cm, s_B, s_C, b, t_first, n_first, T, n_row, zero, staged, first_row, threads,
                      segments):
        """Copy one chunk of B and C (states n_first, n_first + 1, ...) into shared memory. With
        segments > 1 the rows are step-major, as _make_forward_kernel reads them: with
        CH = segments × steps, step k of segment s (chunk step s · steps + k) goes to row
        k · segments + s. States past N and steps past T get B = C = 0.

        Bm, Cm: (B · T · N,), flat views of (B, T, N); n_row = N, a compile-time constant of the
        kernel, so that loads a constant number of steps apart are a constant distance apart: the
        compiler forms one address per array and adds offsets (with the arrays' own row length,
        known only at run time, each load paid a multiply; global indices are unsigned 64-bit for
        the same reason: 32-bit ones may wrap around before they are widened).

        Consecutive threads take consecutive elements of the tile, in its (step-major) order
        (_tiles.tile_element): a warp reads whole rows of B_t (coalesced: at 16 states two rows of
        64 bytes, 4 sectors per load) and its stores fall in 32 different banks. When the block's
        threads are a multiple of the states, a thread keeps one state and walks the rows a, a + R,
        a + 2R, ... (a = tid // NP, R = threads // NP); when R divides the segments too, row a + R r
        is chunk step a · steps + (R r % segments) · steps + R r // segments: the thread's part plus
        a constant of the (unrolled) pass. Each thread loads all of its elements into `staged`
        (rows first_row, first_row + 1, ...; B in column 0, C in 1) before it stores any: the loads
        are in flight together.
        """
        tid = _u32(cuda.threadIdx.x)
        CH = s_B.shape[0]
        NP = s_B.shape[1]
        N = _u64(n_row)
        steps = CH // segments
        per_thread = (CH * NP + threads - 1) // threads
        # row a + R r as a step: the thread's part plus a constant (see above)
        split_steps = threads % NP == 0 and segments % max(1, threads // NP) == 0
        # (every result cast: Numba types uint32 // int as int64, and compares int64 with uint64
        # as float64)
        inside = t_first + _u64(CH) <= T and n_first + _u64(NP) <= N    # no checks per load
        chunk_start = (b * T + t_first) * N + n_first      # element (b, t_first, n_first)
        for r in range(per_thread):
            row, n_local = tile_element(tid, r, threads, NP)
            if split_steps:
                shift = r * (threads // NP)
                t_local = _u32(tid // NP * steps) + _u32(shift % segments * steps + shift // segments)
            else:
                t_local = _u32(row % segments * steps + row // segments)
            at = chunk_start + _u64(t_local) * N + _u64(n_local)
            staged[first_row + r, 0] = zero
            staged[first_row + r, 1] = zero
            if row < CH and (inside or (t_first + _u64(t_local) < T and n_first + _u64(n_local) < N)):
                staged[first_row + r, 0] = Bm[at]
                staged[first_row + r, 1] = Cm[at]
        for r in range(per_thread):
            row, column = tile_element(tid, r, threads, NP)
            if row < CH:
                s_B[row, column] = staged[first_row + r, 0]
                s_C[row, column] = staged[first_row + r, 1]

    @cuda.jit(device=True)
    def _fold_segments(s_a, s_h, prod, h, entering, seg, row0, lane, NPT, S, reverse):
        """Scan of the segments' aggregates (Π a, h) with ∘ across the block.

        Every thread has stored its segment's aggregate (prod, h) (NPT,) in s_a[seg], s_h[seg] (rows
        row0, row0 + 1, ...: _fold_rows), and a barrier has passed. Each segment folds the h parts
        of the segments before it in order, state ← a_p state + h_p (when reverse: of the segments
        after it, from the last one back: the adjoint runs backwards in time). The first segment's
        aggregate already holds the state carried into the chunk, so the fold is the state entering
        the segment: it goes into entering (NPT,), for every segment but the first, and h becomes
        the state leaving the segment, prod · entering + h.

        The fold takes the last segment S - 2 dependent steps. For the 4 or 8 segments of a chunk
        that beats a Hillis-Steele scan, whose log2(S) rounds take a barrier each and two buffers
        between them: here one barrier and one buffer (on an H200 the backward got 24 % faster with
        this and the per-warp sums, docs/kernels.md).
        """
        first = _u32(S - 1) if reverse else _u32(0)
        if seg != first:
            for j in range(NPT):
                entering[j] = s_h[first, row0 + _u32(j), lane]
            for i in range(1, S - 1):      # a fixed trip count: unrolled, each step behind a guard
                p = _u32(S - 1 - i) if reverse else _u32(i)
                if (p > seg) if reverse else (p < seg):
                    for j in range(NPT):
                        row = row0 + _u32(j)
                        entering[j] = s_a[p, row, lane] * entering[j] + s_h[p, row, lane]
            for j in range(NPT):
                h[j] = prod[j] * entering[j] + h[j]

    @cuda.jit(device=True)
    def _xor_sum(value, first, count):
        """Σ of value over the `count` lanes of a warp whose lane ids differ only in the bits of
        first, 2·first, ..., count/2·first (count a power of two): a butterfly of shuffles, after
        which each of them holds the sum. All 32 lanes of the warp must call it together."""
        offset = first
        while offset < first * count:
            value += cuda.shfl_xor_sync(0xFFFFFFFF, value, offset)
            offset *= 2
        return value

    @cuda.jit(device=True)
    def _scatter_sums(values, count, rank, first, lanes):
        """Σ over `lanes` lanes of a warp of each of the `count` values in values (count,), spread
        over those lanes: a reduce-scatter by shuffles. Returns `start`: afterwards values[0],
        ..., values[max(1, count / lanes) - 1] hold the sums of the values at start, start + 1, ...

        The lanes are those whose ids differ only in the bits of first, 2·first, ..., lanes/2·first
        (count and lanes powers of two); rank is this lane's place among them, (lane id / first) %
        lanes. All 32 lanes of the warp must call it together. Each round pairs the lanes whose ranks
        differ in one bit. While a lane has values to split, the one with the bit set keeps the upper
        half of its values and sends the lower half, its partner the other way round, and each adds
        what it receives: half as many values, each summed over twice as many lanes. Once one value
        is left, a round just adds the partner's (as _xor_sum). Lanes with the same start hold the
        same sums; those of rank < count hold every sum once.

        count values over `lanes` lanes take count - 1 shuffles (plus log2(lanes / count) when
        lanes > count), where a butterfly per value takes count · log2(lanes).
        """
        start = 0
        half = count // 2
        # Loops with fixed trip counts (lanes <= 32; count // 2, left early): the compiler unrolls
        # them, and then the caller's loop over the steps too. With `while bit < lanes` or
        # `range(half)` it did not, and the caller's per-step arrays went to local memory.
        for level in range(5):
            bit = 1 << level
            if bit < lanes:
                partner = bit * first
                if half > 0:
                    upper = (rank & bit) != 0
                    for i in range(count // 2):
                        if i >= half:
                            break
                        # selp, a plain select: with Python's `x if c else y` (a branch) the compiler
                        # loads through a chosen address instead, which keeps values out of registers
                        keep = cuda.selp(upper, values[i + half], values[i])
                        send = cuda.selp(upper, values[i], values[i + half])
                        values[i] = keep + cuda.shfl_xor_sync(0xFFFFFFFF, send, partner)
                    if upper:
                        start += half
                    half //= 2
                else:
                    values[0] += cuda.shfl_xor_sync(0xFFFFFFFF, values[0], partner)
        return start


# ----------------------------------------------------------------------------------------------
# backward kernel

def _warp_sums_fit(channels, state_threads, states_per_thread, threads):
    """Whether the shuffle sums of the backward can serve this layout: each group of channel lanes
    and each warp's state threads must be whole, aligned groups of lanes of full warps; a segment's
    state threads span at most two warps (each warp's sums get their own slot in shared memory, and
    more slots would not fit beside the chunk's tiles); and a thread's dB, dC terms are a power of
    two (_scatter_sums splits them in halves)."""
    def power_of_two(x):
        return x > 0 and x & (x - 1) == 0
    return (power_of_two(channels) and channels <= 32 and power_of_two(state_threads) and threads % 32 == 0
            and channels * state_threads <= 64 and power_of_two(states_per_thread))


def backward_warp_sums(config, N):
    """Whether the backward takes its sums by warp shuffles: asked for (bwd_warp_sums), a layout
    they serve (_warp_sums_fit) and shuffles to run them (Numba's simulator has none)."""
    NT, NPT = _layout(config, N)
    threads = config.channels * NT * config.bwd_segments
    return (config.bwd_warp_sums and _warp_sums_fit(config.channels, NT, NPT, threads)
            and _device.warp_shuffles_available())


def _backward_kernel(dtype, config, N):
    NT, NPT = _layout(config, N)
    DG, S, K = config.channels, config.bwd_segments, config.bwd_steps
    warp_sums = backward_warp_sums(config, N)
    key = ("bwd", np.dtype(dtype).name, DG, NT, NPT, S, K, config.bwd_min_blocks, warp_sums, N)
    if key not in _KERNELS:
        _KERNELS[key] = _make_backward_kernel(_numba_type(dtype), DG, NT, NPT, S, K, N, config.bwd_min_blocks,
                                              warp_sums)
    return _KERNELS[key], DG * NT * S


def _make_backward_kernel(real, DG, NT, NPT, S, K, N_ROW, min_blocks, WARP_SUMS=False):
    NP = NT * NPT
    CH = S * K
    CH_PADDED = CH + 1                                # rows of s_dBC (see there)
    FOLD_ROWS = _fold_rows(NT - 1, NPT) + NPT         # rows of the segment-aggregate buffers
    THREADS = DG * NT * S
    STAGED = _staged_rows(CH, DG, NP, THREADS)
    exp2 = exp2_for(real)
    NT_IN_WARP = min(NT, max(1, 32 // DG))      # state threads of one segment that share a warp
    SLOTS = NT // NT_IN_WARP if WARP_SUMS else 1     # partial sums over state threads per (t, d)
    OUT_ROWS = _rows_per_thread(CH * DG, THREADS)     # (t, d) elements per thread and chunk
    STATE_ROWS = _rows_per_thread(CH * NP, THREADS)   # (t, n) elements per thread and chunk
    TERMS = 2 * NPT                                   # dB, dC terms of one step per thread

    @_device.jit_kernel(THREADS, min_blocks)
    def backward_kernel(dout, u, delta, A, Bm, Cm, Dskip, z, bias, carries,
                        du, ddelta, dz, dA, dBm, dCm, dD, dbias,
                        has_z, softplus):
        batch = _u32(cuda.blockIdx.y)
        d_first = cuda.blockIdx.x * DG     # signed: unsigned spills 20 B more under the 64-register cap (sm_90)
        tid = cuda.threadIdx.x
        lane = _u32(tid % DG)            # unsigned shared-memory indices, as in the forward
        nt = _u32((tid // DG) % NT)
        seg = _u32(tid // (DG * NT))
        slot = _u32(nt // NT_IN_WARP) if WARP_SUMS else _u32(0)     # this warp's slot of the sums
        leader = nt % NT_IN_WARP == 0       # stores its warp's sums (WARP_SUMS)
        row0 = _u32(seg * K)
        col0 = _u32(nt * NPT)
        fold_row0 = _u32(_fold_rows_device(nt, NPT))   # this thread's first row in s_scan_a, _h, _g
        T = u.shape[1]
        channels = u.shape[2]
        N = A.shape[1]
        d = d_first + lane
        d_ok = d < channels
        zero = real(0)
        one = real(1)
        log2e = real(LOG2E)
        threshold = real(SOFTPLUS_THRESHOLD)

        s_step = cuda.shared.array((CH, DG), real)
        s_step_u = cuda.shared.array((CH, DG), real)
        s_dy = cuda.shared.array((CH, DG), real)       # dL/dy = dout · SiLU(z)
        s_B = cuda.shared.array((CH, NP), real)
        s_C = cuda.shared.array((CH, NP), real)
        s_scan_a = cuda.shared.array((S, FOLD_ROWS, DG), real)     # rows: _fold_rows
        s_scan_h = cuda.shared.array((S, FOLD_ROWS, DG), real)
        # adjoint aggregates; segment 0's slot then keeps a_t g_t of the chunk's first step (the
        # reverse fold never reads it) for the chunk before, that is, the next one walked
        s_scan_g = cuda.shared.array((S, FOLD_ROWS, DG), real)
        # dB, dC: Σ over the block's channels, then atomics. One row of padding between the two: a
        # warp stores a step's dB and dC together, and CH × NP words apart they would share banks
        s_dBC = cuda.shared.array((2, CH_PADDED, NP), real)
        # sums over the states, per warp (WARP_SUMS) or by atomics into slot 0; the epilogue adds the slots
        # [0] Σ_n g B (→ du, dΔ), [1] Σ_n g A a h_{t-1} (→ dΔ), [2] Σ_n C h (→ dz)
        s_sums = cuda.shared.array((3, SLOTS, CH, DG), real)
        s_zero = cuda.shared.array(1, _u32)             # 0, re-read every chunk (see below)
        if tid == 0:
            s_zero[0] = 0

        staged = cuda.local.array((STAGED, 2), real)    # this thread's share of a chunk's inputs
        decay = cuda.local.array((K, NPT), real)
        states = cuda.local.array((K, NPT), real)       # b_t, then h_t once the fix-up has run
        A_row = cuda.local.array(NPT, real)
        A2 = cuda.local.array(NPT, real)
        h = cuda.local.array(NPT, real)
        prod = cuda.local.array(NPT, real)
        h_start = cuda.local.array(NPT, real)
        later = cuda.local.array(NPT, real)
        adjoint = cuda.local.array(NPT, real)
        dA_sum = cuda.local.array(NPT, real)
        terms = cuda.local.array(TERMS, real)           # one step's dB, dC terms, before their sums

        dD_sum = zero        # this thread's channel is the same in every epilogue below
        dbias_sum = zero

        n_chunks = (T + CH - 1) // CH
        n_groups = max(1, (N + NP - 1) // NP)    # one pass even for N = 0: the skip term D u
        for group in range(n_groups):
            for j in range(NPT):
                n = group * NP + nt * NPT + j
                A_row[j] = A[d, n] if (d_ok and n < N) else zero
                A2[j] = A_row[j] * log2e
                dA_sum[j] = zero

            for chunk_back in range(n_chunks):
                chunk = n_chunks - 1 - chunk_back
                t_first = chunk * CH
                cuda.syncthreads()
                # Reading the row offset from shared memory after the barrier makes it a value of
                # this iteration: the compiler then forms the ~50 shared-memory addresses of the
                # unrolled loops on the fly instead of hoisting them out of the chunk loop into
                # registers. On the atomics path that would cost ~100 registers per thread; with
                # warp sums (sm_90) it would save 4 % of the instructions but spill 76 / 88 B, not
                # 60 / 56 (untimed).
                row0 = _u32(seg * K) + s_zero[0]
                _stage_inputs(u, delta, bias, Bm, Cm, N_ROW, s_step, s_step_u, s_B, s_C,
                              batch, t_first, d_first, group * NP, softplus, threshold, zero, staged, THREADS)
                _stage_output_grad(dout, z, s_dy, s_dBC, s_sums,
                                   batch, t_first, d_first, has_z, not WARP_SUMS, zero, one, THREADS)
                for j in range(NPT):
                    n = group * NP + nt * NPT + j
                    if seg == 0:
                        h_start[j] = carries[batch, chunk, d, n] if (d_ok and n < N) else zero
                    if seg == S - 1:      # no gradient flows out of the final state
                        later[j] = s_scan_g[0, fold_row0 + _u32(j), lane] if chunk_back > 0 else zero
                cuda.syncthreads()

                # Local scans of this segment: of the states forward from h = 0, and of the adjoint
                # backward from a_{t+1} g_{t+1} = 0 at the segment's end, g_t = C_t dy_t + a_{t+1}
                # g_{t+1} (what leaves the segment is a_first g_first). Both aggregates have the
                # same product Π a_t, and both are scanned across the segments after one barrier.
                for j in range(NPT):
                    h[j] = zero
                    prod[j] = one
                for k in range(K):
                    t = row0 + _u32(k)
                    step = s_step[t, lane]
                    step_u = s_step_u[t, lane]
                    for j in range(NPT):
                        a = exp2(step * A2[j])
                        b = step_u * s_B[t, col0 + _u32(j)]
                        decay[k, j] = a
                        states[k, j] = b
                        h[j] = a * h[j] + b
                        prod[j] = prod[j] * a
                for j in range(NPT):
                    adjoint[j] = zero
                for kk in range(K):
                    k = K - 1 - kk
                    t = row0 + _u32(k)
                    dy = s_dy[t, lane]
                    for j in range(NPT):
                        g = adjoint[j] + s_C[t, col0 + _u32(j)] * dy
                        adjoint[j] = decay[k, j] * g
                for j in range(NPT):
                    if seg == 0:
                        h[j] = prod[j] * h_start[j] + h[j]
                    if seg == S - 1:
                        adjoint[j] = prod[j] * later[j] + adjoint[j]
                    row = fold_row0 + _u32(j)
                    s_scan_a[seg, row, lane] = prod[j]
                    s_scan_h[seg, row, lane] = h[j]
                    s_scan_g[seg, row, lane] = adjoint[j]
                cuda.syncthreads()
                _fold_segments(s_scan_a, s_scan_h, prod, h, h_start, seg, fold_row0, lane, NPT, S, False)
                _fold_segments(s_scan_a, s_scan_g, prod, adjoint, later, seg, fold_row0, lane, NPT, S, True)
                if seg == 0:      # a_t g_t of the chunk's first step, for the chunk before it
                    for j in range(NPT):
                        s_scan_g[0, fold_row0 + _u32(j), lane] = adjoint[j]

                # fix-up: the states from the segment's true starting state
                for j in range(NPT):
                    h[j] = h_start[j]
                for k in range(K):
                    t = row0 + _u32(k)
                    y = zero
                    for j in range(NPT):
                        h[j] = decay[k, j] * h[j] + states[k, j]
                        states[k, j] = h[j]
                        y += s_C[t, col0 + _u32(j)] * h[j]
                    if has_z:         # Σ over state threads (with WARP_SUMS: this warp's, into its slot)
                        if WARP_SUMS:
                            y = _xor_sum(y, DG, NT_IN_WARP)
                            if leader:
                                s_sums[2, slot, t, lane] = y
                        else:
                            cuda.atomic.add(s_sums, (2, 0, t, lane), y)

                # replay the adjoint from the true a_{t+1} g_{t+1} and read the gradients off
                for kk in range(K):
                    k = K - 1 - kk
                    t = row0 + _u32(k)
                    step = s_step[t, lane]
                    step_u = s_step_u[t, lane]
                    dy = s_dy[t, lane]
                    gB = zero
                    gAh = zero
                    for j in range(NPT):
                        nl = col0 + _u32(j)
                        Bv = s_B[t, nl]
                        g = later[j] + s_C[t, nl] * dy
                        if k > 0:
                            h_before = states[k - 1, j]
                        else:
                            h_before = h_start[j]
                        decayed = decay[k, j] * h_before          # a_t h_{t-1}
                        gB += g * Bv
                        gAh += g * A_row[j] * decayed
                        dA_sum[j] += g * step * decayed
                        if WARP_SUMS:   # summed over the channel lanes below
                            terms[j] = g * step_u
                            terms[NPT + j] = dy * states[k, j]
                        else:
                            cuda.atomic.add(s_dBC, (0, t, nl), g * step_u)
                            cuda.atomic.add(s_dBC, (1, t, nl), dy * states[k, j])
                        later[j] = decay[k, j] * g
                    if WARP_SUMS:
                        # dB_t, dC_t: Σ over the channel lanes (this (t, n) belongs to them alone), each
                        # sum ending on one lane, which stores it: (dB, dC) × NPT states = TERMS sums
                        start = _scatter_sums(terms, TERMS, lane, 1, DG)
                        if lane < TERMS:
                            for i in range(max(1, TERMS // DG)):
                                index = _u32(start + i)
                                s_dBC[index // NPT, t, col0 + index % NPT] = terms[i]
                        # Σ_n g B and Σ_n g A a h over this warp's state threads, into its slot (a
                        # scatter of these two would save 2 of 8 instructions, but then the compiler
                        # no longer unrolls this loop, and decay, states go to local memory)
                        gB = _xor_sum(gB, DG, NT_IN_WARP)
                        gAh = _xor_sum(gAh, DG, NT_IN_WARP)
                        if leader:
                            s_sums[0, slot, t, lane] = gB
                            s_sums[1, slot, t, lane] = gAh
                    else:
                        cuda.atomic.add(s_sums, (0, 0, t, lane), gB)
                        cuda.atomic.add(s_sums, (1, 0, t, lane), gAh)
                cuda.syncthreads()

                # per (t, d): du, dΔ, dz; per (t, n): dB, dC into global memory
                last_group = group == n_groups - 1
                b = _u64(batch)              # unsigned 64-bit global indices, as in _stage_states
                for r in range(OUT_ROWS):
                    index = _u32(tid + r * THREADS)
                    t_local = _u32(index // DG)
                    ln = _u32(index % DG)
                    t = _u64(t_first) + _u64(t_local)
                    dd = _u64(d_first + ln)
                    if index < CH * DG and t < _u64(T) and dd < _u64(channels):
                        gB = zero
                        gAh = zero
                        y = zero
                        for q in range(SLOTS):
                            gB += s_sums[0, q, t_local, ln]
                            gAh += s_sums[1, q, t_local, ln]
                            y += s_sums[2, q, t_local, ln]
                        if group > 0:          # earlier state groups left their partial sums here
                            gB += du[b, t, dd]
                            gAh += ddelta[b, t, dd]
                            if has_z:
                                y += dz[b, t, dd]
                        if last_group:
                            value = staged[r, 1]      # u: _stage_inputs gave this thread the same elements
                            dy = s_dy[t_local, ln]
                            step_grad = value * gB + gAh
                            if softplus:
                                x = delta[b, t, dd] + bias[dd]
                                if x <= threshold:
                                    step_grad = step_grad * _sigmoid(x, one)
                            du[b, t, dd] = s_step[t_local, ln] * gB + Dskip[dd] * dy
                            ddelta[b, t, dd] = step_grad
                            dD_sum += dy * value
                            dbias_sum += step_grad
                            if has_z:
                                gate = z[b, t, dd]
                                sig = _sigmoid(gate, one)
                                y += Dskip[dd] * value
                                dz[b, t, dd] = dout[b, t, dd] * y * sig * (one + gate * (one - sig))
                        else:
                            du[b, t, dd] = gB
                            ddelta[b, t, dd] = gAh
                            if has_z:
                                dz[b, t, dd] = y
                for r in range(STATE_ROWS):
                    index = _u32(tid + r * THREADS)
                    t_local = index // NP
                    nl = index % NP
                    t = _u32(t_first + t_local)
                    n = _u32(group * NP + nl)
                    if index < CH * NP and t < T and n < N:
                        cuda.atomic.add(dBm, (batch, t, n), s_dBC[0, t_local, nl])
                        cuda.atomic.add(dCm, (batch, t, n), s_dBC[1, t_local, nl])

            for j in range(NPT):
                n = group * NP + nt * NPT + j
                if d_ok and n < N:
                    cuda.atomic.add(dA, (d, n), dA_sum[j])

        dd = d_first + tid % DG
        if dd < channels:
            cuda.atomic.add(dD, dd, dD_sum)
            cuda.atomic.add(dbias, dd, dbias_sum)

    return backward_kernel


if cuda is not None:
    @cuda.jit(device=True)
    def _stage_output_grad(dout, z, s_dy, s_dBC, s_sums, batch, t_first, d_first,
                           has_z, zero_sums, zero, one, threads):
        """dy = dout · SiLU(z) (or dout) for one chunk into shared memory; with zero_sums, zero the
        chunk's sums (the atomics add into them; the warp sums store every element instead).
        threads: the block's size, a compile-time constant (the loops are then unrolled)."""
        tid = cuda.threadIdx.x
        CH = s_dy.shape[0]
        DG = s_dy.shape[1]
        NP = s_dBC.shape[2]
        T = dout.shape[1]
        channels = dout.shape[2]
        for r in range((CH * DG + threads - 1) // threads):
            index = _u32(tid + r * threads)
            t_local = index // DG
            ln = index % DG
            t = _u32(t_first + t_local)
            dd = _u32(d_first + ln)
            dy = zero
            if index < CH * DG and t < T and dd < channels:
                dy = dout[batch, t, dd]
                if has_z:
                    gate = z[batch, t, dd]
                    dy = dy * gate * _sigmoid(gate, one)
            if index < CH * DG:
                s_dy[t_local, ln] = dy
                if zero_sums:
                    for which in range(3):
                        s_sums[which, 0, t_local, ln] = zero
        if zero_sums:
            for r in range((CH * NP + threads - 1) // threads):
                index = _u32(tid + r * threads)
                if index < CH * NP:
                    s_dBC[0, index // NP, index % NP] = zero
                    s_dBC[1, index // NP, index % NP] = zero


# ----------------------------------------------------------------------------------------------
# host wrappers

def _dtype_name(array):
    return np.dtype(array.dtype).name


def _flat(array):
    """A 1-D view of a C-contiguous device array (the kernels index B and C with their own strides)."""
    return array.reshape(array.size)


@_device.in_one_context
def forward(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, delta_softplus=False, chunk_size=64,
            initial_state=None, return_state=False):
    """Selective scan on the GPU; same arguments and results as minilm.ops.selective_scan.forward.

    u, delta: (B, T, D); A: (D, N); Bm, Cm: (B, T, N); D, delta_bias: (D,) or None; z: (B, T, D) or
    None; initial_state: (B, D, N) or None. NumPy arrays or CUDA arrays (Numba, CuPy, PyTorch), all
    float32 (fast) or all float64; results come back in the kind of u. chunk_size is accepted for
    signature compatibility: the kernels use their own chunk (ScanConfig). Returns (out, cache) or
    ((out, final_state), cache) with return_state. Gradients do not flow into initial_state.
    """
    kind = _device.array_kind(u)
    u_d = _device.to_device("u", u)
    dtype = u_d.dtype
    name = _dtype_name(u_d)
    config = CONFIGS[name].check()
    delta_d = _device.to_device("delta", delta)
    A_d = _device.to_device("A", A)
    B_d = _device.to_device("Bm", Bm)
    C_d = _device.to_device("Cm", Cm)
    for label, array in (("delta", delta_d), ("A", A_d), ("Bm", B_d), ("Cm", C_d)):
        if array.dtype != dtype:
            raise TypeError(f"{label} must have the same dtype as u ({dtype}), got {array.dtype}")
    batch, T, channels = u_d.shape
    _device.check_grid_axis("u", "batch entries", batch)
    N = A_d.shape[1]
    D_d = _device.to_device("D", D) if D is not None else _device.placeholder((channels,), dtype)
    bias_d = _device.to_device("delta_bias", delta_bias) if delta_bias is not None \
        else _device.placeholder((channels,), dtype)
    z_d = _device.to_device("z", z) if z is not None else _device.placeholder((1, 1, 1), dtype)
    h0_d = _device.to_device("initial_state", initial_state) if initial_state is not None \
        else _device.placeholder((1, 1, 1), dtype)

    n_chunks = -(-T // config.chunk)
    out = _device.empty((batch, T, channels), dtype, kind)
    # states last: the forward's fold threads (consecutive states of a channel) store them coalesced
    carries = _device.empty((batch, n_chunks, channels, N), dtype, kind)
    final_state = _device.empty((batch, channels, N), dtype, kind)
    kernel, threads = _forward_kernel(dtype, config, N)
    grid = (-(-channels // config.channels), batch)
    if batch and channels:      # a CUDA grid cannot be empty; an empty input has nothing to compute
        kernel[grid, threads](u_d, delta_d, A_d, _flat(B_d), _flat(C_d), D_d, z_d, bias_d, h0_d, out, carries,
                              final_state,
                              int(z is not None), int(initial_state is not None), int(bool(delta_softplus)))

    cache = {"backend": "cuda", "kind": kind, "config": config,
             "u": u_d, "delta": delta_d, "A": A_d, "Bm": B_d, "Cm": C_d, "D": D_d, "z": z_d,
             "delta_bias": bias_d, "carries": carries, "delta_softplus": bool(delta_softplus),
             "has_D": D is not None, "has_z": z is not None, "has_delta_bias": delta_bias is not None}
    out_user = _device.from_device(out, kind)
    if return_state:
        return (out_user, _device.from_device(final_state, kind)), cache
    return out_user, cache


@_device.in_one_context
def backward(dout, cache):
    """Gradients (du, ddelta, dA, dBm, dCm, dD, dz, ddelta_bias), None where the input was None.

    dout: (B, T, D) like the forward's u; results come back in the kind of dout.
    """
    kind = _device.array_kind(dout)
    dout_d = _device.to_device("dout", dout)
    u_d = cache["u"]
    if tuple(dout_d.shape) != tuple(u_d.shape):
        raise ValueError(f"dout must have shape {tuple(u_d.shape)}, got {tuple(dout_d.shape)}")
    if dout_d.dtype != u_d.dtype:
        raise TypeError(f"dout must have dtype {u_d.dtype}, got {dout_d.dtype}")
    dtype = u_d.dtype
    config = cache["config"]
    batch, T, channels = u_d.shape
    N = cache["A"].shape[1]

    du = _device.empty((batch, T, channels), dtype, kind)
    ddelta = _device.empty((batch, T, channels), dtype, kind)
    dz = _device.empty((batch, T, channels), dtype, kind) if cache["has_z"] else _device.placeholder((1, 1, 1), dtype)
    # the sums the kernel adds into with atomics
    dA, dBm, dCm, dD, dbias = _device.zeros_together(
        [(channels, N), (batch, T, N), (batch, T, N), (channels,), (channels,)], dtype, kind)
    kernel, threads = _backward_kernel(dtype, config, N)
    grid = (-(-channels // config.channels), batch)
    if batch and channels:      # as in the forward: nothing to compute, and the sums stay zero
        kernel[grid, threads](dout_d, u_d, cache["delta"], cache["A"], _flat(cache["Bm"]), _flat(cache["Cm"]),
                              cache["D"],
                              cache["z"], cache["delta_bias"], cache["carries"],
                              du, ddelta, dz, dA, dBm, dCm, dD, dbias,
                              int(cache["has_z"]), int(cache["delta_softplus"]))

    def back(array, present=True):
        return _device.from_device(array, kind) if present else None

    return (back(du), back(ddelta), back(dA), back(dBm), back(dCm), back(dD, cache["has_D"]),
            back(dz, cache["has_z"]), back(dbias, cache["has_delta_bias"]))
