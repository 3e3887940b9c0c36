"""Selective scan: gradients against finite differences, the three modes against each other,
state carrying, float32 against float64, discretization against the matrix exponential, long and
extreme inputs, and every kind of bad input."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.linalg import expm
from scipy.special import expit

from minilm.ops import selective_scan as selective_scan_op
from minilm.ops._backend import BackendUnavailable
from minilm.testing import check_op_gradients, numpy_reference

ss = numpy_reference(selective_scan_op)

INPUT_NAMES = ("u", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias")

# float32 vs float64: |x32 - x64| <= FLOAT32_TOL * (1 + max|x64|), for out, final state and every
# gradient (observed worst case on these input ranges: about 2e-6).
FLOAT32_TOL = 1e-4


def make_inputs(rng, B, T, D, N, *, with_D=True, with_z=True, with_bias=True, softplus=True,
                dtype=np.float64):
    """[u, delta, A, Bm, Cm, D, z, delta_bias] with A < 0 and a positive step Δ, so the state
    stays bounded (a negative Δ makes exp(Δ A) > 1 and the state, and finite differences, blow up)."""
    u = rng.standard_normal((B, T, D))
    if softplus:
        delta = rng.standard_normal((B, T, D))            # softplus makes Δ positive
        bias = 0.5 * rng.standard_normal(D) if with_bias else None
    else:
        delta = rng.uniform(0.05, 1.0, (B, T, D))
        bias = rng.uniform(0.0, 0.3, D) if with_bias else None
    A = -np.exp(rng.uniform(-1.0, 1.0, (D, N)))
    Bm = rng.standard_normal((B, T, N))
    Cm = rng.standard_normal((B, T, N))
    D_skip = rng.standard_normal(D) if with_D else None
    z = rng.standard_normal((B, T, D)) if with_z else None
    arrays = [u, delta, A, Bm, Cm, D_skip, z, bias]
    return [None if a is None else a.astype(dtype) for a in arrays]


# ------------------------------------------------------------------------------------------------
# Gradients against finite differences (float64)

CONFIGS = [
    dict(with_D=False, with_z=False, with_bias=False, softplus=False),
    dict(with_D=True, with_z=False, with_bias=True, softplus=False),
    dict(with_D=False, with_z=True, with_bias=False, softplus=True),
    dict(with_D=True, with_z=True, with_bias=True, softplus=True),
]
# (B, T, D, N, chunk_size, with initial_state): chunks that do not divide T, T = 1, T < chunk.
SHAPES = [(1, 1, 2, 1, 2, False), (2, 5, 3, 2, 2, True), (1, 7, 2, 3, 3, True), (2, 2, 2, 2, 3, False)]


@pytest.mark.parametrize("mode", ss.MODES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(k for k, v in c.items() if v) or "bare")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}D{}N{}c{}{}".format(*s[:5], "h0" if s[5] else ""))
def test_gradients_match_finite_differences(mode, config, shape):
    B, T, D, N, chunk_size, with_state = shape
    rng = np.random.default_rng(T * 100 + D * 10 + N)
    inputs = make_inputs(rng, B, T, D, N, **config)
    initial_state = rng.standard_normal((B, D, N)) if with_state else None
    wrt = [i for i, x in enumerate(inputs) if x is not None]
    errors = check_op_gradients(ss.forward, ss.backward, inputs, wrt=wrt, mode=mode, chunk_size=chunk_size,
                                delta_softplus=config["softplus"], initial_state=initial_state)
    for i, err in errors.items():
        assert err <= 1e-6, f"d{INPUT_NAMES[i]}: relative error {err:.2e}"


@pytest.mark.parametrize("mode", ss.MODES)
def test_gradients_with_A_of_either_sign(mode):
    # Any finite A is accepted; keep Δ|A| small so the growing channels stay moderate.
    rng = np.random.default_rng(7)
    inputs = make_inputs(rng, 2, 5, 2, 3, softplus=False)
    inputs[2] = rng.uniform(-1.0, 1.0, (2, 3))
    errors = check_op_gradients(ss.forward, ss.backward, inputs, wrt=range(8), mode=mode, chunk_size=2,
                                initial_state=rng.standard_normal((2, 2, 3)))
    assert max(errors.values()) <= 1e-6, errors


def test_backward_returns_none_for_absent_inputs_and_no_state_gradient():
    rng = np.random.default_rng(0)
    inputs = make_inputs(rng, 1, 4, 2, 2, with_D=False, with_z=False, with_bias=False)
    out, cache = ss.forward(*inputs, initial_state=np.ones((1, 2, 2)))
    grads = ss.backward(np.ones_like(out), cache)
    assert len(grads) == 8
    assert [g is None for g in grads] == [False] * 5 + [True] * 3
    for g, x in zip(grads[:5], inputs[:5]):
        assert g.shape == x.shape and g.dtype == x.dtype


# ------------------------------------------------------------------------------------------------
# Properties (hypothesis): modes agree, state carrying, float32, decay

@st.composite
def scan_cases(draw, min_T=1):
    return dict(B=draw(st.integers(1, 2)), T=draw(st.integers(min_T, 9)), D=draw(st.integers(1, 3)),
                N=draw(st.integers(1, 3)), chunk_size=draw(st.integers(1, 4)),
                with_D=draw(st.booleans()), with_z=draw(st.booleans()), with_bias=draw(st.booleans()),
                softplus=draw(st.booleans()), with_state=draw(st.booleans()),
                seed=draw(st.integers(0, 2**32 - 1)))


def build(case, dtype=np.float64):
    rng = np.random.default_rng(case["seed"])
    inputs = make_inputs(rng, case["B"], case["T"], case["D"], case["N"], with_D=case["with_D"],
                         with_z=case["with_z"], with_bias=case["with_bias"], softplus=case["softplus"],
                         dtype=dtype)
    h0 = rng.standard_normal((case["B"], case["D"], case["N"])).astype(dtype) if case["with_state"] else None
    dout = rng.standard_normal((case["B"], case["T"], case["D"])).astype(dtype)
    options = dict(delta_softplus=case["softplus"], chunk_size=case["chunk_size"], initial_state=h0)
    return inputs, options, dout


def run_all(inputs, options, dout, mode):
    """out, final state and the 8 gradients (None kept) for one mode."""
    (out, state), cache = ss.forward(*inputs, mode=mode, return_state=True, **options)
    return [out, state, *ss.backward(dout, cache)]


def assert_close(actual, expected, tol, what):
    if expected is None:
        assert actual is None, what
        return
    scale = 1.0 + np.max(np.abs(expected))
    err = np.max(np.abs(actual.astype(np.float64) - expected))
    assert err <= tol * scale, f"{what}: max error {err:.2e} > {tol:.0e} * {scale:.3g}"


RESULT_NAMES = ("out", "final_state") + tuple("d" + n for n in INPUT_NAMES)


@given(case=scan_cases())
def test_recurrent_parallel_and_chunked_agree(case):
    inputs, options, dout = build(case)
    reference = run_all(inputs, options, dout, "recurrent")
    for mode in ("parallel", "chunked"):
        for name, got, want in zip(RESULT_NAMES, run_all(inputs, options, dout, mode), reference):
            assert_close(got, want, 1e-10, f"{mode} {name}")


@pytest.mark.parametrize("mode", ("recurrent", "parallel"))
def test_gradients_summed_block_by_block_equal_the_chunked_ones(mode, monkeypatch):
    monkeypatch.setattr(ss, "GRAD_BLOCK", 3)           # 3 blocks over T = 8, the last one partial
    inputs = make_inputs(np.random.default_rng(5), 2, 8, 3, 2)
    dout = np.random.default_rng(6).standard_normal((2, 8, 3))
    options = dict(delta_softplus=True, chunk_size=4)
    for name, got, want in zip(RESULT_NAMES, run_all(inputs, options, dout, mode),
                               run_all(inputs, options, dout, "chunked")):
        assert_close(got, want, 1e-10, f"{mode} {name}")


@given(case=scan_cases(min_T=2), split_seed=st.integers(0, 2**16), mode=st.sampled_from(ss.MODES))
def test_carrying_the_state_equals_one_pass(case, split_seed, mode):
    inputs, options, _ = build(case)
    split = 1 + split_seed % (case["T"] - 1)
    (whole, whole_state), _ = ss.forward(*inputs, mode=mode, return_state=True, **options)

    def part(x, span):
        return x[:, span] if x is not None and x.ndim == 3 else x   # time-varying inputs only

    first = [part(x, slice(0, split)) for x in inputs]
    second = [part(x, slice(split, None)) for x in inputs]
    (out1, state1), _ = ss.forward(*first, mode=mode, return_state=True, **options)
    options["initial_state"] = state1
    (out2, state2), _ = ss.forward(*second, mode=mode, return_state=True, **options)
    assert_close(np.concatenate([out1, out2], axis=1), whole, 1e-12, "out")
    assert_close(state2, whole_state, 1e-12, "final state")


@given(case=scan_cases(), mode=st.sampled_from(ss.MODES))
def test_float32_agrees_with_float64(case, mode):
    inputs64, options64, dout64 = build(case, np.float64)
    inputs32, options32, dout32 = build(case, np.float32)
    results32 = run_all(inputs32, options32, dout32, mode)
    results64 = run_all(inputs64, options64, dout64, mode)
    for name, got, want in zip(RESULT_NAMES, results32, results64):
        if want is not None:
            assert got.dtype == np.float32, name
        assert_close(got, want, FLOAT32_TOL, name)


@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]))
def test_negative_A_and_positive_step_give_decay_in_unit_interval(seed, dtype):
    rng = np.random.default_rng(seed)
    A = -rng.uniform(0.1, 5.0, (3, 4)).astype(dtype)
    step = rng.uniform(0.01, 5.0, (2, 6, 3)).astype(dtype)        # |Δ A| in [1e-3, 25]
    A_bar, B_factor = ss.discretize(A, step, "zoh")
    assert np.all((A_bar > 0) & (A_bar < 1))
    assert np.all((B_factor > 0) & (B_factor <= step[..., None]))  # (1 - e^{-Δ|A|}) / |A| <= Δ
    # With no input the state can only shrink, channel by channel.
    h0 = rng.standard_normal((2, 3, 4)).astype(dtype)
    zeros = np.zeros((2, 6, 3), dtype)
    (_, state), _ = ss.forward(zeros, step, A, np.ones((2, 6, 4), dtype), np.ones((2, 6, 4), dtype),
                               initial_state=h0, return_state=True, mode="recurrent")
    assert np.all(np.abs(state) <= np.abs(h0))


@given(seed=st.integers(0, 2**32 - 1), length=st.integers(1, 11))
def test_associative_scan_matches_the_loop_and_operator_is_associative(seed, length):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1.5, 1.5, (2, length, 2, 3))
    b = rng.standard_normal((2, length, 2, 3))
    products, states = ss._associative_scan(a, b)
    h, p = np.zeros((2, 2, 3)), np.ones((2, 2, 3))
    for t in range(length):
        h, p = a[:, t] * h + b[:, t], p * a[:, t]
        np.testing.assert_allclose(states[:, t], h, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(products[:, t], p, rtol=1e-12, atol=1e-12)
    e1, e2, e3 = [(a[:, 0], b[:, 0]), (rng.standard_normal(a[:, 0].shape), b[:, 0] + 1), (a[:, 0] - 1, b[:, 0])]
    left = ss._combine(*ss._combine(*e1, *e2), *e3)
    right = ss._combine(*e1, *ss._combine(*e2, *e3))
    np.testing.assert_allclose(left, right, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(ss._combine(1.0, 0.0, *e1), e1)   # (1, 0) is the identity


def test_chunked_cache_holds_only_chunk_boundary_states():
    rng = np.random.default_rng(1)
    B, T, D, N, chunk = 2, 11, 3, 4, 4
    _, cache = ss.forward(*make_inputs(rng, B, T, D, N), mode="chunked", chunk_size=chunk)
    assert cache["carries"].shape == (B, 3, D, N)                  # ceil(11 / 4) chunks
    big = [k for k, v in cache.items() if isinstance(v, np.ndarray) and v.ndim == 4 and k != "carries"]
    assert big == []


# ------------------------------------------------------------------------------------------------
# Discretization

def test_zoh_matches_matrix_exponential():
    # Holding u constant over a step: d/dt [h; v] = [[diag(A), 1], [0, 0]] [h; v]. Over a step Δ the
    # exponential of that block matrix times Δ is [[diag(Ā), B_factor], [0, 1]].
    rng = np.random.default_rng(3)
    A = rng.uniform(-3.0, 1.0, (2, 3))
    A[1, 2] = 0.0                                                   # the A -> 0 limit, Δ
    step = rng.uniform(0.01, 2.0, (2, 3, 2))
    A_bar, B_factor = ss.discretize(A, step, "zoh")
    N = A.shape[1]
    for b, t, d in np.ndindex(step.shape):
        block = np.zeros((N + 1, N + 1))
        block[:N, :N] = np.diag(A[d])
        block[:N, N] = 1.0
        exact = expm(block * step[b, t, d])
        np.testing.assert_allclose(A_bar[b, t, d], np.diag(exact[:N, :N]), rtol=1e-12)
        np.testing.assert_allclose(B_factor[b, t, d], exact[:N, N], rtol=1e-12)


def test_euler_is_the_first_order_expansion_of_zoh():
    rng = np.random.default_rng(4)
    A = -rng.uniform(0.5, 3.0, (2, 3))
    for size in (1e-1, 1e-2, 1e-3, 1e-4):
        step = size * rng.uniform(0.5, 1.0, (1, 4, 2))
        A_zoh, B_zoh = ss.discretize(A, step, "zoh")
        A_euler, B_euler = ss.discretize(A, step, "euler")
        np.testing.assert_array_equal(A_euler, A_zoh)               # both keep exp(Δ A)
        np.testing.assert_array_equal(B_euler, np.broadcast_to(step[..., None], B_zoh.shape))
        # (e^{ΔA} - 1)/A = Δ + Δ²A/2 + O(Δ³): the gap is second order, with that exact coefficient.
        second_order = step[..., None] ** 2 * A / 2
        ratio = (B_zoh - B_euler) / second_order
        assert np.max(np.abs(ratio - 1.0)) <= 2 * size * 3.0        # next term: Δ A / 3 relative
    assert np.max(np.abs(B_zoh - B_euler) / step[..., None]) < 1e-3  # agree as Δ -> 0


def test_forward_uses_zoh_decay_and_euler_input():
    rng = np.random.default_rng(5)
    u, delta, A, Bm, Cm = make_inputs(rng, 1, 1, 2, 3, softplus=False)[:5]
    (_, state), _ = ss.forward(u, delta, A, Bm, Cm, initial_state=np.ones((1, 2, 3)), return_state=True)
    A_bar, B_factor = ss.discretize(A, delta, "euler")
    expected = A_bar[:, 0] * 1.0 + B_factor[:, 0] * Bm[:, 0, None, :] * u[:, 0, :, None]
    np.testing.assert_allclose(state, expected, rtol=1e-14)


# ------------------------------------------------------------------------------------------------
# Stability and extreme values

@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_long_sequence_with_strong_decay_stays_finite(mode):
    rng = np.random.default_rng(6)
    B, T, D, N = 1, 100_000, 2, 2
    u = rng.standard_normal((B, T, D)).astype(np.float32)
    delta = rng.uniform(5.0, 50.0, (B, T, D)).astype(np.float32)    # Δ = softplus(delta) in [5, 50]
    A = np.array([[-1e3, -1e3], [-1.0, -0.5]], dtype=np.float32)    # channel 0: Δ A <= -5e3
    Bm = rng.standard_normal((B, T, N)).astype(np.float32)
    Cm = rng.standard_normal((B, T, N)).astype(np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        (out, state), cache = ss.forward(u, delta, A, Bm, Cm, delta_softplus=True, mode=mode, chunk_size=1024,
                                         return_state=True)
        grads = ss.backward(np.ones_like(out), cache)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(state))
    assert all(np.all(np.isfinite(g)) for g in grads if g is not None)
    # exp(Δ A) underflows to 0 on channel 0, so its state is exactly the last input term Δ u B.
    last_input = ss.softplus(delta[0, -1, 0]) * u[0, -1, 0] * Bm[0, -1]
    np.testing.assert_allclose(state[0, 0], last_input, rtol=1e-6)
    # Channel 1 forgets slowly but stays bounded by max|b| / (1 - max a).
    assert np.max(np.abs(state[0, 1])) < 50.0 * np.max(np.abs(u)) * np.max(np.abs(Bm)) / (1 - np.exp(-2.5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softplus_of_extreme_values(dtype):
    x = np.array([-1e4, -50.0, -1.0, 0.0, 1.0, 19.9, 20.1, 1e4], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = ss.softplus(x)
        slope = ss._softplus_grad(x)
    assert y.dtype == dtype and np.all(np.isfinite(y))
    assert y[0] == 0.0 and y[-1] == dtype(1e4)
    # Above 20 the identity is off by log1p(e^-x) <= 2e-9, i.e. 1e-10 relative.
    np.testing.assert_allclose(y, np.logaddexp(0.0, x.astype(np.float64)), rtol=1e-6 if dtype == np.float32 else 2e-10)
    np.testing.assert_allclose(slope, expit(x.astype(np.float64)), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("softplus", [True, False])
def test_large_positive_delta(softplus):
    rng = np.random.default_rng(8)
    inputs = make_inputs(rng, 1, 6, 2, 2, softplus=softplus)
    inputs[1] = np.full((1, 6, 2), 1e4)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for mode in ss.MODES:
            out, cache = ss.forward(*inputs, delta_softplus=softplus, mode=mode, chunk_size=4)
            grads = ss.backward(np.ones_like(out), cache)
            assert np.all(np.isfinite(out))
            assert all(np.all(np.isfinite(g)) for g in grads)


# ------------------------------------------------------------------------------------------------
# Bad input: each case raises the right type, with a message naming the argument

def good_arguments():
    rng = np.random.default_rng(9)
    arrays = make_inputs(rng, 2, 5, 3, 4)
    kwargs = dict(zip(INPUT_NAMES, arrays))
    kwargs["initial_state"] = np.zeros((2, 3, 4))
    return kwargs


def with_nan(x):
    x = x.copy()
    x.flat[0] = np.nan
    return x


BAD_INPUTS = {
    "u-rank": (lambda k: dict(u=k["u"][0]), ValueError, "u"),
    "A-rank": (lambda k: dict(A=k["A"][None]), ValueError, "A"),
    "Bm-rank": (lambda k: dict(Bm=k["Bm"][0]), ValueError, "Bm"),
    "D-rank": (lambda k: dict(D=k["D"][None]), ValueError, "D"),
    "batch-mismatch": (lambda k: dict(Bm=np.zeros((3, 5, 4))), ValueError, "Bm"),
    "time-mismatch": (lambda k: dict(delta=np.zeros((2, 6, 3))), ValueError, "delta"),
    "channel-mismatch": (lambda k: dict(A=-np.ones((2, 4))), ValueError, "A"),
    "state-mismatch": (lambda k: dict(Cm=np.zeros((2, 5, 3))), ValueError, "Cm"),
    "D-length": (lambda k: dict(D=np.ones(4)), ValueError, "D"),
    "z-shape": (lambda k: dict(z=np.ones((2, 5, 2))), ValueError, "z"),
    "delta_bias-length": (lambda k: dict(delta_bias=np.ones(2)), ValueError, "delta_bias"),
    "int-dtype": (lambda k: dict(u=np.ones((2, 5, 3), dtype=np.int64)), TypeError, "u"),
    "float16-dtype": (lambda k: dict(A=k["A"].astype(np.float16)), TypeError, "A"),
    "not-an-array": (lambda k: dict(Cm=k["Cm"].tolist()), TypeError, "Cm"),
    "mixed-dtypes": (lambda k: dict(Bm=k["Bm"].astype(np.float32)), TypeError, "Bm"),
    "nan": (lambda k: dict(delta=with_nan(k["delta"])), ValueError, "delta"),
    "inf": (lambda k: dict(z=k["z"] + np.inf), ValueError, "z"),
    "empty-time": (lambda k: dict(u=np.zeros((2, 0, 3)), delta=np.zeros((2, 0, 3)), Bm=np.zeros((2, 0, 4)),
                                  Cm=np.zeros((2, 0, 4)), z=np.zeros((2, 0, 3))), ValueError, "u"),
    "unknown-mode": (lambda k: dict(mode="fft"), ValueError, "mode"),
    "chunk_size-zero": (lambda k: dict(chunk_size=0), ValueError, "chunk_size"),
    "chunk_size-negative": (lambda k: dict(chunk_size=-2), ValueError, "chunk_size"),
    "chunk_size-float": (lambda k: dict(chunk_size=2.0), TypeError, "chunk_size"),
    "initial_state-shape": (lambda k: dict(initial_state=np.zeros((2, 4, 3))), ValueError, "initial_state"),
    "initial_state-rank": (lambda k: dict(initial_state=np.zeros((3, 4))), ValueError, "initial_state"),
    "initial_state-dtype": (lambda k: dict(initial_state=np.zeros((2, 3, 4), np.float32)), TypeError,
                            "initial_state"),
    "initial_state-nan": (lambda k: dict(initial_state=with_nan(k["initial_state"])), ValueError, "initial_state"),
    "delta_softplus-not-bool": (lambda k: dict(delta_softplus=1), TypeError, "delta_softplus"),
    "return_state-not-bool": (lambda k: dict(return_state="yes"), TypeError, "return_state"),
    "backend-numba-recurrent": (lambda k: dict(backend="numba", mode="recurrent"), BackendUnavailable, "backend"),
    "backend-cuda-parallel": (lambda k: dict(backend="cuda", mode="parallel"), BackendUnavailable, "backend"),
    "backend-unknown": (lambda k: dict(backend="torch"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_rejected(case):
    change, error, name = BAD_INPUTS[case]
    kwargs = good_arguments()
    kwargs.update(change(kwargs))
    with pytest.raises(error, match=rf"\b{name}\b"):
        ss.forward(**kwargs)


def test_bad_dout_is_rejected():
    kwargs = good_arguments()
    out, cache = ss.forward(**kwargs)
    with pytest.raises(ValueError, match=r"\bdout\b"):
        ss.backward(out[:, :-1], cache)
    with pytest.raises(TypeError, match=r"\bdout\b"):
        ss.backward(out.astype(np.float32), cache)


def test_bad_discretize_arguments_are_rejected():
    A, step = -np.ones((3, 2)), np.ones((1, 4, 3))
    with pytest.raises(ValueError, match=r"\bmethod\b"):
        ss.discretize(A, step, "bilinear")
    with pytest.raises(ValueError, match=r"\bdelta\b"):
        ss.discretize(A, np.ones((1, 4, 2)))
    with pytest.raises(TypeError, match=r"\bdelta\b"):
        ss.discretize(A, step.astype(np.float32))
