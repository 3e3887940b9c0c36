"""Basic ops: linear, embedding, rmsnorm, layernorm, silu, gelu, cross_entropy, conv1d.

What is checked, per op:
- hand-written backward == centred finite differences (float64, rel. error <= 1e-6), several shapes;
- properties against direct formulas (unit RMS, zero mean / unit variance, -log softmax at the
  target, np.convolve per channel, split sequence with carried state == one pass == token steps);
- float32 agrees with float64 within FLOAT32_TOL;
- stability at +-1e4 (and at the float limits for the activations) without any floating warning;
- bad input raises the right exception with a message that starts with the argument's name.
"""
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import erf

from minilm.ops import conv1d, cross_entropy, embedding, gelu, layernorm, linear, rmsnorm, silu
from minilm.testing import check_op_gradients

GRAD_TOL = 1e-6
# float32 vs float64 on the same (float32-representable) inputs: the ops here sum at most a few
# dozen O(1) terms, so the float32 results sit within a few hundred ulps (1 ulp ~ 1.2e-7) of float64.
FLOAT32_TOL = dict(rtol=1e-4, atol=1e-4)

seeds = st.integers(0, 2**32 - 1)


def normal(rng, *shape, scale=1.0):
    return scale * rng.standard_normal(shape)


def assert_grads_match(errors):
    bad = {i: e for i, e in errors.items() if not e <= GRAD_TOL}
    assert not bad, f"relative gradient errors above {GRAD_TOL}: {errors}"


# ---------------------------------------------------------------------------------------------
# Gradient checks (float64, centred differences)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape, dout, bias", [
    ((3, 4), 2, True), ((2, 3, 4), 3, False), ((4,), 2, True), ((1, 1), 1, True)])
def test_linear_gradients(x_shape, dout, bias):
    rng = np.random.default_rng(0)
    x, W = normal(rng, *x_shape), normal(rng, x_shape[-1], dout)
    inputs = [x, W] + ([normal(rng, dout)] if bias else [])
    assert_grads_match(check_op_gradients(linear.forward, linear.backward, inputs, wrt=range(len(inputs))))
    if not bias:
        assert linear.backward(np.ones(x_shape[:-1] + (dout,)), linear.forward(x, W)[1])[2] is None


@pytest.mark.parametrize("ids", [np.array([2, 0, 2, 3]), np.array([[1, 1], [1, 0], [3, 1]]), np.array(2)])
def test_embedding_gradients(ids):
    rng = np.random.default_rng(1)
    table = normal(rng, 4, 3)
    assert_grads_match(check_op_gradients(embedding.forward, embedding.backward, [ids, table], wrt=[1]))
    assert embedding.backward(np.ones(ids.shape + (3,)), embedding.forward(ids, table)[1])[0] is None


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (3, 2)])
def test_rmsnorm_gradients(shape):
    rng = np.random.default_rng(2)
    inputs = [normal(rng, *shape), normal(rng, shape[-1])]
    assert_grads_match(check_op_gradients(rmsnorm.forward, rmsnorm.backward, inputs, wrt=[0, 1]))
    assert_grads_match(check_op_gradients(rmsnorm.forward, rmsnorm.backward, inputs, wrt=[0, 1], eps=0.5))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (3, 2)])
def test_layernorm_gradients(shape):
    rng = np.random.default_rng(3)
    inputs = [normal(rng, *shape), normal(rng, shape[-1]), normal(rng, shape[-1])]
    assert_grads_match(check_op_gradients(layernorm.forward, layernorm.backward, inputs, wrt=[0, 1, 2]))
    assert_grads_match(check_op_gradients(layernorm.forward, layernorm.backward, inputs, wrt=[0, 1, 2], eps=0.5))


@pytest.mark.parametrize("op", [silu, gelu], ids=["silu", "gelu"])
@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), ()])
def test_activation_gradients(op, shape):
    rng = np.random.default_rng(4)
    x = np.asarray(normal(rng, *shape, scale=3.0))
    assert_grads_match(check_op_gradients(op.forward, op.backward, [x], wrt=[0]))


@pytest.mark.parametrize("logits_shape, targets", [
    ((4, 5), np.array([0, -100, 4, 2])),
    ((2, 3, 4), np.array([[3, -100, 0], [1, 1, -100]])),
    ((6,), np.array(5)),
    ((3, 1), np.array([0, 0, 0])),
])
def test_cross_entropy_gradients(logits_shape, targets):
    rng = np.random.default_rng(5)
    logits = normal(rng, *logits_shape, scale=2.0)
    assert_grads_match(check_op_gradients(cross_entropy.forward, cross_entropy.backward, [logits, targets], wrt=[0]))


def test_cross_entropy_custom_ignore_index_gradients():
    rng = np.random.default_rng(6)
    logits, targets = normal(rng, 4, 3), np.array([1, 7, 7, 2])
    assert_grads_match(check_op_gradients(cross_entropy.forward, cross_entropy.backward, [logits, targets],
                                          wrt=[0], ignore_index=7))


@pytest.mark.parametrize("B, T, D, K, bias, with_state", [
    (2, 5, 3, 4, True, False),
    (1, 1, 2, 1, True, False),     # K = 1: no history at all
    (2, 2, 3, 4, True, True),      # T < K - 1, history from initial_state
    (1, 1, 2, 3, False, True),     # T = 1
    (2, 6, 2, 2, False, False),
])
def test_conv1d_gradients(B, T, D, K, bias, with_state):
    rng = np.random.default_rng(7)
    inputs = [normal(rng, B, T, D), normal(rng, D, K)] + ([normal(rng, D)] if bias else [])
    options = {"initial_state": normal(rng, B, K - 1, D)} if with_state else {}
    assert_grads_match(check_op_gradients(conv1d.forward, conv1d.backward, inputs,
                                          wrt=range(len(inputs)), **options))


# ---------------------------------------------------------------------------------------------
# Properties against direct formulas
# ---------------------------------------------------------------------------------------------

leading_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


@given(seed=seeds, lead=leading_shapes, D=st.integers(1, 9), scale=st.floats(0.01, 100.0))
def test_rmsnorm_unit_rms(seed, lead, D, scale):
    rng = np.random.default_rng(seed)
    x = normal(rng, *lead, D, scale=scale)
    y, _ = rmsnorm.forward(x, np.ones(D))
    mean_sq = np.mean(x * x, axis=-1)
    rms = np.sqrt(np.mean(y * y, axis=-1))
    # rms(y) = sqrt(m / (m + eps)), so 1 - rms(y) <= eps / (2 m).
    assert np.all(np.abs(rms - 1.0) <= 1e-6 / mean_sq + 1e-12)


@given(seed=seeds, lead=leading_shapes, D=st.integers(2, 9), scale=st.floats(0.01, 100.0),
       shift=st.floats(-10.0, 10.0))
def test_layernorm_zero_mean_unit_variance(seed, lead, D, scale, shift):
    rng = np.random.default_rng(seed)
    x = normal(rng, *lead, D, scale=scale) + shift
    y, _ = layernorm.forward(x, np.ones(D), np.zeros(D))
    var_x = np.var(x, axis=-1)
    assert np.all(np.abs(np.mean(y, axis=-1)) <= 1e-9)
    # var(y) = v / (v + eps), so 1 - var(y) <= eps / v.
    assert np.all(np.abs(np.var(y, axis=-1) - 1.0) <= 1e-5 / var_x + 1e-9)


@given(seed=seeds, lead=leading_shapes, V=st.integers(1, 8), ignore_fraction=st.sampled_from([0.0, 0.5, 1.0]))
def test_cross_entropy_equals_minus_log_softmax(seed, lead, V, ignore_fraction):
    rng = np.random.default_rng(seed)
    logits = normal(rng, *lead, V, scale=3.0)
    targets = np.where(rng.random(lead) < ignore_fraction, -100, rng.integers(0, V, size=lead))
    loss, cache = cross_entropy.forward(logits, targets)

    probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    kept = targets != -100
    picked = np.take_along_axis(probs, np.where(kept, targets, 0)[..., None], axis=-1)[..., 0]
    expected = -np.log(picked[kept]).mean() if kept.any() else 0.0
    assert loss.shape == () and loss.dtype == np.float64
    np.testing.assert_allclose(loss, expected, rtol=1e-12, atol=1e-12)

    dlogits, dtargets = cross_entropy.backward(np.array(1.0), cache)
    onehot = np.eye(V)[np.where(kept, targets, 0)]
    expected_grad = (probs - onehot) * kept[..., None] / max(kept.sum(), 1)
    np.testing.assert_allclose(dlogits, expected_grad, rtol=1e-10, atol=1e-14)
    assert dtargets is None


def test_cross_entropy_all_ignored_is_zero():
    logits = np.random.default_rng(8).standard_normal((2, 3, 4))
    loss, cache = cross_entropy.forward(logits, np.full((2, 3), -100))
    assert loss == 0.0 and loss.shape == ()
    dlogits, _ = cross_entropy.backward(1.0, cache)
    assert np.all(dlogits == 0.0) and dlogits.shape == logits.shape
    empty_loss, _ = cross_entropy.forward(np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
    assert empty_loss == 0.0


def test_cross_entropy_ignore_index_inside_vocab_drops_that_class():
    logits = np.random.default_rng(9).standard_normal((3, 4))
    loss_ignored, _ = cross_entropy.forward(logits, np.array([0, 2, 0]), ignore_index=0)
    loss_direct, _ = cross_entropy.forward(logits[1:2], np.array([2]))
    np.testing.assert_allclose(loss_ignored, loss_direct, rtol=1e-14)


@given(seed=seeds, x=st.floats(-30.0, 30.0))
def test_activations_match_direct_formulas(seed, x):
    xs = np.concatenate([[x], normal(np.random.default_rng(seed), 5, scale=5.0)])
    np.testing.assert_allclose(silu.forward(xs)[0], xs / (1.0 + np.exp(-xs)), rtol=1e-12, atol=1e-300)
    # The tanh form approximates the exact (erf) GELU to within 5e-4 everywhere.
    np.testing.assert_allclose(gelu.forward(xs)[0], 0.5 * xs * (1.0 + erf(xs / np.sqrt(2.0))), rtol=0, atol=5e-4)


@given(seed=seeds, ids_shape=leading_shapes, V=st.integers(1, 5), D=st.integers(1, 3))
def test_embedding_gathers_rows_and_scatter_adds(seed, ids_shape, V, D):
    rng = np.random.default_rng(seed)
    ids, table = np.asarray(rng.integers(0, V, size=ids_shape)), normal(rng, V, D)
    out, cache = embedding.forward(ids, table)
    dout = normal(rng, *ids_shape, D)
    _, dtable = embedding.backward(dout, cache)
    expected = np.zeros((V, D))
    for position in np.ndindex(ids.shape):
        np.testing.assert_array_equal(out[position], table[ids[position]])
        expected[ids[position]] += dout[position]
    np.testing.assert_allclose(dtable, expected, rtol=1e-12, atol=1e-14)


conv_dims = st.tuples(st.integers(1, 2), st.integers(1, 7), st.integers(1, 3), st.integers(1, 5))  # B, T, D, K


@given(seed=seeds, dims=conv_dims, bias=st.booleans(), with_state=st.booleans())
def test_conv1d_equals_np_convolve_per_channel(seed, dims, bias, with_state):
    B, T, D, K = dims
    rng = np.random.default_rng(seed)
    x, w = normal(rng, B, T, D), normal(rng, D, K)
    b = normal(rng, D) if bias else None
    state = normal(rng, B, K - 1, D) if with_state else None
    y, _ = conv1d.forward(x, w, b, initial_state=state)

    history = state if with_state else np.zeros((B, K - 1, D))
    xp = np.concatenate([history, x], axis=1)
    for bi in range(B):
        for d in range(D):
            # w is reversed because np.convolve flips its second argument; "full" output index
            # K-1+t is the first that has seen K real-or-history inputs.
            full = np.convolve(xp[bi, :, d], w[d, ::-1])
            expected = full[K - 1:K - 1 + T] + (b[d] if bias else 0.0)
            np.testing.assert_allclose(y[bi, :, d], expected, rtol=1e-12, atol=1e-12)


def test_conv1d_last_tap_multiplies_current_token():
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    w = np.array([[10.0, 1.0]])                        # w[:, 0] oldest, w[:, 1] current
    y, _ = conv1d.forward(x, w)
    np.testing.assert_array_equal(y[0, :, 0], [1.0, 10.0 + 2.0, 20.0 + 3.0])


@given(seed=seeds, dims=conv_dims, split=st.integers(1, 6), bias=st.booleans(), with_state=st.booleans())
def test_conv1d_split_with_state_equals_one_pass_and_steps(seed, dims, split, bias, with_state):
    B, T, D, K = dims
    T = max(T, 2)
    split = min(split, T - 1)
    rng = np.random.default_rng(seed)
    x, w = normal(rng, B, T, D), normal(rng, D, K)
    b = normal(rng, D) if bias else None
    state0 = normal(rng, B, K - 1, D) if with_state else None
    (y_all, state_all), _ = conv1d.forward(x, w, b, initial_state=state0, return_state=True)

    # Two chunks, the second continuing from the first chunk's state (split may be < K - 1).
    (y_a, state_a), _ = conv1d.forward(x[:, :split], w, b, initial_state=state0, return_state=True)
    (y_b, state_b), _ = conv1d.forward(x[:, split:], w, b, initial_state=state_a, return_state=True)
    np.testing.assert_allclose(np.concatenate([y_a, y_b], axis=1), y_all, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(state_b, state_all)

    # Token by token.
    state, ys = state0, []
    for t in range(T):
        y_t, state = conv1d.step(x[:, t], state, w, b)
        ys.append(y_t)
    np.testing.assert_allclose(np.stack(ys, axis=1), y_all, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(state, state_all)


def test_conv1d_final_state_when_sequence_shorter_than_history():
    state0 = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)         # K = 4: three past inputs
    x = np.array([4.0]).reshape(1, 1, 1)
    (_, final), _ = conv1d.forward(x, np.ones((1, 4)), initial_state=state0, return_state=True)
    np.testing.assert_array_equal(final[0, :, 0], [2.0, 3.0, 4.0])
    (_, final_k1), _ = conv1d.forward(x, np.ones((1, 1)), return_state=True)
    assert final_k1.shape == (1, 0, 1)


# ---------------------------------------------------------------------------------------------
# float32 vs float64
# ---------------------------------------------------------------------------------------------

def _case(name, rng, n, m):
    """(module, float inputs, other inputs before/after as (position, value), options) for each op."""
    if name == "linear":
        return linear, [normal(rng, n, m), normal(rng, m, 3), normal(rng, 3)], {}, {}
    if name == "embedding":
        return embedding, [normal(rng, 5, m)], {0: rng.integers(0, 5, size=(n, 2))}, {}
    if name == "rmsnorm":
        return rmsnorm, [normal(rng, n, m + 1), normal(rng, m + 1)], {}, {}
    if name == "layernorm":
        return layernorm, [normal(rng, n, m + 3), normal(rng, m + 3), normal(rng, m + 3)], {}, {}
    if name in ("silu", "gelu"):
        return {"silu": silu, "gelu": gelu}[name], [normal(rng, n, m, scale=4.0)], {}, {}
    if name == "cross_entropy":
        targets = np.where(rng.random(n) < 0.3, -100, rng.integers(0, m, size=n))
        return cross_entropy, [normal(rng, n, m, scale=3.0)], {1: targets}, {}
    if name == "conv1d":
        K = m
        return conv1d, [normal(rng, 2, n, 3), normal(rng, 3, K), normal(rng, 3)], {}, \
            {"initial_state": normal(rng, 2, K - 1, 3)}
    raise AssertionError(name)


OP_NAMES = ["linear", "embedding", "rmsnorm", "layernorm", "silu", "gelu", "cross_entropy", "conv1d"]


@pytest.mark.parametrize("name", OP_NAMES)
@given(seed=seeds, n=st.integers(1, 6), m=st.integers(1, 6))
def test_float32_agrees_with_float64(name, seed, n, m):
    rng = np.random.default_rng(seed)
    module, floats, others, options = _case(name, rng, n, m)
    # Start from float32-representable values so both precisions see identical inputs.
    floats = [f.astype(np.float32).astype(np.float64) for f in floats]
    options = {k: v.astype(np.float32).astype(np.float64) for k, v in options.items()}

    def run(dtype):
        args = [f.astype(dtype) for f in floats]
        for position, value in others.items():
            args.insert(position, value)
        out, cache = module.forward(*args, **{k: v.astype(dtype) for k, v in options.items()})
        dout = np.asarray(np.random.default_rng(seed + 1).standard_normal(np.shape(out))).astype(dtype)
        grads = module.backward(dout, cache)
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads if g is not None)
        return out, grads

    out32, grads32 = run(np.float32)
    out64, grads64 = run(np.float64)
    np.testing.assert_allclose(out32, out64, **FLOAT32_TOL)
    for g32, g64 in zip(grads32, grads64):
        if g64 is not None:
            np.testing.assert_allclose(g32, g64, **FLOAT32_TOL)


# ---------------------------------------------------------------------------------------------
# Stability: extreme inputs, no floating-point warnings
# ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", [silu, gelu], ids=["silu", "gelu"])
def test_activations_stable_at_extremes(op, dtype):
    big = np.finfo(dtype).max
    x = np.array([1e4, -1e4, big, -big, 0.0], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, cache = op.forward(x)
        (dx,) = op.backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(y, [1e4, 0.0, big, 0.0, 0.0])
    np.testing.assert_array_equal(dx, [1.0, 0.0, 1.0, 0.0, 0.5])


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_stable_at_extremes(dtype):
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    targets = np.array([1, 0, 2])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, cache = cross_entropy.forward(logits, targets)
        dlogits, _ = cross_entropy.backward(np.array(1.0, dtype=dtype), cache)
    # Row losses: 2e4, log 3, 2e4 + log 2.
    expected = (2e4 + np.log(3.0) + 2e4 + np.log(2.0)) / 3
    assert loss.dtype == dtype and np.isfinite(loss)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert np.all(np.isfinite(dlogits))
    np.testing.assert_allclose(dlogits.sum(axis=-1), 0.0, atol=1e-6)


@pytest.mark.filterwarnings("error")
def test_norms_stable_for_constant_and_zero_rows():
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, cache = layernorm.forward(np.full((2, 4), 3.0), np.ones(4), np.zeros(4))
        dx, _, _ = layernorm.backward(np.ones((2, 4)), cache)
        assert np.all(y == 0.0) and np.all(np.isfinite(dx))
        y, cache = rmsnorm.forward(np.zeros((2, 4)), np.ones(4))
        dx, _ = rmsnorm.backward(np.ones((2, 4)), cache)
        assert np.all(y == 0.0) and np.all(np.isfinite(dx))


# ---------------------------------------------------------------------------------------------
# Bad input: exception type, and the message starts with the offending argument's name
# (entries: call, exception, argument name, optional regexes the message must also contain)
# ---------------------------------------------------------------------------------------------

f64 = np.ones
x34, W45, b5 = f64((3, 4)), f64((4, 5)), f64(5)
x_nan = np.array([[1.0, np.nan, 0.0, 1.0]])
conv_x, conv_w = f64((2, 5, 3)), f64((3, 4))

BAD_INPUTS = {
    # linear
    "linear x int": (lambda: linear.forward(np.ones((3, 4), dtype=np.int64), W45), TypeError, "x"),
    "linear x float16": (lambda: linear.forward(x34.astype(np.float16), W45), TypeError, "x"),
    "linear x list": (lambda: linear.forward([[1.0] * 4], W45), TypeError, "x"),
    "linear x 0-d": (lambda: linear.forward(np.array(1.0), W45), ValueError, "x"),
    "linear x NaN": (lambda: linear.forward(x_nan, W45), ValueError, "x"),
    "linear x dims": (lambda: linear.forward(f64((3, 5)), W45), ValueError, "x"),
    "linear W rank": (lambda: linear.forward(x34, f64(4)), ValueError, "W"),
    "linear W inf": (lambda: linear.forward(x34, np.full((4, 5), np.inf)), ValueError, "W"),
    "linear W dtype": (lambda: linear.forward(x34, W45.astype(np.float32)), TypeError, "W"),
    "linear b shape": (lambda: linear.forward(x34, W45, f64(4)), ValueError, "b"),
    "linear b dtype": (lambda: linear.forward(x34, W45, b5.astype(np.float32)), TypeError, "b"),
    "linear dy shape": (lambda: linear.backward(f64((3, 4)), linear.forward(x34, W45)[1]), ValueError, "dy"),
    "linear dy dtype": (lambda: linear.backward(f64((3, 5), dtype=np.float32), linear.forward(x34, W45)[1]),
                        TypeError, "dy"),
    # embedding
    "embedding ids float": (lambda: embedding.forward(np.array([0.0]), f64((4, 3))), TypeError, "ids"),
    "embedding ids bool": (lambda: embedding.forward(np.array([True]), f64((4, 3))), TypeError, "ids"),
    "embedding ids too big": (lambda: embedding.forward(np.array([0, 4]), f64((4, 3))), ValueError, "ids",
                              r"\[0, 4\)"),
    "embedding ids negative": (lambda: embedding.forward(np.array([-1, 2]), f64((4, 3))), ValueError, "ids",
                               r"\[0, 4\)"),
    "embedding table rank": (lambda: embedding.forward(np.array([0]), f64(4)), ValueError, "table"),
    "embedding table int": (lambda: embedding.forward(np.array([0]), np.ones((4, 3), dtype=np.int32)),
                            TypeError, "table"),
    "embedding table float16": (lambda: embedding.forward(np.array([0]), f64((4, 3), dtype=np.float16)),
                                TypeError, "table"),
    "embedding table NaN": (lambda: embedding.forward(np.array([0]), np.full((4, 3), np.nan)), ValueError, "table"),
    "embedding dout shape": (lambda: embedding.backward(f64((2, 2)), embedding.forward(np.array([0, 1]),
                                                                                         f64((4, 3)))[1]),
                             ValueError, "dout"),
    "embedding dout dtype": (lambda: embedding.backward(f64((2, 3), dtype=np.float32),
                                                        embedding.forward(np.array([0, 1]), f64((4, 3)))[1]),
                             TypeError, "dout"),
    # rmsnorm
    "rmsnorm x int": (lambda: rmsnorm.forward(np.ones((2, 4), dtype=np.int64), f64(4)), TypeError, "x"),
    "rmsnorm x float16": (lambda: rmsnorm.forward(f64((2, 4), dtype=np.float16), f64(4)), TypeError, "x"),
    "rmsnorm x 0-d": (lambda: rmsnorm.forward(np.array(1.0), f64(1)), ValueError, "x"),
    "rmsnorm x NaN": (lambda: rmsnorm.forward(x_nan, f64(4)), ValueError, "x"),
    "rmsnorm weight shape": (lambda: rmsnorm.forward(f64((2, 4)), f64(3)), ValueError, "weight"),
    "rmsnorm weight rank": (lambda: rmsnorm.forward(f64((2, 4)), f64((1, 4))), ValueError, "weight"),
    "rmsnorm weight dtype": (lambda: rmsnorm.forward(f64((2, 4)), f64(4, dtype=np.float32)), TypeError, "weight"),
    "rmsnorm eps zero": (lambda: rmsnorm.forward(f64((2, 4)), f64(4), eps=0.0), ValueError, "eps"),
    "rmsnorm eps negative": (lambda: rmsnorm.forward(f64((2, 4)), f64(4), eps=-1e-6), ValueError, "eps"),
    "rmsnorm eps nan": (lambda: rmsnorm.forward(f64((2, 4)), f64(4), eps=float("nan")), ValueError, "eps"),
    "rmsnorm eps str": (lambda: rmsnorm.forward(f64((2, 4)), f64(4), eps="1e-6"), TypeError, "eps"),
    "rmsnorm dy shape": (lambda: rmsnorm.backward(f64((2, 3)), rmsnorm.forward(f64((2, 4)), f64(4))[1]),
                         ValueError, "dy"),
    # layernorm
    "layernorm x int": (lambda: layernorm.forward(np.ones((2, 4), dtype=np.int32), f64(4), f64(4)), TypeError, "x"),
    "layernorm x float16": (lambda: layernorm.forward(f64((2, 4), dtype=np.float16), f64(4), f64(4)),
                            TypeError, "x"),
    "layernorm x inf": (lambda: layernorm.forward(np.full((2, 4), -np.inf), f64(4), f64(4)), ValueError, "x"),
    "layernorm weight shape": (lambda: layernorm.forward(f64((2, 4)), f64(5), f64(4)), ValueError, "weight"),
    "layernorm bias shape": (lambda: layernorm.forward(f64((2, 4)), f64(4), f64(5)), ValueError, "bias"),
    "layernorm bias None": (lambda: layernorm.forward(f64((2, 4)), f64(4), None), TypeError, "bias"),
    "layernorm bias dtype": (lambda: layernorm.forward(f64((2, 4)), f64(4), f64(4, dtype=np.float32)),
                             TypeError, "bias"),
    "layernorm eps zero": (lambda: layernorm.forward(f64((2, 4)), f64(4), f64(4), eps=0), ValueError, "eps"),
    "layernorm eps str": (lambda: layernorm.forward(f64((2, 4)), f64(4), f64(4), eps="small"),
                                    TypeError, "eps"),
    "layernorm dy dtype": (lambda: layernorm.backward(f64((2, 4), dtype=np.float32),
                                                      layernorm.forward(f64((2, 4)), f64(4), f64(4))[1]),
                           TypeError, "dy"),
    # silu / gelu
    "silu x int": (lambda: silu.forward(np.arange(3)), TypeError, "x"),
    "silu x float16": (lambda: silu.forward(f64(3, dtype=np.float16)), TypeError, "x"),
    "silu x NaN": (lambda: silu.forward(np.array([np.nan])), ValueError, "x"),
    "silu dy shape": (lambda: silu.backward(f64(4), silu.forward(f64(3))[1]), ValueError, "dy"),
    "silu dy dtype": (lambda: silu.backward(f64(3, dtype=np.float32), silu.forward(f64(3))[1]), TypeError, "dy"),
    "gelu x bool": (lambda: gelu.forward(np.array([True])), TypeError, "x"),
    "gelu x float16": (lambda: gelu.forward(f64(3, dtype=np.float16)), TypeError, "x"),
    "gelu x inf": (lambda: gelu.forward(np.array([np.inf])), ValueError, "x"),
    "gelu dy NaN": (lambda: gelu.backward(np.array([np.nan]), gelu.forward(f64(1))[1]), ValueError, "dy"),
    "gelu dy dtype": (lambda: gelu.backward(f64(1, dtype=np.float32), gelu.forward(f64(1))[1]), TypeError, "dy"),
    # cross_entropy
    "ce logits int": (lambda: cross_entropy.forward(np.ones((2, 3), dtype=np.int64), np.array([0, 1])),
                      TypeError, "logits"),
    "ce logits float16": (lambda: cross_entropy.forward(f64((2, 3), dtype=np.float16), np.array([0, 1])),
                          TypeError, "logits"),
    "ce logits 0-d": (lambda: cross_entropy.forward(np.array(1.0), np.array(0)), ValueError, "logits"),
    "ce logits V=0": (lambda: cross_entropy.forward(f64((2, 0)), np.array([0, 1])), ValueError, "logits"),
    "ce logits NaN": (lambda: cross_entropy.forward(np.array([[0.0, np.nan]]), np.array([0])), ValueError, "logits"),
    "ce targets float": (lambda: cross_entropy.forward(f64((2, 3)), np.array([0.0, 1.0])), TypeError, "targets"),
    "ce targets shape": (lambda: cross_entropy.forward(f64((2, 3)), np.array([0, 1, 2])), ValueError, "targets"),
    "ce targets rank": (lambda: cross_entropy.forward(f64((2, 3)), np.array([[0, 1]])), ValueError, "targets"),
    "ce targets too big": (lambda: cross_entropy.forward(f64((2, 3)), np.array([0, 3])), ValueError, "targets",
                           r"\[0, 3\)"),
    "ce targets negative": (lambda: cross_entropy.forward(f64((2, 3)), np.array([-1, 0])), ValueError, "targets",
                            r"\[0, 3\)"),
    "ce targets list": (lambda: cross_entropy.forward(f64((2, 3)), [0, 1]), TypeError, "targets"),
    "ce ignore_index float": (lambda: cross_entropy.forward(f64((2, 3)), np.array([0, 1]), ignore_index=-1.0),
                              TypeError, "ignore_index"),
    "ce dloss inf": (lambda: cross_entropy.backward(float("inf"), cross_entropy.forward(f64((2, 3)),
                                                                                     np.array([0, 1]))[1]),
                     ValueError, "dloss"),
    "ce dloss shape": (lambda: cross_entropy.backward(f64(1), cross_entropy.forward(f64((2, 3)),
                                                                                  np.array([0, 1]))[1]),
                       ValueError, "dloss"),
    "ce dloss dtype": (lambda: cross_entropy.backward(np.array(1.0, dtype=np.float32),
                                                      cross_entropy.forward(f64((2, 3)), np.array([0, 1]))[1]),
                       TypeError, "dloss"),
    # conv1d
    "conv x rank": (lambda: conv1d.forward(f64((5, 3)), conv_w), ValueError, "x"),
    "conv x int": (lambda: conv1d.forward(np.ones((2, 5, 3), dtype=np.int64), conv_w), TypeError, "x"),
    "conv x float16": (lambda: conv1d.forward(conv_x.astype(np.float16), conv_w), TypeError, "x"),
    "conv x NaN": (lambda: conv1d.forward(np.full((2, 5, 3), np.nan), conv_w), ValueError, "x"),
    "conv x T=0": (lambda: conv1d.forward(f64((2, 0, 3)), conv_w), ValueError, "x"),
    "conv w channels": (lambda: conv1d.forward(conv_x, f64((2, 4))), ValueError, "w"),
    "conv w K=0": (lambda: conv1d.forward(conv_x, f64((3, 0))), ValueError, "w", "K >= 1"),
    "conv w rank": (lambda: conv1d.forward(conv_x, f64(3)), ValueError, "w"),
    "conv w dtype": (lambda: conv1d.forward(conv_x, conv_w.astype(np.float32)), TypeError, "w"),
    "conv b shape": (lambda: conv1d.forward(conv_x, conv_w, f64(4)), ValueError, "b"),
    "conv initial_state shape": (lambda: conv1d.forward(conv_x, conv_w, initial_state=f64((2, 4, 3))),
                                 ValueError, "initial_state"),
    "conv initial_state dtype": (lambda: conv1d.forward(conv_x, conv_w, initial_state=f64((2, 3, 3),
                                                                                        dtype=np.float32)),
                                 TypeError, "initial_state"),
    "conv return_state": (lambda: conv1d.forward(conv_x, conv_w, return_state="yes"), TypeError, "return_state"),
    "conv dy shape": (lambda: conv1d.backward(f64((2, 4, 3)), conv1d.forward(conv_x, conv_w)[1]), ValueError, "dy"),
    "conv step x_t rank": (lambda: conv1d.step(conv_x, f64((2, 3, 3)), conv_w), ValueError, "x_t"),
    "conv step state shape": (lambda: conv1d.step(f64((2, 3)), f64((2, 4, 3)), conv_w), ValueError, "state"),
    "conv step state dtype": (lambda: conv1d.step(f64((2, 3)), f64((2, 3, 3), dtype=np.float32), conv_w),
                              TypeError, "state"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_names_the_argument(case):
    call, exception, name, *also = BAD_INPUTS[case]
    with pytest.raises(exception, match=rf"^{name}\b") as raised:
        call()
    for pattern in also:          # e.g. the valid range of ids / targets
        assert re.search(pattern, str(raised.value)), str(raised.value)
