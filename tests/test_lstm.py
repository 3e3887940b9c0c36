"""LSTM: BPTT gradients, step = forward, state carrying, gate order, numerics, input checks."""
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minilm.ops import lstm
from minilm.testing import check_op_gradients

SEEDS = st.integers(0, 2**32 - 1)


def make_inputs(seed, B=2, T=4, Din=3, H=2, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, Din))
    Wx = rng.standard_normal((Din, 4 * H)) / np.sqrt(Din)
    Wh = rng.standard_normal((H, 4 * H)) / np.sqrt(H)
    b = 0.5 * rng.standard_normal(4 * H)
    return tuple(a.astype(dtype) for a in (x, Wx, Wh, b))


def random_state(seed, B=2, H=2):
    rng = np.random.default_rng(seed)
    return np.tanh(rng.standard_normal((B, H))), rng.standard_normal((B, H))


# ---------------------------------------------------------------- gradients (float64, finite differences)

@pytest.mark.parametrize("T, H, with_state", [
    (4, 2, False),
    (4, 2, True),
    (1, 2, False),                     # T = 1
    (1, 3, True),
    (6, 1, True),                      # one hidden unit
])
def test_gradients_match_finite_differences(T, H, with_state):
    inputs = list(make_inputs(0, T=T, H=H))
    state = random_state(1, H=H) if with_state else None
    errors = check_op_gradients(lstm.forward, lstm.backward, inputs, wrt=[0, 1, 2, 3], initial_state=state)
    assert max(errors.values()) <= 1e-6, errors


# ---------------------------------------------------------------- identities

@given(B=st.integers(1, 2), T=st.integers(1, 7), H=st.integers(1, 3), with_state=st.booleans(), seed=SEEDS)
def test_step_equals_forward(B, T, H, with_state, seed):
    x, Wx, Wh, b = make_inputs(seed, B=B, T=T, H=H)
    state = random_state(seed + 1, B, H) if with_state else None
    (out, final), _ = lstm.forward(x, Wx, Wh, b, initial_state=state, return_state=True)
    for t in range(T):
        h_t, state = lstm.step(x[:, t], state, Wx, Wh, b)
        np.testing.assert_allclose(h_t, out[:, t], rtol=1e-12, atol=1e-12)
    for part, stepped in zip(final, state):
        np.testing.assert_allclose(stepped, part, rtol=1e-12, atol=1e-12)


@given(T=st.integers(2, 8), data=st.data(), seed=SEEDS)
def test_split_sequence_with_state_equals_one_pass(T, data, seed):
    split = data.draw(st.integers(1, T - 1))
    x, Wx, Wh, b = make_inputs(seed, T=T)
    (full, final), _ = lstm.forward(x, Wx, Wh, b, return_state=True)
    (first, mid), _ = lstm.forward(x[:, :split], Wx, Wh, b, return_state=True)
    (second, final2), _ = lstm.forward(x[:, split:], Wx, Wh, b, initial_state=mid, return_state=True)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), full, rtol=1e-12, atol=1e-12)
    for part, part2 in zip(final, final2):
        np.testing.assert_allclose(part2, part, rtol=1e-12, atol=1e-12)


def test_one_unit_by_hand():
    x, Wx, Wh, b = np.array([[[0.3]]]), np.array([[0.5, -1.0, 2.0, 0.1]]), np.zeros((1, 4)), np.zeros(4)
    h0, c0 = np.array([[0.2]]), np.array([[-0.7]])
    sig = lambda z: 1 / (1 + math.exp(-z))
    i, f, g, o = sig(0.15), sig(-0.3), math.tanh(0.6), sig(0.03)
    c = f * -0.7 + i * g
    (out, (h, c_out)), _ = lstm.forward(x, Wx, Wh, b, initial_state=(h0, c0), return_state=True)
    assert c_out[0, 0] == pytest.approx(c, rel=1e-14)
    assert out[0, 0, 0] == pytest.approx(o * math.tanh(c), rel=1e-14)


def test_gate_order_is_i_f_g_o():
    """Forget gate open, input gate shut: the cell keeps c0, whatever the input."""
    B, T, Din, H = 2, 5, 3, 2
    x = np.random.default_rng(2).standard_normal((B, T, Din))
    Wx, Wh = np.zeros((Din, 4 * H)), np.zeros((H, 4 * H))
    b = np.concatenate([np.full(H, -50.0), np.full(H, 50.0), np.full(H, 0.3), np.full(H, 50.0)])
    c0 = np.array([[0.5, -1.0], [2.0, 0.0]])
    out, _ = lstm.forward(x, Wx, Wh, b, initial_state=(np.zeros((B, H)), c0))
    np.testing.assert_allclose(out, np.repeat(np.tanh(c0)[:, None], T, axis=1), atol=1e-12)


# ---------------------------------------------------------------- precision and numerics

@given(T=st.integers(1, 7), seed=SEEDS)
def test_float32_agrees_with_float64(T, seed):
    """Stated tolerance for unit-scale inputs: 1e-5 absolute on h, 1e-4 on gradients."""
    inputs = make_inputs(seed, T=T)
    dh = np.random.default_rng(seed + 1).standard_normal((2, T, 2))
    out64, cache64 = lstm.forward(*inputs)
    out32, cache32 = lstm.forward(*(a.astype(np.float32) for a in inputs))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, atol=1e-5, rtol=0)
    for g32, g64 in zip(lstm.backward(dh.astype(np.float32), cache32), lstm.backward(dh, cache64)):
        assert g32.dtype == np.float32
        np.testing.assert_allclose(g32, g64, atol=1e-4 * (1 + np.abs(g64).max()), rtol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_preactivations_of_1e4_stay_finite(dtype):
    x, Wx, Wh, b = make_inputs(3, T=6)
    b = np.where(np.arange(b.size) % 2 == 0, 1e4, -1e4)         # every gate saturated either way
    Wx = 1e4 * np.sign(Wx)
    x, Wx, Wh, b = (a.astype(dtype) for a in (x, Wx, Wh, b))
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        out, cache = lstm.forward(x, Wx, Wh, b)
        grads = lstm.backward(np.ones_like(out), cache)
        h_t, _ = lstm.step(x[:, 0], None, Wx, Wh, b)
    for a in (out, h_t, *grads):
        assert np.all(np.isfinite(a))


def test_sigmoid_is_stable_and_exact():
    z = np.array([-1e4, -40.0, -1.0, 0.0, 1.0, 40.0, 1e4])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = lstm.sigmoid(z)
    np.testing.assert_allclose(s[1:-1], 1 / (1 + np.exp(-z[1:-1])), rtol=1e-15)
    assert s[0] == 0.0 and s[-1] == 1.0


# ---------------------------------------------------------------- bad input: one case each

def _bad(**changes):
    x, Wx, Wh, b = make_inputs(4, B=2, T=3, Din=3, H=2)
    args = {"x": x, "Wx": Wx, "Wh": Wh, "b": b}
    for name, change in changes.items():
        args[name] = change(args) if callable(change) else change
    return args


BAD_INPUTS = [
    ("x not an array", _bad(x=lambda a: a["x"].tolist()), TypeError, "x"),
    ("x rank 2", _bad(x=lambda a: a["x"][0]), ValueError, "x"),
    ("x bool", _bad(x=lambda a: a["x"] > 0), TypeError, "x"),
    ("x NaN", _bad(x=lambda a: np.where(a["x"] > 1, np.nan, a["x"])), ValueError, "x"),
    ("T = 0", _bad(x=lambda a: a["x"][:, :0]), ValueError, "x"),
    ("Wx columns not 4H", _bad(Wx=lambda a: a["Wx"][:, :7]), ValueError, "Wx"),
    ("Wx rows not Din", _bad(Wx=lambda a: a["Wx"][:2]), ValueError, "Wx"),
    ("Wx rank 3", _bad(Wx=lambda a: a["Wx"][None]), ValueError, "Wx"),
    ("Wh wrong shape", _bad(Wh=lambda a: a["Wh"][:, :4]), ValueError, "Wh"),
    ("Wh Inf", _bad(Wh=lambda a: a["Wh"] * np.inf), ValueError, "Wh"),
    ("b wrong size", _bad(b=lambda a: a["b"][:4]), ValueError, "b"),
    ("b dtype differs", _bad(b=lambda a: a["b"].astype(np.float32)), TypeError, "b"),
    ("x float16", _bad(x=lambda a: a["x"].astype(np.float16)), TypeError, "x"),
    ("state not a tuple", _bad(initial_state=np.zeros((2, 2))), TypeError, "initial_state"),
    ("state of three parts", _bad(initial_state=(np.zeros((2, 2)),) * 3), ValueError, "initial_state"),
    ("state part wrong shape", _bad(initial_state=(np.zeros((2, 2)), np.zeros((2, 3)))),
     ValueError, "initial_state"),
    ("state part wrong dtype", _bad(initial_state=(np.zeros((2, 2)), np.zeros((2, 2), np.float32))),
     TypeError, "initial_state"),
    ("state NaN", _bad(initial_state=(np.full((2, 2), np.nan), np.zeros((2, 2)))), ValueError, "initial_state"),
    ("return_state not a bool", _bad(return_state=None), TypeError, "return_state"),
]


@pytest.mark.parametrize("args, error, name", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_rejected(args, error, name):
    with pytest.raises(error, match=rf"\b{name}\b"):
        lstm.forward(**args)


@pytest.mark.parametrize("dh_out, error", [
    (np.ones((2, 3, 3)), ValueError),
    (np.ones((2, 3, 2), dtype=np.float32), TypeError),
    (np.full((2, 3, 2), np.nan), ValueError),
], ids=["shape", "dtype", "nan"])
def test_bad_dh_out_is_rejected(dh_out, error):
    _, cache = lstm.forward(**_bad())
    with pytest.raises(error, match=r"\bdh_out\b"):
        lstm.backward(dh_out, cache)


@pytest.mark.parametrize("change, error, name", [
    ({"x_t": np.zeros((2, 1, 3))}, ValueError, "x_t"),
    ({"x_t": np.zeros((2, 4))}, ValueError, "Wx"),
    ({"state": (np.zeros((2, 2)),)}, ValueError, "state"),
    ({"state": (np.zeros((2, 5)), np.zeros((2, 2)))}, ValueError, "state"),
], ids=["x_t rank", "x_t features", "state length", "state shape"])
def test_bad_step_input_is_rejected(change, error, name):
    x, Wx, Wh, b = make_inputs(5, B=2, T=1, Din=3, H=2)
    args = {"x_t": x[:, 0], "state": None, "Wx": Wx, "Wh": Wh, "b": b}
    args.update(change)
    with pytest.raises(error, match=rf"\b{name}\b"):
        lstm.step(**args)
