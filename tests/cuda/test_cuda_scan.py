"""The selective-scan CUDA kernels against the NumPy reference (minilm.ops.selective_scan).

Runs on a GPU or under the CUDA simulator (see conftest.py). Blocks are shrunk so that tiny inputs
still cover every path: several chunks with the last one partial, several time segments (rounds of
the segment scan), channels and states that do not fill a block, states in several groups.
Forward output, final state and all eight gradients are compared on fresh random inputs,
scale-aware: max|cuda - ref| / max|ref| <= 1e-5 in float32 and 1e-10 in float64.
"""
from collections import Counter

import numpy as np
import pytest

from minilm.ops import selective_scan as selective_scan_op

cuda_scan = pytest.importorskip("minilm.kernels.cuda.selective_scan")
from minilm.kernels.cuda import _device  # noqa: E402
from minilm.kernels.cuda._device import cuda  # noqa: E402  (a global: the simulator swaps it in test kernels)
from minilm.testing import numpy_reference

reference = numpy_reference(selective_scan_op)

TOLERANCE = {np.float32: 1e-5, np.float64: 1e-10}

# channels, state_threads, states_per_thread, fwd_segments, fwd_steps, bwd_segments, bwd_steps
SMALL = dict(channels=2, state_threads=2, states_per_thread=2, fwd_segments=2, fwd_steps=2,
             bwd_segments=2, bwd_steps=2)
FOUR_SEGMENTS = dict(channels=1, state_threads=1, states_per_thread=2, fwd_segments=4, fwd_steps=1,
                     bwd_segments=4, bwd_steps=1)


@pytest.fixture
def blocks():
    """Set a small block shape for both dtypes for one test, then put the defaults back."""
    saved = dict(cuda_scan.CONFIGS)

    def use(shape):
        for dtype in ("float32", "float64"):
            cuda_scan.set_config(dtype, **shape)

    yield use
    cuda_scan.CONFIGS.clear()
    cuda_scan.CONFIGS.update(saved)


def make_inputs(B, T, D, N, dtype, seed, gate=True, skip=True, bias=True, state=True):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    arrays = dict(u=normal(B, T, D), delta=normal(B, T, D, scale=0.5),
                  A=(-np.exp(rng.standard_normal((D, N)))).astype(dtype),
                  Bm=normal(B, T, N), Cm=normal(B, T, N))
    options = dict(D=normal(D) if skip else None, z=normal(B, T, D) if gate else None,
                   delta_bias=normal(D, scale=0.1) if bias else None,
                   initial_state=normal(B, D, N) if state else None)
    return arrays, options


def relative_error(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if expected.size == 0:
        return 0.0 if actual.shape == expected.shape else float("inf")
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def compare(B, T, D, N, dtype, seed, softplus=True, a_scale=1.0, **flags):
    arrays, options = make_inputs(B, T, D, N, dtype, seed, **flags)
    if not softplus:
        arrays["delta"] = np.abs(arrays["delta"])
    arrays["A"] = (a_scale * arrays["A"]).astype(dtype)
    kwargs = dict(options, delta_softplus=softplus, return_state=True)
    (out_ref, final_ref), cache_ref = reference.forward(*arrays.values(), mode="chunked", chunk_size=3, **kwargs)
    (out, final), cache = cuda_scan.forward(*arrays.values(), **kwargs)
    assert cache["backend"] == "cuda"
    assert out.dtype == dtype and out.shape == out_ref.shape
    tolerance = TOLERANCE[dtype]
    assert relative_error(out, out_ref) <= tolerance
    assert relative_error(final, final_ref) <= tolerance

    dout = np.random.default_rng(seed + 1).standard_normal(out_ref.shape).astype(dtype)
    grads_ref = reference.backward(dout, cache_ref)
    grads = cuda_scan.backward(dout, cache)
    names = ("du", "ddelta", "dA", "dBm", "dCm", "dD", "dz", "ddelta_bias")
    for name, grad, grad_ref in zip(names, grads, grads_ref):
        assert (grad is None) == (grad_ref is None), name
        if grad is not None:
            assert grad.dtype == dtype and grad.shape == grad_ref.shape, name
            error = relative_error(grad, grad_ref)
            assert error <= tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("B, T, D, N, dtype, seed, flags", [
    (1, 1, 1, 1, np.float64, 0, {}),                                         # T = 1, B = 1, N = 1
    (2, 9, 3, 3, np.float64, 1, {}),                                         # T not a multiple of the chunk (4)
    (1, 7, 2, 5, np.float64, 2, dict(gate=False, state=False)),              # 5 states: groups in the backward
    (2, 6, 3, 2, np.float32, 3, dict(softplus=False, bias=False, skip=False)),
    (1, 8, 2, 1, np.float32, 4, dict(gate=False)),
])
def test_matches_reference(blocks, B, T, D, N, dtype, seed, flags):
    blocks(SMALL)
    compare(B, T, D, N, dtype, seed, **flags)


@pytest.mark.parametrize("shape, B, T, D, N, dtype", [
    # 5 states, at most 2 per thread: three groups (2, 2, 1), B and C staged two states at a time
    (dict(SMALL, fwd_thread_states=2), 1, 7, 3, 5, np.float64),
    # chunks of 3 x 2 steps; the backward's of 2 x 4: the forward stores the states at 0, 8, ...
    (dict(SMALL, fwd_segments=3, bwd_steps=4), 2, 13, 3, 4, np.float32),
    # 6 states in one thread, 12 (channel, state) pairs folded by 4 threads; B, C two at a time
    (dict(SMALL), 1, 10, 2, 6, np.float64),
    # 3 channels x 3 segments of 1 step: chunks of 3, a block that no channel count fills
    (dict(channels=3, fwd_segments=3, fwd_steps=1, bwd_segments=3, bwd_steps=2), 1, 8, 4, 3, np.float64),
])
def test_forward_with_all_states_in_one_thread(blocks, shape, B, T, D, N, dtype):
    """The forward's own paths: states in groups, a forward chunk that is not the
    backward's, more (channel, state) pairs than threads, odd block shapes."""
    blocks(shape)
    compare(B, T, D, N, dtype, 16)


def test_default_block_shapes():
    """The float32 block shapes the kernels run with (no shrinking): 128-step forward chunks, the
    second one partial, 16 states in one thread staged four at a time, carries every 64 steps,
    and a second block with one channel of its eight."""
    compare(1, 200, 9, 16, np.float32, 21)


def test_block_shapes_are_checked():
    """The forward must store the state entering every chunk of the backward."""
    cuda_scan.ScanConfig(fwd_steps=8, bwd_segments=8, bwd_steps=8).check()
    with pytest.raises(ValueError, match="segments \\(3 steps\\) do not divide the backward's chunk"):
        cuda_scan.ScanConfig(fwd_steps=3).check()


@pytest.mark.parametrize("B, T, D, N", [(2, 5, 3, 0), (0, 4, 3, 2), (2, 4, 0, 2)])
def test_empty_dimensions(blocks, monkeypatch, B, T, D, N):
    """N = 0: no state, y = D u (gated), as the reference. B = 0 or D = 0: empty results and zero sums,
    with nothing launched (a CUDA grid cannot have an empty axis; the simulator would not mind)."""
    blocks(SMALL)
    if B * D == 0:
        def refuse(*args):
            raise AssertionError("a kernel was launched on an empty grid")

        class Refusing:
            def __getitem__(self, launch_config):
                return refuse
        for name in ("_forward_kernel", "_backward_kernel"):
            monkeypatch.setattr(cuda_scan, name, lambda *args: (Refusing(), 1))
    compare(B, T, D, N, np.float64, 15)


def test_exp2_of_the_float32_kernels_flushes_below_the_smallest_normal():
    """exp2_for(float32) (ex2.approx.ftz on a GPU, emulated under the simulator) is 2^x down to
    2^-126 and zero below it; float64 kernels get the exact exp2."""
    from numba import float32, float64
    from minilm.kernels.cuda import _exp2
    assert _exp2.exp2_for(float32) is _exp2.exp2_flush and _exp2.exp2_for(float64) is _exp2.exp2_exact
    x = np.array([3.5, 0.0, -1.0, -125.9, -126.0, -126.5, -149.0, -300.0], dtype=np.float32)

    @cuda.jit
    def kernel(x, out):
        i = cuda.grid(1)
        if i < x.size:
            out[i] = _exp2.exp2_flush(x[i])

    out = cuda.to_device(np.full_like(x, np.nan))
    kernel[1, x.size](cuda.to_device(x), out)
    exact = np.exp2(x.astype(np.float64))
    np.testing.assert_allclose(out.copy_to_host(), np.where(exact >= 2.0 ** -126, exact, 0.0), rtol=1e-6)


@pytest.mark.parametrize("low, high, bound", [(-5, 20, 1e-6), (-15, -5, 2e-6), (-30, -15, 3e-6), (-87, -30, 5e-6)])
def test_float32_softplus_of_the_forward(low, high, bound):
    """_softplus_f32 (the float32 forward's softplus: hardware exp2 and a polynomial for log1p)
    against log(1 + e^x) in float64, within its documented error with room for the hardware exp2;
    x itself above the threshold, 20."""
    x = np.concatenate([np.linspace(low, high, 4001), [low, high]]).astype(np.float32)

    @cuda.jit
    def kernel(x, out):
        i = cuda.grid(1)
        if i < x.size:
            out[i] = cuda_scan._softplus_f32(x[i], np.float32(cuda_scan.SOFTPLUS_THRESHOLD))

    out = np.full_like(x, np.nan)
    kernel[-(-x.size // 128), 128](x, out)
    exact = np.where(x > 20, x.astype(np.float64), np.logaddexp(0.0, x.astype(np.float64)))
    assert np.all(np.abs(out - exact) <= bound * exact)
    assert np.all(out[x > 20] == x[x > 20])
    from numba import float32, float64
    assert cuda_scan.softplus_for(float32) is cuda_scan._softplus_f32
    assert cuda_scan.softplus_for(float64) is cuda_scan._softplus


def test_decays_that_underflow_float32(blocks):
    """|A| 15 times larger: over 3 % of the decays a_t = exp(Δ A) fall below 2^-126 (checked here),
    where the float32 kernels flush them to zero and the reference keeps subnormals; results and
    gradients still agree."""
    arrays, options = make_inputs(2, 9, 3, 3, np.float32, 12)
    step = np.logaddexp(0.0, arrays["delta"] + options["delta_bias"])          # softplus
    decays = np.exp(step[..., None].astype(np.float64) * 15.0 * arrays["A"])
    assert (decays < 2.0 ** -126).mean() > 0.03
    blocks(SMALL)
    compare(2, 9, 3, 3, np.float32, 12, a_scale=15.0)


def test_segment_scan_over_four_segments(blocks):
    """Four segments per chunk: the last segment folds three aggregates, forward and in reverse."""
    blocks(FOUR_SEGMENTS)
    compare(1, 7, 2, 2, np.float64, 5)


def test_one_segment_per_chunk(blocks):
    """One segment: nothing to fold; the adjoint passed to the chunk before is the segment's own."""
    blocks(dict(SMALL, fwd_segments=1, fwd_steps=4, bwd_segments=1, bwd_steps=4))
    compare(1, 10, 3, 3, np.float64, 13)


def test_odd_block_shape(blocks):
    """Three channels and three state threads of one state each, chunks of 2 x 3 steps."""
    blocks(dict(channels=3, state_threads=3, states_per_thread=1, fwd_segments=2, fwd_steps=3,
                bwd_segments=3, bwd_steps=2))
    compare(1, 8, 4, 4, np.float32, 8)


@pytest.fixture
def warp_shuffles(monkeypatch):
    """Numba's CUDA simulator has no warp shuffles; give it cuda.shfl_xor_sync. Each thread puts its
    value in a table and, after a barrier, reads its partner's: valid where every thread of the
    block makes the same calls, as the backward's warp sums do. On a GPU nothing changes."""
    if not _device.simulator_enabled():
        return
    from numba.cuda.simulator import kernelapi
    table = {}

    def shfl_xor_sync(fake_cuda, mask, value, lane_mask):
        block = fake_cuda.blockIdx
        here = (block.x, block.y, block.z)
        lane = fake_cuda.threadIdx.x
        table[here, lane] = value
        fake_cuda.syncthreads()
        partner = table[here, lane ^ lane_mask]
        fake_cuda.syncthreads()       # everyone has read before the next call writes
        return partner

    monkeypatch.setattr(kernelapi.FakeCUDAModule, "shfl_xor_sync", shfl_xor_sync, raising=False)


@pytest.mark.parametrize("count, first, lanes", [
    (4, 1, 8),     # the backward's dB, dC terms of 2 states over 8 channel lanes
    (2, 8, 4),     # its Σ_n g B, Σ_n g A a h over 4 state threads, 8 lanes apart
    (4, 1, 2),     # more values than lanes: each lane keeps two sums
    (8, 1, 8),     # as many values as lanes
    (1, 4, 8),     # one value: a plain butterfly
    (2, 1, 1),     # one lane: nothing to add
])
def test_scatter_sums_leave_every_sum_on_one_lane(warp_shuffles, count, first, lanes):
    """_scatter_sums on a warp of 32 lanes: every group of `lanes` lanes ends with the sums over the
    group of each of its count values, and the lanes of rank < count hold each sum exactly once."""
    kept = max(1, count // lanes)

    @cuda.jit
    def kernel(data, sums, starts):
        lane = cuda.threadIdx.x
        values = cuda.local.array(count, np.float64)
        for i in range(count):
            values[i] = data[lane, i]
        starts[lane] = cuda_scan._scatter_sums(values, count, (lane // first) % lanes, first, lanes)
        for i in range(kept):
            sums[lane, i] = values[i]

    data = np.random.default_rng(count * lanes + first).standard_normal((32, count))
    sums = np.zeros((32, kept))
    starts = np.zeros(32, np.int64)
    kernel[1, 32](data, sums, starts)

    def rank(lane):
        return (lane // first) % lanes

    stored = {}
    for lane in range(32):
        group = [other for other in range(32) if other - rank(other) * first == lane - rank(lane) * first]
        assert len(group) == lanes
        for i in range(kept):
            index = starts[lane] + i
            assert sums[lane, i] == pytest.approx(data[group, index].sum(), abs=1e-12)
            if rank(lane) < count:
                key = (min(group), index)
                assert key not in stored
                stored[key] = lane
    assert len(stored) == (32 // lanes) * count


@pytest.mark.parametrize("shape, B, T, D, N, dtype", [
    # 4 channels x 4 state threads x 2 segments: one warp; two state groups (N = 5)
    (dict(channels=4, state_threads=4, states_per_thread=1), 1, 6, 5, 5, np.float64),
    # 2 states per thread: 4 dB, dC terms split over 8 channel lanes; 2 channel lanes keep 2 each
    (dict(channels=8, state_threads=4, states_per_thread=2), 1, 5, 9, 7, np.float32),
    (dict(channels=2, state_threads=8, states_per_thread=2), 2, 5, 3, 16, np.float64),
    # 32 channel lanes: one state thread per warp keeps both of its sums over the states
    (dict(channels=32, state_threads=2, states_per_thread=1), 1, 4, 33, 2, np.float64),
    # 8 x 8 x 2: a segment's state threads span two warps, each storing its partial sums in a slot
    (dict(channels=8, state_threads=8, states_per_thread=1), 1, 6, 9, 8, np.float32),
    # 3 state threads: a layout the shuffles cannot serve, so the atomics run instead
    (dict(channels=8, state_threads=3, states_per_thread=1), 1, 5, 3, 3, np.float64),
])
@pytest.mark.parametrize("warp_sums", [True, False])
def test_backward_with_and_without_warp_sums(blocks, warp_shuffles, shape, B, T, D, N, dtype, warp_sums):
    """The backward's sums over channels and state threads by warp shuffles (bwd_warp_sums, the
    default), and by shared-memory atomics alone, give the reference's gradients (all of them: the
    gate's sum Σ_n C h included)."""
    blocks(dict(shape, fwd_segments=2, fwd_steps=2, bwd_segments=2, bwd_steps=2, bwd_warp_sums=warp_sums))
    compare(B, T, D, N, dtype, 10)


def test_warp_sums_only_where_the_simulator_has_shuffles(monkeypatch):
    """The default block shape asks for warp sums; Numba's simulator has no shuffles, so there the
    backward takes the atomics path, and with shuffles lent (the warp_shuffles fixture) the
    shuffle path."""
    from numba.cuda.simulator import kernelapi
    config = cuda_scan.ScanConfig()
    assert config.bwd_warp_sums
    monkeypatch.setattr(_device, "simulator_enabled", lambda: True)
    monkeypatch.delattr(kernelapi.FakeCUDAModule, "shfl_xor_sync", raising=False)
    assert not cuda_scan.backward_warp_sums(config, 16)
    monkeypatch.setattr(kernelapi.FakeCUDAModule, "shfl_xor_sync", lambda *args: 0, raising=False)
    assert cuda_scan.backward_warp_sums(config, 16)
    assert not cuda_scan.backward_warp_sums(cuda_scan.ScanConfig(bwd_warp_sums=False), 16)


def test_warp_sums_fit_only_whole_aligned_lane_groups():
    assert cuda_scan._warp_sums_fit(8, 8, 2, 512)
    assert cuda_scan._warp_sums_fit(4, 4, 1, 32)
    assert not cuda_scan._warp_sums_fit(8, 3, 2, 384)       # state threads not a power of two
    assert not cuda_scan._warp_sums_fit(6, 4, 2, 96)        # channels not a power of two
    assert not cuda_scan._warp_sums_fit(2, 2, 2, 8)         # a partial warp
    assert not cuda_scan._warp_sums_fit(64, 1, 2, 64)       # channel lanes wider than a warp
    assert not cuda_scan._warp_sums_fit(16, 8, 2, 256)      # state threads over four warps: four slots
    assert not cuda_scan._warp_sums_fit(8, 8, 3, 512)       # 6 dB, dC terms per thread: not halved evenly


def test_fold_rows_spread_a_warps_stores_over_the_banks():
    """The backward's rows of segment aggregates (_fold_rows), at the default block shape (8 channels,
    8 state threads of 2 states): each (state thread, state) gets a row of its own inside the buffer,
    and a warp's store of one state per thread (4 state threads × 8 channels, row-major 8-word rows)
    takes each of the 32 banks once, where rows without the spare ones would take half of them twice."""
    config = cuda_scan.CONFIGS["float32"]
    DG, NT, NPT = config.channels, config.state_threads, config.states_per_thread
    rows = [cuda_scan._fold_rows(nt, NPT) + j for nt in range(NT) for j in range(NPT)]
    assert len(set(rows)) == NT * NPT and max(rows) < cuda_scan._fold_rows(NT - 1, NPT) + NPT

    def busiest_bank(first_row, warp, j):
        """Words in the busiest bank when the warp's threads store state j at first_row(nt) + j."""
        words = {(first_row(nt) + j) * DG + lane for nt in range(warp, warp + 32 // DG) for lane in range(DG)}
        return max(Counter(word % 32 for word in words).values())

    for warp in range(0, NT, 32 // DG):
        for j in range(NPT):
            assert busiest_bank(lambda nt: cuda_scan._fold_rows(nt, NPT), warp, j) == 1
            assert busiest_bank(lambda nt: nt * NPT, warp, j) == 2


def test_device_arrays_in_device_arrays_out(blocks):
    """Numba device arrays go in without a copy and come back as device arrays."""
    blocks(SMALL)
    arrays, options = make_inputs(1, 5, 2, 2, np.float32, 6)
    (out_ref, final_ref), cache_ref = reference.forward(*arrays.values(), return_state=True, **options)
    on_device = {name: cuda.to_device(value) for name, value in arrays.items()}
    options_device = {name: (None if value is None else cuda.to_device(value)) for name, value in options.items()}
    (out, final), cache = cuda_scan.forward(*on_device.values(), return_state=True, **options_device)
    assert _device.array_kind(out) == "device" and _device.array_kind(final) == "device"
    assert relative_error(out.copy_to_host(), out_ref) <= 1e-5
    assert relative_error(final.copy_to_host(), final_ref) <= 1e-5
    dout = np.ones(out_ref.shape, np.float32)
    grads = cuda_scan.backward(cuda.to_device(dout), cache)
    grads_ref = reference.backward(dout, cache_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        assert _device.array_kind(grad) == "device"
        assert relative_error(grad.copy_to_host(), grad_ref) <= 1e-5


def test_every_option_is_supported():
    assert cuda_scan.supports(delta_softplus=True, z=True)[0]
    assert cuda_scan.available()[0]


def test_more_batch_entries_than_a_grid_axis_holds_raise():
    """One block row per batch entry along a grid axis of at most 65535 blocks: beyond, a clear error
    before any launch."""
    arrays, _ = make_inputs(65536, 1, 1, 1, np.float32, 14)
    with pytest.raises(ValueError, match="u has 65536 batch entries.*at most 65535"):
        cuda_scan.forward(*arrays.values())


def test_mismatched_dtypes_are_rejected(blocks):
    blocks(SMALL)
    arrays, _ = make_inputs(1, 3, 1, 1, np.float32, 7)
    arrays["A"] = arrays["A"].astype(np.float64)
    with pytest.raises(TypeError, match="A must have the same dtype"):
        cuda_scan.forward(*arrays.values())
