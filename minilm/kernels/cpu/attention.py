"""Softmax attention on the CPU, flash style: tiles, online softmax, O(T·D) memory.

Shapes: B batch, H heads, Tq query positions, Tk key positions, Dk key/query dim, Dv value dim.

    q (B, H, Tq, Dk)    k (B, H, Tk, Dk)    v (B, H, Tk, Dv)    out (B, H, Tq, Dv)    lse (B, H, Tq)

Same function as minilm.ops.attention (the NumPy reference, which materializes the Tq×Tk matrix), but
the queries are cut into tiles of BQ rows and the keys into tiles of BK rows, and only one BQ×BK block
of logits exists at a time.

Forward, for one query tile Q_i and the key tiles K_j, V_j it can see (online softmax):

    S     = scale · Q_i K_jᵀ                         (BQ, BK), masked entries dropped
    m_new = max(m, rowmax(S))                         running row max
    P     = exp(S − m_new)                            every exponent <= 0
    l     = l · exp(m − m_new) + rowsum(P)            running row sum, rescaled to the new max
    acc   = acc · exp(m − m_new) + P V_j              running numerator
    out   = acc / l,    lse = m + log(l)              after the last key tile

Backward (the probabilities are recomputed tile by tile from the saved lse, never stored):

    D     = rowsum(dout ∘ out)                       (B, H, Tq), once, first
    P     = exp(scale · Q_i K_jᵀ − lse_i)
    dV_j += Pᵀ dout_i,    dP = dout_i V_jᵀ,    dS = P ∘ (dP − D_i)
    dK_j += scale · dSᵀ Q_i,    dQ_i += scale · dS K_j

Causal alignment (as the op): the queries are the last Tq of the Tk positions, so query i sees keys
0 .. Tk − Tq + i. Key tiles that no query of a tile can see are skipped (about half the work at
Tq = Tk); only the tiles on the diagonal apply an element mask.

Parallel layout (numba prange, no two iterations write the same memory):
  forward   over (batch, head, query tile); tiles are ordered heavy/light alternately so that the
            static split between threads gets equal causal work.
  backward  over (batch, head, key-tile group): a group owns its key tiles' dK, dV outright and adds
            dQ into its own partial buffer; the partials are summed at the end. There are only as many
            groups per head as are needed to keep every thread busy (one when B·H is a multiple of the
            thread count), so the extra dQ memory is at most threads × Tq × Dk.

Memory: O(B·H·T·D) (out, lse, the dQ partials and tile buffers); no Tq×Tk array is ever allocated.
Time: O(B·H·Tq·Tk·(Dk + Dv)), halved by the causal tile skip.

Numerics: the products are BLAS matmuls in the input dtype (np.dot inside njit). For float32 the
exponentials use `_exp_tile_f32` below, a Cody–Waite range reduction plus a degree-6 polynomial
(relative error below 1e-7) written so that LLVM vectorizes it — the C library's expf is scalar and
would cost as much as the matmuls. float64 uses math.exp. The only fastmath flag anywhere is
"contract" (fused multiply-add) on that polynomial.

Also here: attention_decode, one query over the first `length` positions of a KV cache.
"""
import math

import numba
import numpy as np
from numba import njit, prange
from numba.extending import overload

BQ = 64  # query rows per tile
BK = 64  # key rows per tile


def available():
    """(ok, reason): the Numba CPU kernels run wherever numba imports."""
    return True, ""


def supports(causal=True, scale=None, **unused):
    """(ok, reason) for an option set; every option of the op is supported."""
    return True, ""


# ----------------------------------------------------------------------------------------------
# P = exp(S − shift) over a tile, in place, vectorizable in float32

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375          # ln 2 split in two so that k·LN2_HI is exact (Cody–Waite)
_LN2_LO = -2.12194440e-4
_ROUND = 12582912.0            # 1.5·2^23: adding and subtracting it rounds a float32 to an integer
_EXP_LO = -87.0                # exp underflows float32's normal range below this: clamp there
_EXP_HI = 88.0                 # and overflows above this


def exp_shifted_inplace(tile, shift):
    """tile[c, r] = exp(tile[c, r] − shift[r]) for a key-major tile (cols, rows) and shift (rows,).

    Plain-Python version, for reading; inside the kernels the overload below picks _exp_tile_f32
    (float32) or _exp_tile_generic (float64).
    """
    tile[...] = np.exp(tile - shift[None, :])


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _exp_tile_f32(tile, shift):
    """exp(x) = 2^k · exp(f),  k = round(x·log2 e),  f = x − k·ln 2 ∈ [−ln2/2, ln2/2].

    exp(f) is a degree-6 polynomial (Cephes expf coefficients, relative error below 1e-7); 2^k is
    written straight into the exponent bits of a float32, (k + 127) << 23, through an int32 scratch
    tile viewed as float32. Arguments are clamped to [−87, 88], so 2^k stays a normal float: below −87 the
    result is ~1e-38 instead of smaller (negligible next to a row whose max contributes 1), and
    masked entries, which callers zero afterwards, cannot overflow. Each loop reads and writes one
    position of each array, so LLVM vectorizes it; fastmath is limited to "contract" (fused
    multiply-adds in the polynomial: one rounding instead of two, the error stays below 1e-7).
    """
    cols, rows = tile.shape
    bits = np.empty((cols, rows), dtype=np.int32)
    lo = np.float32(_EXP_LO)
    hi = np.float32(_EXP_HI)
    for c in range(cols):
        for r in range(rows):
            x = np.minimum(np.maximum(tile[c, r] - shift[r], lo), hi)   # np.* vectorize, min/max do not
            k = (x * np.float32(_LOG2E) + np.float32(_ROUND)) - np.float32(_ROUND)
            f = x - k * np.float32(_LN2_HI) - k * np.float32(_LN2_LO)
            p = np.float32(1.9875691500e-4)
            p = p * f + np.float32(1.3981999507e-3)
            p = p * f + np.float32(8.3334519073e-3)
            p = p * f + np.float32(4.1665795894e-2)
            p = p * f + np.float32(1.6666665459e-1)
            p = p * f + np.float32(5.0000001201e-1)
            tile[c, r] = p * (f * f) + f + np.float32(1.0)
            bits[c, r] = (np.int32(k) + np.int32(127)) << np.int32(23)
    two_to_k = bits.view(np.float32)
    for c in range(cols):
        for r in range(rows):
            tile[c, r] *= two_to_k[c, r]


@njit(cache=True)
def _exp_tile_generic(tile, shift):
    for c in range(tile.shape[0]):
        for r in range(tile.shape[1]):
            tile[c, r] = math.exp(tile[c, r] - shift[r])


@overload(exp_shifted_inplace)
def _exp_shifted_overload(tile, shift):
    if tile.dtype == numba.types.float32:
        return lambda tile, shift: _exp_tile_f32(tile, shift)
    return lambda tile, shift: _exp_tile_generic(tile, shift)


# ----------------------------------------------------------------------------------------------
# helpers shared by the kernels (explicit loops: cheap to compile, no temporaries)

@njit(cache=True)
def _balanced_tile(p, n_tiles):
    """The p-th tile in the order 0, n−1, 1, n−2, ...: neighbours pair a light causal tile with a
    heavy one, so a contiguous static split of the iterations gives equal work."""
    half = p // 2
    return half if p % 2 == 0 else n_tiles - 1 - half


@njit(cache=True)
def _first_visible_row(key, i0, rows, offset, causal):
    """Rows i0 + r of a query tile see key `key` for r >= the returned value (in 0 .. rows).

    Causal: query i sees key j when j <= i + offset, i.e. i >= j − offset.
    """
    if not causal:
        return 0
    return min(max(key - offset - i0, 0), rows)


@njit(cache=True)
def _scaled_copy(x, factor):
    """factor · x for a 2-D block, as a fresh contiguous array."""
    out = np.empty(x.shape, dtype=x.dtype)
    for r in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[r, c] = x[r, c] * factor
    return out


@njit(cache=True)
def _add_product(acc, a, b, row0):
    """acc[row0 + r] += (a @ b)[r]: one BLAS product, accumulated."""
    prod = np.dot(a, b)
    for r in range(prod.shape[0]):
        for c in range(prod.shape[1]):
            acc[row0 + r, c] += prod[r, c]


@njit(cache=True)
def _store_rows(dst, src, row0):
    """dst[row0 + r] = src[r]."""
    for r in range(src.shape[0]):
        for c in range(src.shape[1]):
            dst[row0 + r, c] = src[r, c]


# ----------------------------------------------------------------------------------------------
# forward

@njit(cache=True)
def _forward_tile(q, k, v, scale, causal, block_q, block_k, i0, out, lse):
    """One query tile of one head: rows i0 .. i0+block_q, over the key tiles they can see.

    q (Tq, Dk), k (Tk, Dk), v (Tk, Dv), out (Tq, Dv), lse (Tq,) are one head's slices.
    The logits are formed key-major, Sᵀ = K Qᵀ (cols, rows): the row max and row sum over keys then
    become elementwise updates of a vector of queries, which vectorize (a reduction along a row
    would not, without fastmath).
    """
    Tq, Tk, Dv = q.shape[0], k.shape[0], v.shape[1]
    offset = Tk - Tq
    i1 = min(i0 + block_q, Tq)
    rows = i1 - i0

    q_tile = _scaled_copy(q[i0:i1], scale)            # (rows, Dk), the scale folded in once
    m = np.full(rows, -np.inf, dtype=q.dtype)         # running row max
    m_new = np.empty(rows, dtype=q.dtype)
    l = np.zeros(rows, dtype=q.dtype)                 # running row sum of exp
    acc = np.zeros((rows, Dv), dtype=q.dtype)         # running numerator

    key_end = min(Tk, i1 + offset) if causal else Tk  # keys after the last row's view are skipped
    for j0 in range(0, key_end, block_k):
        j1 = min(j0 + block_k, key_end)
        cols = j1 - j0
        diagonal = causal and j1 - 1 > i0 + offset    # some (row, key) pairs of this tile are masked
        s_t = np.dot(k[j0:j1], q_tile.T)              # Sᵀ (cols, rows); becomes Pᵀ in place
        for r in range(rows):
            m_new[r] = m[r]
        for c in range(cols):
            # full-range loops vectorize; a variable start (diagonal tiles only) does not
            r0 = _first_visible_row(j0 + c, i0, rows, offset, causal) if diagonal else 0
            for r in range(r0, rows):
                m_new[r] = np.maximum(m_new[r], s_t[c, r])   # np.maximum vectorizes, builtin max not
        for r in range(rows):
            if m_new[r] != m[r]:                      # the max moved: rescale what was summed so far
                rescale = math.exp(m[r] - m_new[r])   # exp(-inf) = 0 on the first tile
                l[r] *= rescale
                for d in range(Dv):
                    acc[r, d] *= rescale
                m[r] = m_new[r]
        exp_shifted_inplace(s_t, m)
        for c in range(cols):
            if diagonal:
                for r in range(_first_visible_row(j0 + c, i0, rows, offset, causal)):
                    s_t[c, r] = 0.0                   # masked
            for r in range(rows):
                l[r] += s_t[c, r]
        _add_product(acc, s_t.T, v[j0:j1], 0)         # acc += P V
    for r in range(rows):
        for d in range(Dv):
            out[i0 + r, d] = acc[r, d] / l[r]
        lse[i0 + r] = m[r] + math.log(l[r])


@njit(parallel=True, cache=True)
def _forward_kernel(q, k, v, scale, causal, block_q, block_k, out, lse):
    """out, lse for all (b, h, query tile) in parallel; see the module docstring for the equations."""
    B, H, Tq, _ = q.shape
    n_qt = (Tq + block_q - 1) // block_q
    for task in prange(B * H * n_qt):
        b = task // (H * n_qt)
        h = (task // n_qt) % H
        i0 = _balanced_tile(task % n_qt, n_qt) * block_q
        _forward_tile(q[b, h], k[b, h], v[b, h], scale, causal, block_q, block_k, i0, out[b, h], lse[b, h])


def _contiguous(x):
    return np.ascontiguousarray(x)


def forward(q, k, v, causal=True, scale=None, *, block_q=None, block_k=None):
    """Flash-style softmax attention; same contract as minilm.ops.attention.forward.

    q: (B, H, Tq, Dk); k: (B, H, Tk, Dk); v: (B, H, Tk, Dv); one float dtype; already validated
    (causal needs Tq <= Tk). scale None means 1/sqrt(Dk). block_q, block_k override the tile sizes
    BQ, BK (tests use small tiles to exercise ragged edges).

    Returns out (B, H, Tq, Dv) and a cache dict:
        backend  "numba"
        q, k, v  the inputs (contiguous)
        out      the output, lse (B, H, Tq) the per-row log-sum-exp (all the backward needs)
        causal, scale, block_q, block_k
    """
    q, k, v = _contiguous(q), _contiguous(k), _contiguous(v)
    B, H, Tq, Dk = q.shape
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    block_q = BQ if block_q is None else int(block_q)
    block_k = BK if block_k is None else int(block_k)
    out = np.empty((B, H, Tq, v.shape[3]), dtype=q.dtype)
    lse = np.empty((B, H, Tq), dtype=q.dtype)
    _forward_kernel(q, k, v, q.dtype.type(scale), bool(causal), block_q, block_k, out, lse)
    cache = {"backend": "numba", "q": q, "k": k, "v": v, "out": out, "lse": lse,
             "causal": bool(causal), "scale": scale, "block_q": block_q, "block_k": block_k}
    return out, cache


# ----------------------------------------------------------------------------------------------
# backward

@njit(cache=True)
def _backward_key_tile(q_scaled, k, v, dout, lse, delta, causal, block_q, block_k, j0, dq_acc, dk, dv):
    """One key tile of one head: keys j0 .. j0+block_k, against every query tile that sees them.

    Arrays are one head's slices: q_scaled (Tq, Dk), k (Tk, Dk), v (Tk, Dv), dout (Tq, Dv), lse and
    delta (Tq,). Writes dk, dv for these keys and adds dq / scale into dq_acc (Tq, Dk). Blocks are
    key-major (cols, rows), as in the forward.
    """
    Tq, Dk = q_scaled.shape
    Tk, Dv = k.shape[0], v.shape[1]
    offset = Tk - Tq
    j1 = min(j0 + block_k, Tk)
    cols = j1 - j0
    k_tile = k[j0:j1]
    v_tile = v[j0:j1]
    dk_acc = np.zeros((cols, Dk), dtype=k.dtype)
    dv_acc = np.zeros((cols, Dv), dtype=v.dtype)

    first_row = max(j0 - offset, 0) if causal else 0  # the first query that sees key j0
    for i0 in range((first_row // block_q) * block_q, Tq, block_q):
        i1 = min(i0 + block_q, Tq)
        rows = i1 - i0
        q_tile = q_scaled[i0:i1]
        do_tile = dout[i0:i1]
        p_t = np.dot(k_tile, q_tile.T)                # Sᵀ (cols, rows), then Pᵀ in place
        exp_shifted_inplace(p_t, lse[i0:i1])
        if causal and j1 - 1 > i0 + offset:           # a diagonal tile: zero the masked pairs
            for c in range(cols):
                for r in range(_first_visible_row(j0 + c, i0, rows, offset, causal)):
                    p_t[c, r] = 0.0
        _add_product(dv_acc, p_t, do_tile, 0)         # dV += Pᵀ dout
        ds_t = np.dot(v_tile, do_tile.T)              # dPᵀ, then dSᵀ in place
        for c in range(cols):
            for r in range(rows):
                ds_t[c, r] = p_t[c, r] * (ds_t[c, r] - delta[i0 + r])
        _add_product(dk_acc, ds_t, q_tile, 0)         # dK += dSᵀ (scale·Q)
        _add_product(dq_acc, ds_t.T, k_tile, i0)      # dQ += dS K   (times scale at the end)
    _store_rows(dk, dk_acc, j0)
    _store_rows(dv, dv_acc, j0)


@njit(parallel=True, cache=True)
def _backward_kernel(q_scaled, k, v, dout, lse, delta, causal, block_q, block_k, n_groups,
                     dq_partial, dk, dv):
    """dk, dv, and dq partials for all (b, h, key-tile group) in parallel.

    q_scaled = scale·q, formed as in the forward so the recomputed logits match; delta = rowsum(dout ∘ out).
    Group g of a head owns key tiles g, g + n_groups, g + 2·n_groups, ... and adds into
    dq_partial[g, b, h] only, so no two iterations write the same memory.
    """
    B, H = q_scaled.shape[0], q_scaled.shape[1]
    n_kt = (k.shape[2] + block_k - 1) // block_k
    for task in prange(B * H * n_groups):
        b = task // (H * n_groups)
        h = (task // n_groups) % H
        group = task % n_groups
        for jt in range(group, n_kt, n_groups):
            _backward_key_tile(q_scaled[b, h], k[b, h], v[b, h], dout[b, h], lse[b, h], delta[b, h], causal,
                               block_q, block_k, jt * block_k, dq_partial[group, b, h], dk[b, h], dv[b, h])


def _n_key_groups(B, H, n_key_tiles):
    """Key-tile groups per head: enough that B·H·groups is a multiple of the thread count."""
    threads = numba.get_num_threads()
    groups = threads // math.gcd(B * H, threads)
    return max(1, min(groups, n_key_tiles))


def backward(dout, cache):
    """(dq, dk, dv) from dout (B, H, Tq, Dv) and the forward's cache; shapes of q, k, v."""
    q, k, v, out, lse = cache["q"], cache["k"], cache["v"], cache["out"], cache["lse"]
    causal, scale = cache["causal"], cache["scale"]
    block_q, block_k = cache["block_q"], cache["block_k"]
    dout = _contiguous(dout).astype(q.dtype, copy=False)
    B, H, Tq, Dk = q.shape
    Tk = k.shape[2]

    delta = np.einsum("bhtd,bhtd->bht", dout, out)                 # D_i = rowsum(dout ∘ out), first
    q_scaled = q * q.dtype.type(scale)
    n_groups = _n_key_groups(B, H, (Tk + block_k - 1) // block_k)
    dq_partial = np.zeros((n_groups, B, H, Tq, Dk), dtype=q.dtype)
    dk = np.empty_like(k)
    dv = np.empty_like(v)
    _backward_kernel(q_scaled, k, v, dout, lse, delta, causal, block_q, block_k, n_groups,
                     dq_partial, dk, dv)
    dq = dq_partial[0] if n_groups == 1 else dq_partial.sum(axis=0)
    dq *= q.dtype.type(scale)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# one decoding step over a KV cache

@njit(cache=True)
def _decode_head(q_t, k_cache, v_cache, length, scale, out):
    """One head: q_t (Dk,), caches (Tmax, D), out (Dv,). Two passes over the valid keys."""
    Dk, Dv = q_t.shape[0], v_cache.shape[1]
    logits = np.empty(length)                         # float64: one row, accuracy for free
    m = -np.inf
    for j in range(length):
        s = 0.0
        for d in range(Dk):
            s += q_t[d] * k_cache[j, d]
        logits[j] = scale * s
        m = max(m, logits[j])
    total = 0.0
    mixed = np.zeros(Dv)
    for j in range(length):
        w = math.exp(logits[j] - m)
        total += w
        for c in range(Dv):
            mixed[c] += w * v_cache[j, c]
    for c in range(Dv):
        out[c] = mixed[c] / total


@njit(parallel=True, cache=True)
def _decode_kernel(q_t, k_cache, v_cache, length, scale, out):
    B, H = q_t.shape[0], q_t.shape[1]
    for task in prange(B * H):
        b = task // H
        h = task % H
        _decode_head(q_t[b, h], k_cache[b, h], v_cache[b, h], length, scale, out[b, h])


def attention_decode(q_t, k_cache, v_cache, length, scale=None):
    """Attention of one new query over the first `length` cached keys and values.

    q_t: (B, H, Dk); k_cache: (B, H, Tmax, Dk); v_cache: (B, H, Tmax, Dv); 1 <= length <= Tmax.
    Equals minilm.ops.attention.forward with Tq = 1 on k_cache[:, :, :length] (the one query is the
    last position, so it sees every valid key). scale None means 1/sqrt(Dk).
    Returns out_t (B, H, Dv) in the input dtype. Time O(B·H·length·(Dk + Dv)).
    """
    length = int(length)
    if not 1 <= length <= k_cache.shape[2]:
        raise ValueError(f"length must be in [1, {k_cache.shape[2]}] (the cache size), got {length}")
    q_t, k_cache, v_cache = _contiguous(q_t), _contiguous(k_cache), _contiguous(v_cache)
    scale = 1.0 / math.sqrt(q_t.shape[-1]) if scale is None else float(scale)
    out = np.empty((q_t.shape[0], q_t.shape[1], v_cache.shape[3]), dtype=q_t.dtype)
    _decode_kernel(q_t, k_cache, v_cache, length, q_t.dtype.type(scale), out)
    return out
