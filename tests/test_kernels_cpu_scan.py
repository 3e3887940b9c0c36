"""Numba selective-scan kernels against the NumPy reference, and the vectorizable exp they use.

Kernel == reference for the output, the final state and all eight gradients, on hypothesis-drawn
shapes (T = 1, T not a multiple of the carry interval, B = 1, N = 1), with every optional input
present or absent, softplus on or off, and an initial state. Scale-aware error max|a - r| / max|r|:
<= 5e-5 in float32, <= 1e-10 in float64. Also: the one-token step, state continuation, the size
of the cache and the peak memory, and fastmath.exp / softplus / sigmoid accuracy and edge values.
"""
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilm.kernels.cpu import fastmath
from minilm.kernels.cpu import selective_scan as kernel
from minilm.ops import selective_scan as selective_scan_op
from minilm.testing import numpy_reference

reference = numpy_reference(selective_scan_op)

GRAD_NAMES = ("du", "ddelta", "dA", "dBm", "dCm", "dD", "dz", "ddelta_bias")
# float32: both sides round in float32, in different orders, so a gradient that is a sum of a few
# terms which nearly cancel (dBm = Σ_d g Δ u over 5 channels at T = 1, for one drawn case) differs
# by about eps times the terms, 1.00009e-5 of the result there: 5e-5 leaves room for that.
TOLERANCE = {np.float32: 5e-5, np.float64: 1e-10}


def scaled_error(actual, expected):
    """max|a - r| / max|r| (plain max|a - r| when r is all zeros)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def make_inputs(seed, B, T, D, N, dtype, *, with_D=True, with_z=True, with_bias=True, softplus=True,
                with_state=True, mixed_sign_A=False):
    """Keyword arguments for forward. A < 0 (or of either sign, kept small) and a positive step Δ."""
    rng = np.random.default_rng(seed)
    if softplus:
        delta = rng.standard_normal((B, T, D))
        bias = 0.5 * rng.standard_normal(D) if with_bias else None
    else:
        delta = rng.uniform(0.05, 1.0, (B, T, D))
        bias = rng.uniform(0.0, 0.3, D) if with_bias else None
    A = rng.uniform(-1.0, 1.0, (D, N)) if mixed_sign_A else -np.exp(rng.uniform(-1.0, 1.0, (D, N)))
    arrays = dict(u=rng.standard_normal((B, T, D)), delta=delta, A=A,
                  Bm=rng.standard_normal((B, T, N)), Cm=rng.standard_normal((B, T, N)),
                  D=rng.standard_normal(D) if with_D else None,
                  z=rng.standard_normal((B, T, D)) if with_z else None, delta_bias=bias,
                  initial_state=rng.standard_normal((B, D, N)) if with_state else None)
    inputs = {k: (None if v is None else v.astype(dtype)) for k, v in arrays.items()}
    inputs["delta_softplus"] = softplus
    return inputs


def run_both(inputs, dout_seed=0, carry_every=None):
    """(out, final_state, grads) from the reference and from the kernel, same inputs and dout."""
    (out_r, state_r), cache_r = reference.forward(mode="recurrent", return_state=True, **inputs)
    (out_k, state_k), cache_k = kernel.forward(return_state=True, carry_every=carry_every, **inputs)
    dout = np.random.default_rng(dout_seed).standard_normal(out_r.shape).astype(out_r.dtype)
    return ((out_r, state_r, reference.backward(dout, cache_r)),
            (out_k, state_k, kernel.backward(dout, cache_k)))


def assert_same(expected, actual, dtype):
    (out_r, state_r, grads_r), (out_k, state_k, grads_k) = expected, actual
    tol = TOLERANCE[dtype]
    assert out_k.dtype == dtype and state_k.dtype == dtype
    assert scaled_error(out_k, out_r) <= tol, "out"
    assert scaled_error(state_k, state_r) <= tol, "final state"
    for name, g_r, g_k in zip(GRAD_NAMES, grads_r, grads_k):
        if g_r is None:
            assert g_k is None, f"{name} should be None"
            continue
        assert g_k.dtype == dtype, name
        err = scaled_error(g_k, g_r)
        assert err <= tol, f"{name}: scaled error {err:.2e} > {tol:.0e}"


# ------------------------------------------------------------------------------------------------
# Kernel == reference

@given(B=st.integers(1, 2), T=st.integers(1, 19), D=st.integers(1, 19), N=st.integers(1, 5),
       carry_every=st.integers(1, 8), dtype=st.sampled_from([np.float32, np.float64]),
       with_D=st.booleans(), with_z=st.booleans(), with_bias=st.booleans(), softplus=st.booleans(),
       with_state=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_reference(B, T, D, N, carry_every, dtype, with_D, with_z, with_bias, softplus,
                                  with_state, seed):
    inputs = make_inputs(seed, B, T, D, N, dtype, with_D=with_D, with_z=with_z, with_bias=with_bias,
                         softplus=softplus, with_state=with_state)
    assert_same(*run_both(inputs, seed, carry_every), dtype)


# (B, T, D, N, carry_every): T = 1; T a multiple of the interval; one more; the default interval
# (CHUNK) crossed once; more channels than one block, with a partial last block.
EDGE_SHAPES = [(1, 1, 1, 1, None), (2, 8, 3, 2, 4), (1, 9, 3, 2, 4), (1, kernel.CHUNK + 3, 2, 3, None),
               (2, 6, 2 * kernel.CHANNEL_BLOCK + 5, 4, 5)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "B{}T{}D{}N{}c{}".format(*s))
def test_kernel_matches_reference_edge_shapes(shape, dtype):
    B, T, D, N, carry_every = shape
    inputs = make_inputs(T * 31 + D, B, T, D, N, dtype)
    assert_same(*run_both(inputs, 1, carry_every), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_matches_reference_with_A_of_either_sign(dtype):
    # exp(Δ A) > 1 on some channels: the fast exp must be right for positive arguments too.
    inputs = make_inputs(5, 2, 7, 3, 4, dtype, softplus=False, mixed_sign_A=True)
    assert_same(*run_both(inputs, 2, 3), dtype)


def test_bare_options_give_none_gradients():
    inputs = make_inputs(3, 1, 4, 2, 2, np.float64, with_D=False, with_z=False, with_bias=False,
                         softplus=False, with_state=False)
    out, cache = kernel.forward(**inputs)
    grads = kernel.backward(np.ones_like(out), cache)
    assert [g is None for g in grads] == [False] * 5 + [True] * 3
    assert out.shape == (1, 4, 2) and cache["backend"] == "numba"


def test_prompt_then_continuation_equals_whole_sequence():
    inputs = make_inputs(11, 2, 13, 5, 3, np.float64)
    whole, _ = kernel.forward(**inputs)
    first = {k: (v[:, :6] if k in ("u", "delta", "Bm", "Cm", "z") else v) for k, v in inputs.items()}
    rest = {k: (v[:, 6:] if k in ("u", "delta", "Bm", "Cm", "z") else v) for k, v in inputs.items()}
    (head, state), _ = kernel.forward(return_state=True, **first)
    rest["initial_state"] = state
    tail, _ = kernel.forward(**rest)
    np.testing.assert_allclose(np.concatenate([head, tail], axis=1), whole, rtol=1e-12, atol=1e-12)


def test_chunk_size_argument_does_not_change_results():
    inputs = make_inputs(4, 1, 10, 3, 2, np.float64)
    out_a, _ = kernel.forward(chunk_size=3, **inputs)
    out_b, _ = kernel.forward(chunk_size=64, **inputs)
    np.testing.assert_array_equal(out_a, out_b)


def test_inputs_are_not_modified():
    inputs = make_inputs(8, 2, 9, 4, 3, np.float32)
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}
    out, cache = kernel.forward(carry_every=4, **inputs)
    kernel.backward(np.ones_like(out), cache)
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(inputs[k], v, err_msg=k)


def test_backward_rejects_bad_dout():
    inputs = make_inputs(1, 1, 3, 2, 2, np.float32)
    out, cache = kernel.forward(**inputs)
    with pytest.raises(TypeError, match="dout"):
        kernel.backward(out.astype(np.float64), cache)
    with pytest.raises(ValueError, match="dout"):
        kernel.backward(out[:, :2], cache)


def test_carry_every_must_be_positive():
    with pytest.raises(ValueError, match="carry_every"):
        kernel.forward(carry_every=0, **make_inputs(1, 1, 3, 2, 2, np.float32))


# ------------------------------------------------------------------------------------------------
# Memory: only per-chunk carries are cached; peak extra memory within 2x the inputs

def test_cache_holds_only_chunk_carries():
    B, T, D, N = 2, 70, 6, 4
    inputs = make_inputs(2, B, T, D, N, np.float32)
    _, cache = kernel.forward(carry_every=16, **inputs)
    assert cache["carries"].shape == (B, 5, D, N)
    for key, value in cache.items():
        if isinstance(value, np.ndarray):
            assert value.size < B * T * D * N, f"cache[{key!r}] holds {value.shape}"
    _, cache = kernel.forward(**inputs)
    assert cache["carry_every"] == kernel.CHUNK and cache["carries"].shape == (B, 1, D, N)


def test_forward_backward_peak_memory_within_twice_the_inputs():
    inputs = make_inputs(6, 1, 512, 256, 16, np.float32)
    input_bytes = sum(v.nbytes for v in inputs.values() if isinstance(v, np.ndarray))
    out, cache = kernel.forward(**inputs)                # compile / load outside the measurement
    kernel.backward(out, cache)
    del out, cache
    tracemalloc.start()
    try:
        out, cache = kernel.forward(**inputs)
        grads = kernel.backward(out, cache)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(grads) == 8
    assert peak <= 2 * input_bytes, f"peak {peak} bytes for {input_bytes} bytes of inputs"


# ------------------------------------------------------------------------------------------------
# One-token step

def step_inputs(inputs, t=0):
    """The step's arguments for token t of a forward's inputs (state: the initial state)."""
    def at(name):
        return None if inputs[name] is None else inputs[name][:, t]
    state = inputs["initial_state"]
    if state is None:
        state = np.zeros((inputs["u"].shape[0],) + inputs["A"].shape, dtype=inputs["u"].dtype)
    return (at("u"), at("delta"), inputs["A"], at("Bm"), at("Cm"), inputs["D"], at("z"),
            inputs["delta_bias"], inputs["delta_softplus"], state)


@given(B=st.integers(1, 3), D=st.integers(1, 9), N=st.integers(1, 5),
       dtype=st.sampled_from([np.float32, np.float64]), with_D=st.booleans(), with_z=st.booleans(),
       with_bias=st.booleans(), softplus=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_step_matches_reference_on_one_token(B, D, N, dtype, with_D, with_z, with_bias, softplus, seed):
    inputs = make_inputs(seed, B, 1, D, N, dtype, with_D=with_D, with_z=with_z, with_bias=with_bias,
                         softplus=softplus)
    (out_r, state_r), _ = reference.forward(mode="recurrent", return_state=True, **inputs)
    args = step_inputs(inputs)
    state_before = args[-1].copy()
    out_k, state_k = kernel.step(*args)
    tol = TOLERANCE[dtype]
    assert out_k.shape == (B, D) and state_k.shape == (B, D, N)
    assert out_k.dtype == dtype and state_k.dtype == dtype
    assert scaled_error(out_k, out_r[:, 0]) <= tol
    assert scaled_error(state_k, state_r) <= tol
    np.testing.assert_array_equal(args[-1], state_before)    # the state passed in is not modified


def test_steps_reproduce_forward():
    inputs = make_inputs(9, 2, 6, 4, 3, np.float64)
    out, _ = kernel.forward(**inputs)
    state = inputs["initial_state"]
    for t in range(6):
        args = step_inputs(inputs, t)
        out_t, state = kernel.step(*args[:-1], state)
        np.testing.assert_allclose(out_t, out[:, t], rtol=1e-12, atol=1e-12)


def test_step_rejects_bad_shapes_and_dtypes():
    args = list(step_inputs(make_inputs(1, 2, 1, 3, 2, np.float32)))
    bad_state = args[:-1] + [args[-1][:, :2]]
    with pytest.raises(ValueError, match="state"):
        kernel.step(*bad_state)
    bad_dtype = [args[0].astype(np.float64)] + args[1:]
    with pytest.raises(TypeError, match="dtype"):
        kernel.step(*bad_dtype)


def test_available_and_supports():
    ok, reason = kernel.available()
    assert ok is True and isinstance(reason, str)
    assert kernel.supports(delta_softplus=True, z=True)[0] is True


# ------------------------------------------------------------------------------------------------
# fastmath: exp, softplus, sigmoid

def _max_relative_error(computed, x):
    truth = np.exp(x.astype(np.longdouble))
    return float(np.max(np.abs(computed.astype(np.longdouble) - truth) / truth))


@pytest.mark.parametrize("dtype, low, high, bound", [
    (np.float32, -87.3, 0.0, 1.5e-7), (np.float32, 0.0, 88.7, 1e-6),
    (np.float64, -708.3, 0.0, 3e-16), (np.float64, 0.0, 709.7, 2e-14)])
def test_exp_relative_error(dtype, low, high, bound):
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(low, high, 200_001), rng.uniform(low, high, 200_000)]).astype(dtype)
    assert _max_relative_error(fastmath.exp_array(x), x) <= bound


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_edge_values(dtype):
    flush = fastmath.FLUSH_F32 if dtype == np.float32 else fastmath.FLUSH_F64
    exp_max = fastmath.EXP_MAX_F32 if dtype == np.float32 else fastmath.EXP_MAX_F64
    x = np.array([0.0, -0.0, -np.inf, flush * 1.0001, -1e4, -1e30, np.inf, exp_max * 1.0001, 1e30],
                 dtype=dtype)
    expected = np.array([1, 1, 0, 0, 0, 0, np.inf, np.inf, np.inf], dtype=dtype)
    np.testing.assert_array_equal(fastmath.exp_array(x), expected)
    # just above the flush point the result is a (subnormal) nonzero number of the right size
    just_above = np.array([flush * 0.9999], dtype=dtype)
    with np.errstate(under="ignore"):
        np.testing.assert_allclose(fastmath.exp_array(just_above), np.exp(just_above), rtol=1e-3)
    assert fastmath.exp_array(x).dtype == dtype


@pytest.mark.parametrize("dtype, bound", [(np.float32, 5e-7), (np.float64, 2e-15)])
def test_softplus_and_sigmoid_accuracy(dtype, bound):
    x = np.linspace(-60.0, 60.0, 100_001).astype(dtype)
    wide = x.astype(np.longdouble)
    softplus_truth = np.where(wide > 20, wide, np.log1p(np.exp(wide)))
    sigmoid_truth = 1 / (1 + np.exp(-wide))
    for computed, truth in ((fastmath.softplus_array(x), softplus_truth),
                            (fastmath.sigmoid_array(x), sigmoid_truth)):
        assert computed.dtype == dtype
        assert float(np.max(np.abs(computed - truth) / truth)) <= bound
    above = x[x > 20]
    np.testing.assert_array_equal(fastmath.softplus_array(above), above)   # identity above 20
    edges = np.array([0.0, -1000.0, 1000.0], dtype=dtype)       # e^1000 overflows: exactly 0 and 1
    np.testing.assert_array_equal(fastmath.sigmoid_array(edges), np.array([0.5, 0.0, 1.0], dtype=dtype))


def test_array_helpers_reject_other_dtypes():
    with pytest.raises(TypeError):
        fastmath.exp_array(np.zeros(3, dtype=np.float16))
