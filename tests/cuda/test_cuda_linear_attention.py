"""The linear-attention CUDA kernels against the NumPy reference (minilm.ops.linear_attention).

Runs on a GPU or under the CUDA simulator (see conftest.py). The tile (= chunk length) is shrunk to
8 so that tiny inputs span several chunks, with T, Dk and Dv not multiples of it. Output, final
state and the gradients of q, k, v (and log_decay) are compared on fresh random inputs,
scale-aware: max|cuda - ref| / max|ref| <= 1e-5 in float32 and 1e-10 in float64. The tensor-core
tiles (TF32, 3xTF32) run the same comparisons at tiles of 16 and 32 (their mma emulated under the
simulator: see _tensor_cores.py).
"""
import numpy as np
import pytest

from minilm.ops import linear_attention as linear_attention_op

cuda_la = pytest.importorskip("minilm.kernels.cuda.linear_attention")
from minilm.kernels.cuda import _device  # noqa: E402
from minilm.testing import numpy_reference

reference = numpy_reference(linear_attention_op)

TOLERANCE = {np.float32: 1e-5, np.float64: 1e-10}


@pytest.fixture(autouse=True)
def small_tiles():
    saved = {dtype: cuda_la.set_tile(dtype, 8) for dtype in ("float32", "float64")}
    yield
    for dtype, previous in saved.items():
        cuda_la.set_tile(dtype, *previous)


def make_inputs(B, H, T, Dk, Dv, dtype, seed, decay=None, state=False):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, H, T, Dk)).astype(dtype) for _ in range(2))
    v = rng.standard_normal((B, H, T, Dv)).astype(dtype)
    log_decay = None
    if decay == "head":
        log_decay = -rng.uniform(0.01, 0.5, H).astype(dtype)
    elif decay == "step":
        log_decay = -rng.uniform(0.0, 0.5, (B, H, T)).astype(dtype)
    initial_state = rng.standard_normal((B, H, Dk, Dv)).astype(dtype) if state else None
    return (q, k, v), dict(log_decay=log_decay, initial_state=initial_state)


def relative_error(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


@pytest.mark.parametrize("B, H, T, Dk, Dv, dtype, seed, options", [
    (1, 1, 1, 3, 2, np.float64, 0, {}),                                            # T = 1
    (1, 2, 19, 9, 5, np.float64, 1, dict(decay="step", state=True, scale=0.5)),    # 3 chunks, last partial
    (2, 1, 11, 4, 10, np.float64, 2, dict(feature_map="elu1", decay="head")),
    (1, 1, 9, 8, 8, np.float32, 3, dict(feature_map="relu", state=True)),
    (2, 2, 8, 5, 3, np.float32, 4, dict(decay="step")),
    # more chunks than the chunk scan loads at once (SCAN_UNROLL): 19 = 8 + 8 + 3, and 10 = 8 + 2
    (1, 1, 152, 4, 3, np.float64, 5, dict(decay="step", state=True)),
    (1, 2, 75, 3, 4, np.float32, 6, {}),
])
def test_matches_reference(B, H, T, Dk, Dv, dtype, seed, options):
    options = dict(options)
    decay, state = options.pop("decay", None), options.pop("state", False)
    (q, k, v), inputs = make_inputs(B, H, T, Dk, Dv, dtype, seed, decay, state)
    kwargs = dict(options, return_state=True, **inputs)
    (out_ref, final_ref), cache_ref = reference.forward(q, k, v, mode="chunked", chunk_size=4, **kwargs)
    (out, final), cache = cuda_la.forward(q, k, v, **kwargs)
    assert cache["backend"] == "cuda"
    tolerance = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert relative_error(out, out_ref) <= tolerance
    assert relative_error(final, final_ref) <= tolerance

    do = np.random.default_rng(seed + 1).standard_normal(out_ref.shape).astype(dtype)
    grads_ref = reference.backward(do, cache_ref)
    grads = cuda_la.backward(do, cache)
    assert len(grads) == len(grads_ref) == (3 if decay is None else 4)
    for name, grad, grad_ref in zip(("dq", "dk", "dv", "dlog_decay"), grads, grads_ref):
        assert grad.dtype == dtype and grad.shape == grad_ref.shape, name
        error = relative_error(grad, grad_ref)
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


def run_and_compare(q, k, v, inputs, options, dtype, seed):
    """{name: relative error} of out, final state and every gradient against the reference."""
    kwargs = dict(options, return_state=True, **inputs)
    (out_ref, final_ref), cache_ref = reference.forward(q, k, v, mode="chunked", chunk_size=4, **kwargs)
    (out, final), cache = cuda_la.forward(q, k, v, **kwargs)
    do = np.random.default_rng(seed + 1).standard_normal(out_ref.shape).astype(dtype)
    grads_ref = reference.backward(do, cache_ref)
    grads = cuda_la.backward(do, cache)
    assert len(grads) == len(grads_ref)
    errors = {"out": relative_error(out, out_ref), "final": relative_error(final, final_ref)}
    errors.update({name: relative_error(grad, grad_ref)
                   for name, grad, grad_ref in zip(("dq", "dk", "dv", "dlog_decay"), grads, grads_ref)})
    return errors


@pytest.mark.parametrize("mode, tile, B, H, T, Dk, Dv, seed, options", [
    # one warp per block (tile 16): 2 chunks, the last partial; Dk over two tiles; decay, state, elu1
    ("tf32", 16, 1, 1, 20, 20, 9, 6, dict(decay="step", state=True, scale=0.5, feature_map="elu1")),
    ("3xtf32", 16, 1, 1, 16, 5, 18, 7, dict(decay="head")),          # Dv over two tiles
    ("tf32", 32, 1, 1, 9, 3, 4, 8, dict()),                          # two warps per block (tile 32)
])
def test_tensor_cores_match_reference(mode, tile, B, H, T, Dk, Dv, seed, options):
    """3xTF32 agrees with the reference as closely as the float FMAs; plain TF32 to about 1e-3
    (its inputs keep 10 mantissa bits), and not better than 1e-6, so that its rounding shows.
    (Small: every emulated mma waits for 32 simulated threads.)"""
    cuda_la.set_tile("float32", tile, tensor_cores=mode)
    options = dict(options)
    decay, state = options.pop("decay", None), options.pop("state", False)
    (q, k, v), inputs = make_inputs(B, H, T, Dk, Dv, np.float32, seed, decay, state)
    errors = run_and_compare(q, k, v, inputs, options, np.float32, seed)
    if mode == "3xtf32":
        assert max(errors.values()) <= 1e-5, errors
    else:
        assert max(errors.values()) <= 2e-2, errors
        assert errors["out"] > 1e-6, errors


def test_simulated_tf32_rounds_to_nearest_ties_away():
    """tf32 keeps 10 mantissa bits: 1 + 2^-11 (a tie) goes up to 1 + 2^-10, 1 + 2^-12 down to 1,
    signs symmetric (cvt.rna); values already in TF32 stay."""
    if not _device.simulator_enabled():
        pytest.skip("on a GPU tf32 is the hardware instruction (bench/tensor_core_probe.py)")
    from minilm.kernels.cuda._tensor_cores import tf32
    f = np.float32
    assert tf32(f(1 + 2.0 ** -11)) == f(1 + 2.0 ** -10)
    assert tf32(f(-(1 + 2.0 ** -11))) == f(-(1 + 2.0 ** -10))
    assert tf32(f(1 + 2.0 ** -12)) == f(1.0)
    assert tf32(f(1 + 3 * 2.0 ** -12)) == f(1 + 2.0 ** -10)
    for x in (0.0, 1.0, -2.5, 1 + 2.0 ** -10, 2.0 ** -100, 3 * 2.0 ** 60):
        assert tf32(f(x)) == f(x)


@pytest.mark.parametrize("tile", [16, 32, 64])
def test_tensor_core_tiles_are_owned_once(tile):
    """On tensor cores, the threads' accumulators cover the tile × tile product exactly once (at
    tile 64, the default, eight warps in a 4 × 2 grid, too many threads to simulate end to end)."""
    threads, rows, cols = cuda_la.tile_layout(tile, 4, 1)
    acc = np.zeros((rows, cols), np.float32)
    owners = np.zeros((tile, tile), int)
    for tid in range(threads):
        for i in range(acc.shape[0]):
            for j in range(acc.shape[1]):
                owners[cuda_la._owned_row(i, tid, acc, tile, 1), cuda_la._owned_col(j, tid, acc, tile, 1)] += 1
    assert np.all(owners == 1)


@pytest.mark.parametrize("dtype, tile, mode", [("float64", 16, "tf32"), ("float32", 8, "3xtf32"),
                                                ("float32", 16, "fp16")])
def test_tensor_core_settings_are_checked(dtype, tile, mode):
    before = (cuda_la.TILES[dtype], cuda_la.TENSOR_CORES[dtype])
    with pytest.raises(ValueError, match="tensor"):
        cuda_la.set_tile(dtype, tile, tensor_cores=mode)
    assert (cuda_la.TILES[dtype], cuda_la.TENSOR_CORES[dtype]) == before


@pytest.mark.parametrize("loads", [1, 3])
def test_loads_in_flight_do_not_change_results(loads):
    """A thread's tile loads go out `loads` at a time before their stores (LOADS): one at a time,
    and three (rounded down to two, a divisor of the 16 elements per thread at tile 8) give the
    reference's results, feature map and decay included."""
    cuda_la.set_tile("float32", 8, loads=loads)
    (q, k, v), inputs = make_inputs(2, 1, 11, 9, 5, np.float32, 11, "step", True)
    errors = run_and_compare(q, k, v, inputs, dict(feature_map="elu1"), np.float32, 11)
    assert max(errors.values()) <= TOLERANCE[np.float32], errors


def test_odd_register_tile():
    """With an odd register tile (here 1 x 1: 64 threads at tile 8) a thread's columns are strided,
    not paired, and the tile rows have odd length (tile_row_stride); results are the reference's."""
    cuda_la.set_tile("float32", 8, reg=1)
    (q, k, v), inputs = make_inputs(1, 2, 13, 6, 7, np.float32, 12, "head", True)
    errors = run_and_compare(q, k, v, inputs, dict(feature_map="relu"), np.float32, 12)
    assert max(errors.values()) <= TOLERANCE[np.float32], errors


@pytest.mark.parametrize("loads", [0, -1, 2.0])
def test_loads_setting_is_checked(loads):
    before = cuda_la.LOADS["float32"]
    with pytest.raises(ValueError, match="loads"):
        cuda_la.set_tile("float32", 8, loads=loads)
    assert cuda_la.LOADS["float32"] == before


def test_device_arrays_in_device_arrays_out():
    from numba import cuda
    (q, k, v), _ = make_inputs(1, 1, 6, 3, 2, np.float32, 5)
    out_ref, cache_ref = reference.forward(q, k, v)
    out, cache = cuda_la.forward(*(cuda.to_device(x) for x in (q, k, v)))
    assert _device.array_kind(out) == "device"
    assert relative_error(out.copy_to_host(), out_ref) <= 1e-5
    do = np.ones(out_ref.shape, np.float32)
    for grad, grad_ref in zip(cuda_la.backward(cuda.to_device(do), cache), reference.backward(do, cache_ref)):
        assert _device.array_kind(grad) == "device"
        assert relative_error(grad.copy_to_host(), grad_ref) <= 1e-5


@pytest.mark.parametrize("options, supported", [
    (dict(), True),
    (dict(feature_map="elu1"), True),
    (dict(feature_map="relu"), True),
    (dict(feature_map="taylor2"), False),
    (dict(normalize=True), False),
    (dict(causal=False), False),
])
def test_supports(options, supported):
    ok, reason = cuda_la.supports(**options)
    assert ok is supported
    assert ok or reason


def test_unsupported_options_raise():
    (q, k, v), _ = make_inputs(1, 1, 2, 2, 2, np.float32, 6)
    with pytest.raises(ValueError, match="normalize"):
        cuda_la.forward(q, k, v, normalize=True)


def test_more_batch_and_heads_than_a_grid_axis_holds_raise():
    """One block per (batch, head) pair along a grid axis of at most 65535 blocks: beyond, a clear
    error before any launch (the driver's own error does not say why)."""
    q = np.zeros((2, 32768, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"q has 65536 \(batch, head\) pairs.*at most 65535"):
        cuda_la.forward(q, q, q)


def words_per_bank(addresses):
    """Distinct 4-byte words a warp touches in its busiest shared-memory bank (32 banks): the
    passes the access takes."""
    banks = {}
    for address in set(addresses):
        banks.setdefault(address % 32, set()).add(address)
    return max(len(words) for words in banks.values())


@pytest.mark.parametrize("tile", [16, 32, 64])
def test_tile_row_stride_spreads_fragment_loads_over_banks(tile):
    """The tensor-core tiles' row length keeps a fragment load to one pass (left operand) or two
    (right), where rows of tile + 1 words take up to four; the FMA tiles' rows are of even length
    (8-byte pair loads) and a transposed store there takes at most two passes."""
    lanes = [(lane // 4, lane % 4) for lane in range(32)]          # lane 4g + t
    stride = cuda_la.tile_row_stride(tile, 4, 1)
    assert words_per_bank([g * stride + t for g, t in lanes]) == 1           # left: row g, column t
    assert words_per_bank([t * stride + g for g, t in lanes]) <= 2           # right: row t, column g
    assert words_per_bank([g * (tile + 1) + t for g, t in lanes]) >= 2
    fma = cuda_la.tile_row_stride(tile, 4, 0)
    assert fma % 2 == 0 and cuda_la.tile_row_stride(tile, 3, 0) == tile + 1
    assert words_per_bank([lane * fma for lane in range(32)]) <= 2          # transposed store
