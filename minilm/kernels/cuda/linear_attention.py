"""Chunked causal linear attention on a GPU: numba.cuda kernels for the forward and the backward.

Shapes: B batch, H heads, T time, Dk query/key dim, Dv value dim; C the chunk length (= TILE).

    q, k: (B, H, T, Dk)     v, out: (B, H, T, Dv)     log_decay g: None, (H,) or (B, H, T), g <= 0
    state S: (B, H, Dk, Dv)

The function is the NumPy reference's (minilm.ops.linear_attention) for normalize=False, causal=True:

    S_t   = exp(g_t) S_{t-1} + φ(k_t)ᵀ v_t        S_{-1} = initial_state (zeros by default)
    out_t = scale · φ(q_t)ᵀ S_t                   φ ∈ identity | elu1 | relu

Chunked form. Cut time into chunks of C steps; inside chunk c write Γ_t = Σ_{r ≤ t, r in c} g_r for the
decay accumulated since the chunk began, Γ_end for its value at the chunk's last step, and S_c for
the state entering the chunk. Then, for t in chunk c,

    out_t   = scale · ( exp(Γ_t) φ(q_t) S_c  +  Σ_{s ≤ t in c} exp(Γ_t − Γ_s) (φ(q_t)·φ(k_s)) v_s )    output_kernel
    S_{c+1} = exp(Γ_end) S_c + ΔS_c,     ΔS_c = Σ_{s in c} exp(Γ_end − Γ_s) φ(k_s)ᵀ v_s               outer_kernel
                                                                                   (scan: chunk_scan_kernel)

Backward, with dO = dL/dout and G_c = dL/dS_{c+1}, the gradient of the state leaving chunk c:

    G_c     = exp(Γ_end,c+1) G_{c+1} + ΔG_{c+1},  ΔG_c = scale Σ_{t in c} exp(Γ_t) φ(q_t)ᵀ dO_t,  G_last = 0
    dP_ts   = scale · exp(Γ_t − Γ_s) (dO_t · v_s)  for s ≤ t  (0 above the diagonal)
    A_ts    = scale · exp(Γ_t − Γ_s) (φ(q_t) · φ(k_s)) for s ≤ t
    dφ(q_t) = Σ_s dP_ts φ(k_s)  +  scale exp(Γ_t) S_c dO_t                                            dq_kernel
    dφ(k_s) = Σ_t dP_ts φ(q_t)  +  exp(Γ_end − Γ_s) G_c v_s                                           dk_kernel
    dv_s    = Σ_t A_ts dO_t     +  exp(Γ_end − Γ_s) G_cᵀ φ(k_s)                                       dv_kernel
    dq = dφ(q) ⊙ φ'(q),  dk = dφ(k) ⊙ φ'(k)
    dlog_decay: ∂L/∂b_t = φ(q_t)·dφ(q_t) − φ(k_t)·dφ(k_t) with b the running sum of g over the whole
                sequence, and ∂L/∂g_r = Σ_{t ≥ r} ∂L/∂b_t                                            decay_grad_kernel

Kernels (built by _make_kernels for each dtype and tile size; C = TILE): one block per
(batch·head, chunk, output tile) for the work inside a chunk (outer_kernel, output_kernel,
dq_kernel, dk_kernel, dv_kernel), with C × TILE operand tiles in shared memory and each thread
accumulating a REG × REG register tile of the product with float FMAs (_tile_mma), or, with
TENSOR_CORES set (float32), each warp a 16 × 32 part of it with TF32 tensor-core mma (plain TF32,
or 3xTF32 for close to float32 accuracy; _tensor_cores.py); chunk states by a scan over chunks
(chunk_scan_kernel), one thread per state entry, in place. The states entering every chunk,
(B, H, n_chunks, Dk, Dv), are kept in the cache for the backward (the backward's G_c are built the
same way); no T × T matrix and no per-token state is ever formed. The backward keeps each chunk's
C × C block of dP ⊙ M (T × C per batch and head): dq_kernel computes and stores it, dk_kernel reads
it back transposed instead of computing dO Vᵀ a second time. The math is in the input dtype
(float32: the speed path), with no fast-math flags. Gradients do not flow into initial_state or out
of the final state.

Not supported here (supports() says so and the op falls back to NumPy): causal=False,
normalize=True, feature_map="taylor2".

Public API (inputs already validated by minilm.ops.linear_attention; NumPy arrays or CUDA arrays):
    available() -> (ok, reason); supports(**options) -> (ok, reason)
    forward(q, k, v, causal=True, chunk_size=64, feature_map="identity", scale=None, normalize=False,
            log_decay=None, initial_state=None, return_state=False) -> (out, cache)
    backward(do, cache) -> (dq, dk, dv) or (dq, dk, dv, dlog_decay)
"""
import math

import numpy as np

from minilm.kernels.cuda import _device
from minilm.kernels.cuda._device import cuda
from minilm.kernels.cuda._tensor_cores import mma_tf32, tf32
from minilm.kernels.cuda._tiles import tile_element

try:
    from numba import uint32 as _u32
except Exception:  # pragma: no cover - numba missing: available() says so
    _u32 = None

FEATURE_MAPS = {"identity": 0, "elu1": 1, "relu": 2}
DECAY_NONE, DECAY_PER_HEAD, DECAY_PER_STEP = 0, 1, 2

# Tile edge = chunk length, per dtype (float64 tiles take twice the shared memory), and the edge of
# the register tile each thread accumulates (REG × REG outputs): a block has (TILE / REG)^2 threads.
TILES = {"float32": 64, "float64": 32}
REGS = {"float32": 4, "float64": 4}
# Launch bounds of the tile kernels, per dtype: blocks per multiprocessor to leave room for (0: none).
# With 64-step tiles and 4 × 4 register tiles, 4 keeps every tile kernel at 64 registers with
# nothing spilled: 32 resident warps (sm_90, bench/cuda_registers.py). On an H200 each tile kernel
# ran 3-11 % faster than with 3 (80 registers, 24 warps; docs/kernels.md, seventh run).
MIN_BLOCKS = {"float32": 4, "float64": 0}
# The tile products on float FMAs ("off"), or on tensor cores: "tf32" (inputs rounded to 10 mantissa
# bits, relative errors near 1e-3, as Triton's default for float32 dot products) or "3xtf32" (each
# input split in two TF32 parts, three mma: close to float32). float32 only; tiles a multiple of 16.
# Off by default: FMAs compute in plain float32 and run on every CUDA GPU (the mma needs sm_80). On
# an H200 (docs/kernels.md, sixth run) the forward at L=16K took 1.13 ms on FMAs, 1.15 on 3xTF32 and
# 0.93 on TF32; bench/gpu_check.py sweeps them.
TENSOR_CORES = {"float32": "off", "float64": "off"}
LAYOUTS = {"off": 0, "tf32": 1, "3xtf32": 2}       # the `layout` argument of _tile_mma
# Elements of a tile one thread loads before storing them to shared memory (_load_tile), per dtype:
# the loads in flight per thread. 1 is the plain loop (on an H200 it left the tile kernels at a
# seventh of copy bandwidth); under the launch bounds (sm_90) 4 spills nothing, 8 spills in three of
# the five kernels.
LOADS = {"float32": 4, "float64": 4}
SCAN_THREADS = 256     # threads per block of the chunk scan and of the decay-gradient kernel
# Chunks whose increments the chunk scan loads before folding them in: the loads in flight per thread.
# The scan reads and writes 4 bytes per state entry and chunk, a warp-wide load per 32 entries: at
# 8, a multiprocessor's ~31 warps (B=2 H=16 d=64) keep ~32 KB in flight, about what 4.2 TB/s over
# 132 of them needs at ~0.8 µs of latency. On an H200 at L=16K: 0.098 ms with 8 (eighth run, 66 % of
# copy bandwidth), 0.10-0.20 ms with 4 (fourth to sixth runs).
SCAN_UNROLL = 8


def set_tile(dtype, tile, reg=None, min_blocks=None, tensor_cores=None, loads=None):
    """Change the tile (= chunk length), and optionally the register tile, the launch bounds
    (MIN_BLOCKS), the tensor-core mode (TENSOR_CORES) and the loads in flight per thread (LOADS),
    used for `dtype`.

    tile must be a multiple of 4 and of reg (of 16 on tensor cores). Returns the previous
    (tile, reg, min_blocks, tensor_cores, loads).
    """
    reg = REGS[dtype] if reg is None else reg
    min_blocks = MIN_BLOCKS[dtype] if min_blocks is None else min_blocks
    tensor_cores = TENSOR_CORES[dtype] if tensor_cores is None else tensor_cores
    loads = LOADS[dtype] if loads is None else loads
    if tile % reg or tile % 4 or tile < reg:
        raise ValueError(f"tile must be a positive multiple of 4 and of reg={reg}, got {tile}")
    if not isinstance(loads, int) or loads < 1:
        raise ValueError(f"loads must be a positive int, got {loads!r}")
    if tensor_cores not in LAYOUTS:
        raise ValueError(f"tensor_cores must be one of {sorted(LAYOUTS)}, got {tensor_cores!r}")
    if tensor_cores != "off" and (dtype != "float32" or tile % 16):
        raise ValueError(f"tensor cores need float32 and a tile that is a multiple of 16, got {dtype}, {tile}")
    previous = TILES[dtype], REGS[dtype], MIN_BLOCKS[dtype], TENSOR_CORES[dtype], LOADS[dtype]
    TILES[dtype], REGS[dtype], MIN_BLOCKS[dtype], TENSOR_CORES[dtype], LOADS[dtype] = \
        tile, reg, min_blocks, tensor_cores, loads
    return previous


def available():
    """(ok, reason): whether numba.cuda can run these kernels here (a GPU, or the simulator)."""
    return _device.available()


def supports(causal=True, normalize=False, feature_map="identity", **options):
    """(ok, reason) for a set of forward options."""
    if not causal:
        return False, "the CUDA kernels implement causal linear attention only (causal=False is NumPy-only)"
    if normalize:
        return False, "the CUDA kernels do not implement normalize=True (use the NumPy or Numba backend)"
    if feature_map not in FEATURE_MAPS:
        return False, f"the CUDA kernels support feature_map in {sorted(FEATURE_MAPS)}, got {feature_map!r}"
    return True, ""


# ----------------------------------------------------------------------------------------------
# device functions

if cuda is not None:
    @cuda.jit(device=True)
    def _feature(x, fmap, one):
        """φ(x): identity (0), elu(x) + 1 (1), relu (2)."""
        if fmap == 1:
            return x + one if x > 0 else math.exp(x)
        if fmap == 2:
            return x if x > 0 else x - x
        return x

    @cuda.jit(device=True)
    def _feature_grad(x, fmap, one):
        """φ'(x) for the same maps."""
        if fmap == 1:
            return one if x > 0 else math.exp(x)
        if fmap == 2:
            return one if x > 0 else one - one
        return one

    @cuda.jit(device=True)
    def _batch_head(bh, heads):
        """(batch, head) of a block's batch·head index, unsigned 32-bit: computed once per block
        (a division by a runtime value is a long instruction sequence) and, being unsigned, free of
        Numba's negative-index wraparound wherever it indexes."""
        return _u32(bh // heads), _u32(bh % heads)

    @cuda.jit(device=True)
    def _load_tile(dst, src, b, h, row0, row_end, col0, col_end, transpose, fmap, weights, weighted, one,
                   staged, threads):
        """dst (TILE, PAD) <- src[b, h, row0 + r, col0 + c] (transposed: dst[c, r]), zero outside
        rows < row_end and cols < col_end, through the feature map fmap (-1: none), each row r times
        weights[r] when weighted. Consecutive threads read consecutive columns (coalesced).

        Each thread loads its next len(staged) elements into `staged` (a local array: registers)
        and only then stores them, so those loads are in flight together: a trip to memory per
        len(staged) elements, not per element (the compiler keeps a load behind a store to shared
        memory that comes before it). threads: the block's size, a compile-time constant that
        divides TILE² (both are powers of two); len(staged) divides TILE² / threads.

        A load outside the valid part reads the nearest valid element instead (row and column
        clamped: the valid part is never empty, row_end > row0 and col_end > col0, since the ops
        reject T = 0 and empty feature dimensions) and is replaced by zero when stored: no branch
        around the loads, so the address arithmetic is shared by all of them. The indices are
        unsigned 32-bit: Numba then adds no negative-index wraparound code to each access.
        """
        TILE = dst.shape[0]
        batch = staged.shape[0]
        per_thread = TILE * TILE // threads
        tid = _u32(cuda.threadIdx.x)
        last_row = _u32(row_end - 1)
        last_col = _u32(col_end - 1)
        for first in range(0, per_thread, batch):
            for u in range(batch):
                index = tid + _u32((first + u) * threads)
                row = _u32(row0 + index // TILE)
                col = _u32(col0 + index % TILE)
                staged[u] = src[b, h, min(row, last_row), min(col, last_col)]
            for u in range(batch):
                index = tid + _u32((first + u) * threads)
                r = _u32(index // TILE)
                c = _u32(index % TILE)
                value = one - one
                if _u32(row0 + r) <= last_row and _u32(col0 + c) <= last_col:
                    value = staged[u]
                    if fmap >= 0:
                        value = _feature(value, fmap, one)
                    if weighted:
                        value = value * weights[r]
                if transpose:
                    dst[c, r] = value
                else:
                    dst[r, c] = value

    @cuda.jit(device=True)
    def _store_tile(dst, src, b, h, row0, threads):
        """dst[b, h, row0 + r, c] <- src[r, c] for the whole TILE × TILE tile src in shared memory
        (consecutive threads write consecutive columns: coalesced). threads: the block's size."""
        TILE = src.shape[0]
        tid = _u32(cuda.threadIdx.x)
        for u in range(TILE * TILE // threads):
            r, c = tile_element(tid, u, threads, TILE)
            dst[b, h, row0 + r, c] = src[r, c]

    @cuda.jit(device=True)
    def _warp_origin(tid, tile):
        """On tensor cores: the first row and column of the 16 × min(32, tile) part of a tile × tile
        product that thread tid's warp owns (warps in row-major order)."""
        width = min(32, tile)
        per_row = tile // width
        warp = tid // 32
        return _u32(16 * (warp // per_row)), _u32(width * (warp % per_row))

    @cuda.jit(device=True)
    def _owned_row(i, tid, acc, tile, layout):
        """The row of a tile × tile product that row i of thread tid's accumulator acc holds (the
        layouts: _tile_mma)."""
        if layout == 0:
            stride = tile // acc.shape[0]
            return _u32(tid // stride) + _u32(i * stride)
        row0, _ = _warp_origin(tid, tile)
        return row0 + _u32((tid % 32) // 4) + _u32(8 * i)

    @cuda.jit(device=True)
    def _fma_col(j, tx, R, stride):
        """Column j of the R columns that threads tx own in the FMA layout (stride = TILE / R threads
        per row): for an even R in neighbouring pairs, 2 tx and 2 tx + 1, then 2 stride further on,
        ...; for an odd R tx, tx + stride, ..."""
        if R % 2 == 0:
            return _u32(2 * tx) + _u32(j % 2) + _u32((j // 2) * 2 * stride)
        return tx + _u32(j * stride)

    @cuda.jit(device=True)
    def _owned_col(j, tid, acc, tile, layout):
        """The column that column j of thread tid's accumulator acc holds."""
        if layout == 0:
            stride = tile // acc.shape[0]
            return _fma_col(j, _u32(tid % stride), acc.shape[0], stride)
        _, col0 = _warp_origin(tid, tile)
        return col0 + _u32(8 * (j // 2)) + _u32(2 * (tid % 4)) + _u32(j % 2)

    @cuda.jit(device=True)
    def _tile_mma(acc, left, right, tid, layout):
        """acc += left · right over the whole tile depth, for the part of the tile thread tid owns.

        left, right (TILE, PAD) in shared memory (tile_row_stride); acc in registers. Two layouts:

        layout 0, float FMAs: the (TILE/R)² threads form a grid; thread (ty, tx) owns the R × R
        elements at rows ty, ty + TILE/R, ... and, for an even R, columns 2 tx, 2 tx + 1, then
        2 TILE/R further on, ... (_fma_col); acc is (R, R). A warp reads at most two rows of `left`
        (broadcasts) and a stretch of a row of `right`. With rows of an even length
        (tile_row_stride) the compiler pairs a thread's loads into 8-byte loads (LDS.64): two
        steps of a row of `left`, two neighbouring columns of `right`; R² FMAs per step then take
        R shared-memory loads, not 2R (sm_90: 85 instructions per 4 steps, 103 with scalar loads).
        layout 1 (TF32) or 2 (3xTF32), tensor cores: each warp owns a 16-row, min(32, TILE)-column
        part of the tile and computes it with mma_tf32 (m16n8k8), 8 columns at a time; its lane
        4g + t owns rows g and g + 8 and, in each 8-column group, columns 2t and 2t + 1, so acc is
        (2, 2 × groups): acc[i, 2n + p] is row g + 8i, column 8n + 2t + p of the warp's part.
        """
        TILE = left.shape[0]
        if layout != 0:
            _tile_mma_tensor_cores(acc, left, right, tid, layout)
            return
        stride = TILE // acc.shape[0]
        ty = _u32(tid // stride)
        tx = _u32(tid % stride)
        m = _u32(0)
        while m < TILE:     # four steps per iteration, written out, on a 32-bit counter: less loop bookkeeping
            _mma_step(acc, left, right, ty, tx, m)
            _mma_step(acc, left, right, ty, tx, _u32(m + 1))
            _mma_step(acc, left, right, ty, tx, _u32(m + 2))
            _mma_step(acc, left, right, ty, tx, _u32(m + 3))
            m = _u32(m + 4)

    @cuda.jit(device=True)
    def _tile_mma_tensor_cores(acc, left, right, tid, layout):
        """_tile_mma on tensor cores: per 8 steps of depth, one A fragment (16 × 8 of left) and, per
        8-column group, one B fragment (8 × 8 of right) and one mma (three for 3xTF32)."""
        TILE = left.shape[0]
        row0, col0 = _warp_origin(tid, TILE)
        g = _u32((tid % 32) // 4)
        t = _u32(tid % 4)
        k = _u32(0)
        while k < TILE:     # a 32-bit counter, as in _tile_mma
            a0 = left[row0 + g, k + t]
            a1 = left[row0 + g + 8, k + t]
            a2 = left[row0 + g, k + t + 4]
            a3 = left[row0 + g + 8, k + t + 4]
            h0, h1, h2, h3 = tf32(a0), tf32(a1), tf32(a2), tf32(a3)
            for n in range(acc.shape[1] // 2):
                col = col0 + _u32(8 * n) + g
                b0 = right[k + t, col]
                b1 = right[k + t + 4, col]
                hb0, hb1 = tf32(b0), tf32(b1)
                d0, d1, d2, d3 = acc[0, 2 * n], acc[0, 2 * n + 1], acc[1, 2 * n], acc[1, 2 * n + 1]
                if layout == 2:     # 3xTF32: the small cross terms first, then hi · hi
                    d0, d1, d2, d3 = mma_tf32(tf32(a0 - h0), tf32(a1 - h1), tf32(a2 - h2), tf32(a3 - h3),
                                              hb0, hb1, d0, d1, d2, d3)
                    d0, d1, d2, d3 = mma_tf32(h0, h1, h2, h3, tf32(b0 - hb0), tf32(b1 - hb1), d0, d1, d2, d3)
                d0, d1, d2, d3 = mma_tf32(h0, h1, h2, h3, hb0, hb1, d0, d1, d2, d3)
                acc[0, 2 * n], acc[0, 2 * n + 1], acc[1, 2 * n], acc[1, 2 * n + 1] = d0, d1, d2, d3
            k = _u32(k + 8)

    @cuda.jit(device=True)
    def _mma_step(acc, left, right, ty, tx, m):
        """acc[i, j] += left[row i, m] · right[m, column j]: one rank-1 update of the register tile."""
        R = acc.shape[0]
        stride = left.shape[0] // R
        for i in range(R):
            a = left[ty + _u32(i * stride), m]
            for j in range(R):
                acc[i, j] += a * right[m, _fma_col(j, tx, R, stride)]

    @cuda.jit(device=True)
    def _zero(acc, zero):
        for i in range(acc.shape[0]):
            for j in range(acc.shape[1]):
                acc[i, j] = zero

    @cuda.jit(device=True)
    def _cumulative_decay(s_gamma, g, decay_mode, b, h, t_first, T, zero, threads):
        """s_gamma[r] = Γ for row r of the chunk: Σ of g over the chunk's steps up to r (g = 0 past T,
        so padded rows repeat the last step's value). Each of the first TILE threads sums its prefix.
        threads: the block's size, a compile-time constant; the loop over a thread's rows steps by
        it on a 32-bit counter (range(tid, TILE, cuda.blockDim.x) costs a 64-bit division)."""
        TILE = s_gamma.shape[0]
        row = _u32(cuda.threadIdx.x)
        while row < TILE:
            total = zero
            if decay_mode == 1:              # g (1, H, 1): one value per head
                step = g[0, h, 0]
                for r in range(row + 1):
                    if t_first + r < T:
                        total += step
            elif decay_mode == 2:
                for r in range(row + 1):
                    if t_first + r < T:
                        total += g[b, h, t_first + r]
            s_gamma[row] = total
            row = _u32(row + threads)

    @cuda.jit(device=True)
    def _masked_scores(dst, acc, s_gamma, tid, layout, scale, transposed, zero):
        """dst[row, col] = scale · exp(Γ_t − Γ_s) · acc where s ≤ t, else 0, for the register tile acc.

        Rows are t and columns s, or the other way round when transposed (dst then holds the
        transposed score matrix, rows s and columns t)."""
        TILE = dst.shape[0]
        for i in range(acc.shape[0]):
            row = _owned_row(i, tid, acc, TILE, layout)
            for j in range(acc.shape[1]):
                col = _owned_col(j, tid, acc, TILE, layout)
                t = col if transposed else row
                s = row if transposed else col
                value = zero
                if s <= t:
                    value = scale * math.exp(s_gamma[t] - s_gamma[s]) * acc[i, j]
                dst[row, col] = value


# ----------------------------------------------------------------------------------------------
# kernels (built per dtype and tile: shared arrays need compile-time shapes)

_KERNELS = {}


def _numba_type(dtype):
    import numba
    return numba.float32 if np.dtype(dtype) == np.float32 else numba.float64


def _kernels(dtype):
    name = np.dtype(dtype).name
    key = (name, TILES[name], REGS[name], MIN_BLOCKS[name], TENSOR_CORES[name], LOADS[name])
    if key not in _KERNELS:
        _KERNELS[key] = _make_kernels(_numba_type(dtype), TILES[name], REGS[name], MIN_BLOCKS[name],
                                      LAYOUTS[TENSOR_CORES[name]], LOADS[name])
    return _KERNELS[key]


def tile_layout(tile, reg, layout):
    """(threads per block, accumulator rows, accumulator columns) of the tile kernels (see _tile_mma)."""
    if layout == 0:          # FMA tiles: a (tile/reg) × (tile/reg) grid of threads, reg × reg elements each
        return (tile // reg) ** 2, reg, reg
    width = min(32, tile)    # tensor cores: a warp per 16 × width part
    return 32 * (tile // 16) * (tile // width), 2, width // 4


def tile_row_stride(tile, reg, layout):
    """The row length (elements) of the shared-memory tiles: tile + 4 on tensor cores; on FMAs
    tile + 2 for an even register tile reg (its column pairs are 8-byte loads, so rows must start
    on 8 bytes), else tile + 1.

    Shared memory serves a warp in one pass when no two of the words its lanes touch share a bank
    (bank = address in 4-byte words mod 32), and in k passes when k distinct words do. For a tile
    of 64: a transposed tile store (lane i writes row i) touches bank i·(tile + pad) + const, that
    is i (pad 1: one word per bank), 2i (pad 2: two) or 4i (pad 4: four). A tensor-core fragment
    load has lane 4g + t read row g, column t of the left operand and row t, column g of the right
    one: bank g + t with pad 1 (four words per bank), 4g + t and 4t + g with pad 4 (one and two). A
    tile is stored once and its fragments are loaded eight times per tile product. The FMA
    product's loads are broadcasts or consecutive words with any of these pads."""
    if layout != 0:
        return tile + 4
    return tile + (2 if reg % 2 == 0 else 1)


def _make_kernels(real, TILE, R, min_blocks, LAYOUT, loads):
    PAD = tile_row_stride(TILE, R, LAYOUT)
    THREADS, AR, AC = tile_layout(TILE, R, LAYOUT)
    PER_THREAD = TILE * TILE // THREADS     # a tile's elements per thread (THREADS divides TILE²)
    # a tile's loads per thread at once (_load_tile): at most `loads`, and a divisor of PER_THREAD
    IN_FLIGHT = max(n for n in range(1, min(loads, PER_THREAD) + 1) if PER_THREAD % n == 0)

    @_device.jit_kernel(THREADS, min_blocks)
    def outer_kernel(xsrc, ysrc, g, out, chunk_decay, T, Dx, Dy, fmap, decay_mode, from_start, scale):
        """out[b, h, c] (Dx × Dy) = Σ_s w_s φ(x_s)ᵀ y_s over chunk c, w_s = exp(Γ_end − Γ_s) for the
        state increment ΔS_c, or w_s = scale · exp(Γ_s) (from_start) for the gradient increment ΔG_c.
        Also chunk_decay[b, h, c] = Γ_end."""
        chunk = _u32(cuda.blockIdx.x)
        b, h = _batch_head(cuda.blockIdx.z, xsrc.shape[1])   # unsigned: no wraparound per access
        n_ytiles = _u32((Dy + TILE - 1) // TILE)
        xt = _u32(cuda.blockIdx.y) // n_ytiles     # unsigned 32-bit: no call to a 64-bit division
        yt = _u32(cuda.blockIdx.y) % n_ytiles
        tid = cuda.threadIdx.x
        zero = real(0)
        one = real(1)
        s_x = cuda.shared.array((TILE, PAD), real)
        s_y = cuda.shared.array((TILE, PAD), real)
        s_gamma = cuda.shared.array(TILE, real)
        s_w = cuda.shared.array(TILE, real)
        acc = cuda.local.array((AR, AC), real)
        staged = cuda.local.array(IN_FLIGHT, real)  # see _load_tile
        _zero(acc, zero)

        t_first = _u32(chunk * TILE)
        _cumulative_decay(s_gamma, g, decay_mode, b, h, t_first, T, zero, THREADS)
        cuda.syncthreads()
        row = _u32(tid)
        while row < TILE:
            if from_start:
                s_w[row] = scale * math.exp(s_gamma[row])
            else:
                s_w[row] = math.exp(s_gamma[TILE - 1] - s_gamma[row])
            row = _u32(row + THREADS)
        cuda.syncthreads()
        _load_tile(s_x, xsrc, b, h, t_first, T, xt * TILE, Dx, True, fmap, s_w, False, one, staged, THREADS)
        _load_tile(s_y, ysrc, b, h, t_first, T, yt * TILE, Dy, False, -1, s_w, True, one, staged, THREADS)
        cuda.syncthreads()
        _tile_mma(acc, s_x, s_y, tid, LAYOUT)

        for i in range(AR):
            row = _u32(xt * TILE) + _owned_row(i, tid, acc, TILE, LAYOUT)
            for j in range(AC):
                col = _u32(yt * TILE) + _owned_col(j, tid, acc, TILE, LAYOUT)
                if row < Dx and col < Dy:
                    out[b, h, _u32(chunk * Dx + row), col] = acc[i, j]
        if cuda.blockIdx.y == 0 and tid == 0:
            chunk_decay[b, h, chunk] = s_gamma[TILE - 1]

    @_device.jit_kernel(THREADS, min_blocks)
    def output_kernel(q, k, v, g, states, out, T, Dk, Dv, fmap, decay_mode, scale):
        """out_t = scale (exp(Γ_t) φ(q_t) S_c + Σ_{s ≤ t} exp(Γ_t − Γ_s)(φ(q_t)·φ(k_s)) v_s), one Dv tile."""
        chunk = _u32(cuda.blockIdx.x)
        vt = cuda.blockIdx.y
        b, h = _batch_head(cuda.blockIdx.z, q.shape[1])
        tid = cuda.threadIdx.x
        zero = real(0)
        one = real(1)
        s_1 = cuda.shared.array((TILE, PAD), real)
        s_2 = cuda.shared.array((TILE, PAD), real)
        s_gamma = cuda.shared.array(TILE, real)
        acc_o = cuda.local.array((AR, AC), real)
        acc_a = cuda.local.array((AR, AC), real)
        staged = cuda.local.array(IN_FLIGHT, real)  # see _load_tile
        _zero(acc_o, zero)
        _zero(acc_a, zero)

        t_first = _u32(chunk * TILE)
        _cumulative_decay(s_gamma, g, decay_mode, b, h, t_first, T, zero, THREADS)
        for kt in range(0, Dk, TILE):
            _load_tile(s_1, q, b, h, t_first, T, kt, Dk, False, fmap, s_gamma, False, one, staged, THREADS)
            _load_tile(s_2, states, b, h, chunk * Dk + kt, chunk * Dk + Dk, vt * TILE, Dv, False, -1,
                       s_gamma, False, one, staged, THREADS)
            cuda.syncthreads()
            _tile_mma(acc_o, s_1, s_2, tid, LAYOUT)                 # φ(Q) S_c
            cuda.syncthreads()
            _load_tile(s_2, k, b, h, t_first, T, kt, Dk, True, fmap, s_gamma, False, one, staged, THREADS)
            cuda.syncthreads()
            _tile_mma(acc_a, s_1, s_2, tid, LAYOUT)                 # φ(Q) φ(K)ᵀ
            cuda.syncthreads()
        _masked_scores(s_1, acc_a, s_gamma, tid, LAYOUT, scale, False, zero)
        _load_tile(s_2, v, b, h, t_first, T, vt * TILE, Dv, False, -1, s_gamma, False, one, staged, THREADS)
        for i in range(AR):
            weight = scale * math.exp(s_gamma[_owned_row(i, tid, acc_o, TILE, LAYOUT)])
            for j in range(AC):
                acc_o[i, j] = weight * acc_o[i, j]
        cuda.syncthreads()
        _tile_mma(acc_o, s_1, s_2, tid, LAYOUT)                     # + (A ⊙ M) V

        for i in range(AR):
            t = _u32(t_first + _owned_row(i, tid, acc_o, TILE, LAYOUT))
            for j in range(AC):
                col = _u32(vt * TILE) + _owned_col(j, tid, acc_o, TILE, LAYOUT)
                if t < T and col < Dv:
                    out[b, h, t, col] = acc_o[i, j]

    @cuda.jit
    def chunk_scan_kernel(increments, chunk_decay, initial, final, has_initial, reverse, decay_mode):
        """In place over chunks, for every state entry e: increments[b, h, c, e] <- the running state
        before chunk c is folded in, running <- exp(Γ_end,c) running + increment_c. Forward (states
        entering each chunk; `final` gets the last state) or reverse (gradients leaving each chunk)."""
        e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        b, h = _batch_head(cuda.blockIdx.y, increments.shape[1])
        n_chunks = increments.shape[2]
        size = increments.shape[3]
        if e < size:
            running = real(0)
            if has_initial:
                running = initial[b, h, e]
            loaded = cuda.local.array(SCAN_UNROLL, real)
            decays = cuda.local.array(SCAN_UNROLL, real)
            for first in range(0, n_chunks, SCAN_UNROLL):
                # load a few chunks' increments (and decays) first: their loads are then in flight
                # together (an exp of a loaded decay here would hold up the loads after it)
                for u in range(SCAN_UNROLL):
                    step = first + u
                    if step < n_chunks:
                        c = n_chunks - 1 - step if reverse else step
                        loaded[u] = increments[b, h, c, e]
                        if decay_mode != 0:
                            decays[u] = chunk_decay[b, h, c]
                for u in range(SCAN_UNROLL):
                    step = first + u
                    if step < n_chunks:
                        c = n_chunks - 1 - step if reverse else step
                        increments[b, h, c, e] = running
                        if decay_mode != 0:
                            running = math.exp(decays[u]) * running
                        running += loaded[u]
            if not reverse:
                final[b, h, e] = running

    @_device.jit_kernel(THREADS, min_blocks)
    def dq_kernel(q, k, v, do, g, states, dq, dgamma, scores, T, Dk, Dv, fmap, decay_mode, scale):
        """dq for one Dk tile: dφ(Q) = (dP ⊙ M) φ(K) + scale exp(Γ) dO S_cᵀ, dq = dφ(Q) ⊙ φ'(q).
        The blocks of the first Dk tile also store the chunk's dP ⊙ M in scores, for dk_kernel."""
        chunk = _u32(cuda.blockIdx.x)
        kt = cuda.blockIdx.y * TILE
        b, h = _batch_head(cuda.blockIdx.z, q.shape[1])
        tid = cuda.threadIdx.x
        zero = real(0)
        one = real(1)
        s_1 = cuda.shared.array((TILE, PAD), real)
        s_2 = cuda.shared.array((TILE, PAD), real)
        s_gamma = cuda.shared.array(TILE, real)
        s_db = cuda.shared.array(TILE, real)
        acc = cuda.local.array((AR, AC), real)
        staged = cuda.local.array(IN_FLIGHT, real)  # see _load_tile
        acc_q = cuda.local.array((AR, AC), real)
        _zero(acc, zero)
        _zero(acc_q, zero)
        t_first = _u32(chunk * TILE)
        _cumulative_decay(s_gamma, g, decay_mode, b, h, t_first, T, zero, THREADS)
        row = _u32(tid)
        while row < TILE:
            s_db[row] = zero
            row = _u32(row + THREADS)

        for vt in range(0, Dv, TILE):                        # dO Vᵀ
            _load_tile(s_1, do, b, h, t_first, T, vt, Dv, False, -1, s_gamma, False, one, staged, THREADS)
            _load_tile(s_2, v, b, h, t_first, T, vt, Dv, True, -1, s_gamma, False, one, staged, THREADS)
            cuda.syncthreads()
            _tile_mma(acc, s_1, s_2, tid, LAYOUT)
            cuda.syncthreads()
        _masked_scores(s_1, acc, s_gamma, tid, LAYOUT, scale, False, zero)      # dP
        _load_tile(s_2, k, b, h, t_first, T, kt, Dk, False, fmap, s_gamma, False, one, staged, THREADS)
        cuda.syncthreads()
        if kt == 0:
            _store_tile(scores, s_1, b, h, t_first, THREADS)
        _tile_mma(acc_q, s_1, s_2, tid, LAYOUT)                   # dP φ(K)
        _zero(acc, zero)
        for vt in range(0, Dv, TILE):                        # dO S_cᵀ
            cuda.syncthreads()
            _load_tile(s_1, do, b, h, t_first, T, vt, Dv, False, -1, s_gamma, False, one, staged, THREADS)
            _load_tile(s_2, states, b, h, chunk * Dk + kt, chunk * Dk + Dk, vt, Dv, True, -1,
                       s_gamma, False, one, staged, THREADS)
            cuda.syncthreads()
            _tile_mma(acc, s_1, s_2, tid, LAYOUT)
        _finish_key_grad(q, dq, dgamma, acc_q, acc, s_gamma, s_db, b, h, t_first, kt, T, Dk, fmap,
                         decay_mode, tid, LAYOUT, one, False, scale, THREADS)

    @_device.jit_kernel(THREADS, min_blocks)
    def dk_kernel(q, k, v, g, grads, scores, dk, dgamma, T, Dk, Dv, fmap, decay_mode, scale):
        """dk for one Dk tile: dφ(K) = (dP ⊙ M)ᵀ φ(Q) + exp(Γ_end − Γ) V G_cᵀ, dk = dφ(K) ⊙ φ'(k),
        with dP ⊙ M as dq_kernel stored it in scores."""
        chunk = _u32(cuda.blockIdx.x)
        kt = cuda.blockIdx.y * TILE
        b, h = _batch_head(cuda.blockIdx.z, q.shape[1])
        tid = cuda.threadIdx.x
        zero = real(0)
        one = real(1)
        s_1 = cuda.shared.array((TILE, PAD), real)
        s_2 = cuda.shared.array((TILE, PAD), real)
        s_gamma = cuda.shared.array(TILE, real)
        s_db = cuda.shared.array(TILE, real)
        acc = cuda.local.array((AR, AC), real)
        staged = cuda.local.array(IN_FLIGHT, real)  # see _load_tile
        acc_k = cuda.local.array((AR, AC), real)
        _zero(acc_k, zero)
        t_first = _u32(chunk * TILE)
        _cumulative_decay(s_gamma, g, decay_mode, b, h, t_first, T, zero, THREADS)
        row = _u32(tid)
        while row < TILE:
            s_db[row] = zero
            row = _u32(row + THREADS)

        _load_tile(s_1, scores, b, h, t_first, t_first + TILE, 0, TILE, True, -1, s_gamma, False, one,
                   staged, THREADS)                                          # (dP ⊙ M)ᵀ
        _load_tile(s_2, q, b, h, t_first, T, kt, Dk, False, fmap, s_gamma, False, one, staged, THREADS)
        cuda.syncthreads()
        _tile_mma(acc_k, s_1, s_2, tid, LAYOUT)                   # dPᵀ φ(Q)
        _zero(acc, zero)
        for vt in range(0, Dv, TILE):                        # V G_cᵀ
            cuda.syncthreads()
            _load_tile(s_1, v, b, h, t_first, T, vt, Dv, False, -1, s_gamma, False, one, staged, THREADS)
            _load_tile(s_2, grads, b, h, chunk * Dk + kt, chunk * Dk + Dk, vt, Dv, True, -1,
                       s_gamma, False, one, staged, THREADS)
            cuda.syncthreads()
            _tile_mma(acc, s_1, s_2, tid, LAYOUT)
        _finish_key_grad(k, dk, dgamma, acc_k, acc, s_gamma, s_db, b, h, t_first, kt, T, Dk, fmap,
                         decay_mode, tid, LAYOUT, one, True, scale, THREADS)

    @_device.jit_kernel(THREADS, min_blocks)
    def dv_kernel(q, k, do, g, grads, dv, T, Dk, Dv, fmap, decay_mode, scale):
        """dv for one Dv tile: dV = (A ⊙ M)ᵀ dO + exp(Γ_end − Γ) φ(K) G_c."""
        chunk = _u32(cuda.blockIdx.x)
        vt = cuda.blockIdx.y * TILE
        b, h = _batch_head(cuda.blockIdx.z, q.shape[1])
        tid = cuda.threadIdx.x
        zero = real(0)
        one = real(1)
        s_1 = cuda.shared.array((TILE, PAD), real)
        s_2 = cuda.shared.array((TILE, PAD), real)
        s_gamma = cuda.shared.array(TILE, real)
        acc = cuda.local.array((AR, AC), real)
        staged = cuda.local.array(IN_FLIGHT, real)  # see _load_tile
        acc_v = cuda.local.array((AR, AC), real)
        _zero(acc, zero)
        _zero(acc_v, zero)
        t_first = _u32(chunk * TILE)
        _cumulative_decay(s_gamma, g, decay_mode, b, h, t_first, T, zero, THREADS)

        for kt in range(0, Dk, TILE):                        # φ(K) φ(Q)ᵀ = Aᵀ
            _load_tile(s_1, k, b, h, t_first, T, kt, Dk, False, fmap, s_gamma, False, one, staged, THREADS)
            _load_tile(s_2, q, b, h, t_first, T, kt, Dk, True, fmap, s_gamma, False, one, staged, THREADS)
            cuda.syncthreads()
            _tile_mma(acc, s_1, s_2, tid, LAYOUT)
            cuda.syncthreads()
        _masked_scores(s_1, acc, s_gamma, tid, LAYOUT, scale, True, zero)
        _load_tile(s_2, do, b, h, t_first, T, vt, Dv, False, -1, s_gamma, False, one, staged, THREADS)
        cuda.syncthreads()
        _tile_mma(acc_v, s_1, s_2, tid, LAYOUT)                   # Aᵀ dO
        _zero(acc, zero)
        for kt in range(0, Dk, TILE):                        # φ(K) G_c
            cuda.syncthreads()
            _load_tile(s_1, k, b, h, t_first, T, kt, Dk, False, fmap, s_gamma, False, one, staged, THREADS)
            _load_tile(s_2, grads, b, h, chunk * Dk + kt, chunk * Dk + Dk, vt, Dv, False, -1,
                       s_gamma, False, one, staged, THREADS)
            cuda.syncthreads()
            _tile_mma(acc, s_1, s_2, tid, LAYOUT)

        for i in range(AR):
            row = _owned_row(i, tid, acc, TILE, LAYOUT)
            weight = math.exp(s_gamma[TILE - 1] - s_gamma[row])
            t = _u32(t_first + row)
            for j in range(AC):
                col = _u32(vt) + _owned_col(j, tid, acc, TILE, LAYOUT)
                if t < T and col < Dv:
                    dv[b, h, t, col] = acc_v[i, j] + weight * acc[i, j]

    @cuda.jit
    def decay_grad_kernel(db, dlog, per_head):
        """From ∂L/∂b (B, H, T): ∂L/∂g_r = Σ_{t ≥ r} ∂L/∂b_t (a reverse cumulative sum over time) into
        dlog (B, H, T), or, per_head, its sum over batch and time, Σ_t (t + 1) ∂L/∂b_t, into dlog (1, H, 1).
        One block per (b, h): each thread sums a stretch of time, a scan across threads joins them."""
        b, h = _batch_head(cuda.blockIdx.x, db.shape[1])
        T = db.shape[2]
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        s_sum = cuda.shared.array(SCAN_THREADS, real)
        per_thread = (T + threads - 1) // threads
        first = tid * per_thread
        local = real(0)
        for t in range(first, min(first + per_thread, T)):
            if per_head:
                local += real(t + 1) * db[b, h, t]
            else:
                local += db[b, h, t]
        s_sum[tid] = local
        cuda.syncthreads()
        if per_head:
            if tid == 0:
                total = real(0)
                for i in range(threads):
                    total += s_sum[i]
                cuda.atomic.add(dlog, (0, h, 0), total)
            return
        # suffix sums over the threads' stretches (Hillis-Steele, reversed), then within each stretch
        offset = 1
        while offset < threads:
            value = s_sum[tid]
            if tid + offset < threads:
                value += s_sum[tid + offset]
            cuda.syncthreads()
            s_sum[tid] = value
            cuda.syncthreads()
            offset *= 2
        running = s_sum[tid + 1] if tid + 1 < threads else real(0)
        last = min(first + per_thread, T)
        for step in range(last - first):
            t = last - 1 - step
            running += db[b, h, t]
            dlog[b, h, t] = running

    return {"outer": outer_kernel, "output": output_kernel, "scan": chunk_scan_kernel,
            "dq": dq_kernel, "dk": dk_kernel, "dv": dv_kernel, "decay_grad": decay_grad_kernel,
            "threads": THREADS}


if cuda is not None:
    @cuda.jit(device=True)
    def _finish_key_grad(x, dx, dgamma, acc_local, acc_state, s_gamma, s_db, b, h, t_first, col0, T, Dk,
                         fmap, decay_mode, tid, layout, one, is_key, scale, threads):
        """dφ(x) = acc_local + w_t acc_state with w_t = scale exp(Γ_t) (queries) or exp(Γ_end − Γ_t)
        (keys); dx = dφ(x) ⊙ φ'(x). With a decay, adds ±φ(x_t)·dφ(x_t) into dgamma[b, h, t].
        threads: the block's size, a compile-time constant."""
        TILE = s_gamma.shape[0]
        for i in range(acc_local.shape[0]):
            row = _owned_row(i, tid, acc_local, TILE, layout)
            t = _u32(t_first + row)
            if is_key:
                weight = math.exp(s_gamma[TILE - 1] - s_gamma[row])
            else:
                weight = scale * math.exp(s_gamma[row])
            dot = one - one
            for j in range(acc_local.shape[1]):
                col = _u32(col0) + _owned_col(j, tid, acc_local, TILE, layout)
                if t < T and col < Dk:
                    dphi = acc_local[i, j] + weight * acc_state[i, j]
                    value = x[b, h, t, col]
                    dx[b, h, t, col] = dphi * _feature_grad(value, fmap, one)
                    dot += _feature(value, fmap, one) * dphi
            if decay_mode != 0:
                cuda.atomic.add(s_db, row, -dot if is_key else dot)
        if decay_mode != 0:
            cuda.syncthreads()
            r = _u32(tid)
            while r < TILE:
                if t_first + r < T:
                    cuda.atomic.add(dgamma, (b, h, _u32(t_first + r)), s_db[r])
                r = _u32(r + threads)

# ----------------------------------------------------------------------------------------------
# host wrappers

def _grid_tiles(size, tile):
    return -(-size // tile)


@_device.in_one_context
def forward(q, k, v, causal=True, chunk_size=64, feature_map="identity", scale=None, normalize=False,
            log_decay=None, initial_state=None, return_state=False):
    """Causal linear attention on the GPU; same arguments and results as the reference op's forward
    (minus mode and backend). q, k: (B, H, T, Dk); v: (B, H, T, Dv); log_decay None, (H,) or (B, H, T);
    initial_state (B, H, Dk, Dv) or None. NumPy or CUDA arrays, all float32 (fast) or all float64;
    results come back in the kind of q. chunk_size is accepted for signature compatibility: the
    kernels use their own chunk, TILES[dtype]. Returns (out, cache) or ((out, final_state), cache).
    """
    ok, reason = supports(causal=causal, normalize=normalize, feature_map=feature_map)
    if not ok:
        raise ValueError(reason)
    kind = _device.array_kind(q)
    q_d = _device.to_device("q", q)
    k_d = _device.to_device("k", k)
    v_d = _device.to_device("v", v)
    dtype = q_d.dtype
    for label, array in (("k", k_d), ("v", v_d)):
        if array.dtype != dtype:
            raise TypeError(f"{label} must have the same dtype as q ({dtype}), got {array.dtype}")
    B, H, T, Dk = q_d.shape
    _device.check_grid_axis("q", "(batch, head) pairs", B * H)
    Dv = v_d.shape[3]
    scale = 1.0 if scale is None else float(scale)
    fmap = FEATURE_MAPS[feature_map]
    tile = TILES[np.dtype(dtype).name]
    kernels = _kernels(dtype)
    threads = kernels["threads"]
    n_chunks = -(-T // tile)

    g_d, decay_mode = _decay_input(log_decay, dtype, H)
    initial = _device.to_device("initial_state", initial_state) if initial_state is not None \
        else _device.placeholder((1, 1, 1, 1), dtype)
    states = _device.empty((B, H, n_chunks * Dk, Dv), dtype, kind)      # ΔS_c, then S_c in place
    chunk_decay = _device.empty((B, H, n_chunks), dtype, kind)        # written by the outer kernel

    real = dtype.type
    kernels["outer"][(n_chunks, _grid_tiles(Dk, tile) * _grid_tiles(Dv, tile), B * H), threads](
        k_d, v_d, g_d, states, chunk_decay, T, Dk, Dv, fmap, decay_mode, False, real(scale))
    # the later kernels' outputs are allocated while the first kernel runs: the GPU does not wait for them
    final = _device.empty((B, H, Dk * Dv), dtype, kind)
    out = _device.empty((B, H, T, Dv), dtype, kind)
    kernels["scan"][(_grid_tiles(Dk * Dv, SCAN_THREADS), B * H), SCAN_THREADS](
        states.reshape(B, H, n_chunks, Dk * Dv), chunk_decay,
        initial.reshape(initial.shape[0], initial.shape[1], initial.shape[2] * initial.shape[3]),
        final, int(initial_state is not None), False, decay_mode)
    kernels["output"][(n_chunks, _grid_tiles(Dv, tile), B * H), threads](
        q_d, k_d, v_d, g_d, states, out, T, Dk, Dv, fmap, decay_mode, real(scale))

    cache = {"backend": "cuda", "kind": kind, "q": q_d, "k": k_d, "v": v_d, "g": g_d,
             "decay_mode": decay_mode, "log_decay_shape": None if log_decay is None else tuple(log_decay.shape),
             "states": states, "chunk_decay": chunk_decay, "tile": tile, "fmap": fmap, "scale": scale}
    out_user = _device.from_device(out, kind)
    if return_state:
        return (out_user, _device.from_device(final.reshape(B, H, Dk, Dv), kind)), cache
    return out_user, cache


def _decay_input(log_decay, dtype, H):
    """(device array (B or 1, H, T or 1), mode): the log-decay, or a placeholder when there is none."""
    if log_decay is None:
        return _device.placeholder((1, 1, 1), dtype), DECAY_NONE
    g_d = _device.to_device("log_decay", log_decay)
    if g_d.dtype != dtype:
        raise TypeError(f"log_decay must have dtype {dtype}, got {g_d.dtype}")
    if len(g_d.shape) == 1:      # (H,) -> a (1, H, 1) view, so that the kernels see one rank
        return g_d.reshape(1, H, 1), DECAY_PER_HEAD
    return g_d, DECAY_PER_STEP


@_device.in_one_context
def backward(do, cache):
    """Gradients (dq, dk, dv), or (dq, dk, dv, dlog_decay) when log_decay was given; results come
    back in the kind of do. No gradient flows into initial_state."""
    kind = _device.array_kind(do)
    do_d = _device.to_device("do", do)
    q_d, k_d, v_d, g_d = cache["q"], cache["k"], cache["v"], cache["g"]
    if tuple(do_d.shape) != tuple(v_d.shape):
        raise ValueError(f"do must have shape {tuple(v_d.shape)}, got {tuple(do_d.shape)}")
    dtype = q_d.dtype
    if do_d.dtype != dtype:
        raise TypeError(f"do must have dtype {dtype}, got {do_d.dtype}")
    B, H, T, Dk = q_d.shape
    Dv = v_d.shape[3]
    tile = cache["tile"]
    kernels = _kernels(dtype)
    threads = kernels["threads"]
    n_chunks = -(-T // tile)
    fmap, decay_mode, scale = cache["fmap"], cache["decay_mode"], dtype.type(cache["scale"])

    grads = _device.empty((B, H, n_chunks * Dk, Dv), dtype, kind)       # ΔG_c, then G_c in place
    unused = _device.placeholder((1, 1, 1), dtype)
    kernels["outer"][(n_chunks, _grid_tiles(Dk, tile) * _grid_tiles(Dv, tile), B * H), threads](
        q_d, do_d, g_d, grads, cache["chunk_decay"], T, Dk, Dv, fmap, decay_mode, True, scale)
    kernels["scan"][(_grid_tiles(Dk * Dv, SCAN_THREADS), B * H), SCAN_THREADS](
        grads.reshape(B, H, n_chunks, Dk * Dv), cache["chunk_decay"], unused, unused, 0, True, decay_mode)

    dq = _device.empty((B, H, T, Dk), dtype, kind)
    dk = _device.empty((B, H, T, Dk), dtype, kind)
    dv = _device.empty((B, H, T, Dv), dtype, kind)
    dgamma = _device.zeros((B, H, T), dtype, kind) if decay_mode != DECAY_NONE \
        else _device.placeholder((1, 1, 1), dtype)
    # each chunk's masked dP = dO Vᵀ ⊙ M: the dq kernel computes and stores it, the dk kernel reads it
    scores = _device.empty((B, H, n_chunks * tile, tile), dtype, kind)
    kernels["dq"][(n_chunks, _grid_tiles(Dk, tile), B * H), threads](
        q_d, k_d, v_d, do_d, g_d, cache["states"], dq, dgamma, scores, T, Dk, Dv, fmap, decay_mode, scale)
    kernels["dk"][(n_chunks, _grid_tiles(Dk, tile), B * H), threads](
        q_d, k_d, v_d, g_d, grads, scores, dk, dgamma, T, Dk, Dv, fmap, decay_mode, scale)
    kernels["dv"][(n_chunks, _grid_tiles(Dv, tile), B * H), threads](
        q_d, k_d, do_d, g_d, grads, dv, T, Dk, Dv, fmap, decay_mode, scale)

    result = [_device.from_device(x, kind) for x in (dq, dk, dv)]
    if decay_mode == DECAY_NONE:
        return tuple(result)
    per_head = decay_mode == DECAY_PER_HEAD
    dlog = _device.zeros((1, H, 1), dtype, kind) if per_head else _device.empty((B, H, T), dtype, kind)
    kernels["decay_grad"][B * H, SCAN_THREADS](dgamma, dlog, per_head)
    return tuple(result) + (_device.from_device(dlog.reshape(H) if per_head else dlog, kind),)
