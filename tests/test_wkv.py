"""RWKV-4 WKV: gradients, stable form = direct formula, state carrying, step, numerics, input checks."""
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minilm.ops import wkv
from minilm.testing import check_op_gradients

SEEDS = st.integers(0, 2**32 - 1)


def make_inputs(seed, B=2, T=5, D=3, dtype=np.float64, k_std=1.0):
    rng = np.random.default_rng(seed)
    w = -np.exp(rng.standard_normal(D))             # RWKV-4: w = -exp(time_decay) < 0
    u = rng.standard_normal(D)
    k = k_std * rng.standard_normal((B, T, D))
    v = rng.standard_normal((B, T, D))
    return tuple(x.astype(dtype) for x in (w, u, k, v))


def random_state(seed, B=2, D=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, D)), rng.uniform(0.5, 2.0, (B, D)), rng.uniform(-2.0, 2.0, (B, D))


def direct_wkv(w, u, k, v, initial_state=None):
    """The defining formula, summed term by term (float64, moderate values only)."""
    B, T, D = k.shape
    A0, B0 = np.zeros((B, D)), np.zeros((B, D))
    if initial_state is not None:
        a, b, p = initial_state
        A0, B0 = a * np.exp(p), b * np.exp(p)
    out = np.zeros((B, T, D))
    for t in range(T):
        num = np.exp(t * w) * A0 + np.exp(u + k[:, t]) * v[:, t]
        den = np.exp(t * w) * B0 + np.exp(u + k[:, t])
        for i in range(t):
            weight = np.exp((t - 1 - i) * w + k[:, i])
            num += weight * v[:, i]
            den += weight
        out[:, t] = num / den
    return out


# ---------------------------------------------------------------- gradients (float64, finite differences)

@pytest.mark.parametrize("T, state, k_std", [
    (5, None, 1.0),
    (1, None, 1.0),                    # T = 1: only the bonus term
    (5, "carried", 1.0),               # state returned by a previous forward
    (4, "random", 1.0),                # any valid state
    (1, "random", 1.0),
    (5, None, 50.0),                   # k of +-50: saturated weights, still exact gradients
])
def test_gradients_match_finite_differences(T, state, k_std):
    w, u, k, v = make_inputs(0, T=T, k_std=k_std)
    if k_std == 50.0:
        k = np.where(k > 0, 50.0, -50.0)
    initial_state = None
    if state == "carried":
        _, _, k_prev, v_prev = make_inputs(1, T=3)
        (_, initial_state), _ = wkv.forward(w, u, k_prev, v_prev, return_state=True)
    elif state == "random":
        initial_state = random_state(3)
    errors = check_op_gradients(wkv.forward, wkv.backward, [w, u, k, v], wrt=[0, 1, 2, 3],
                                initial_state=initial_state)
    assert max(errors.values()) <= 1e-6, errors


# ---------------------------------------------------------------- identities

@given(B=st.integers(1, 2), T=st.integers(1, 8), D=st.integers(1, 3), with_state=st.booleans(), seed=SEEDS)
def test_stable_form_equals_direct_formula(B, T, D, with_state, seed):
    w, u, k, v = make_inputs(seed, B, T, D, k_std=2.0)
    state = random_state(seed + 1, B, D) if with_state else None
    out, _ = wkv.forward(w, u, k, v, initial_state=state)
    np.testing.assert_allclose(out, direct_wkv(w, u, k, v, state), rtol=1e-10, atol=1e-12)


@given(T=st.integers(2, 9), data=st.data(), seed=SEEDS)
def test_split_sequence_with_state_equals_one_pass(T, data, seed):
    split = data.draw(st.integers(1, T - 1))
    w, u, k, v = make_inputs(seed, T=T, k_std=3.0)
    (full, final), _ = wkv.forward(w, u, k, v, return_state=True)
    (first, mid), _ = wkv.forward(w, u, k[:, :split], v[:, :split], return_state=True)
    (second, final2), _ = wkv.forward(w, u, k[:, split:], v[:, split:], initial_state=mid, return_state=True)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), full, rtol=1e-12, atol=1e-12)
    for part, part2 in zip(final, final2):
        np.testing.assert_allclose(part2, part, rtol=1e-12, atol=1e-12)


@given(T=st.integers(1, 8), with_state=st.booleans(), seed=SEEDS)
def test_step_equals_forward(T, with_state, seed):
    w, u, k, v = make_inputs(seed, T=T, k_std=3.0)
    state = random_state(seed + 1) if with_state else None
    (out, final), _ = wkv.forward(w, u, k, v, initial_state=state, return_state=True)
    for t in range(T):
        y_t, state = wkv.step(w, u, k[:, t], v[:, t], state)
        np.testing.assert_allclose(y_t, out[:, t], rtol=1e-12, atol=1e-12)
    for part, stepped in zip(final, state):
        np.testing.assert_allclose(stepped, part, rtol=1e-12, atol=1e-12)


@given(T=st.integers(1, 8), seed=SEEDS)
def test_output_is_a_weighted_average_of_seen_values(T, seed):
    w, u, k, v = make_inputs(seed, T=T, k_std=5.0)
    out, _ = wkv.forward(w, u, k, v)
    running_min = np.minimum.accumulate(v, axis=1)
    running_max = np.maximum.accumulate(v, axis=1)
    assert np.all(out >= running_min - 1e-12) and np.all(out <= running_max + 1e-12)


def test_zero_state_is_the_empty_state():
    w, u, k, v = make_inputs(4)
    zeros = np.zeros((2, 3))
    np.testing.assert_allclose(wkv.forward(w, u, k, v, initial_state=(zeros, zeros, zeros + 7.0))[0],
                               wkv.forward(w, u, k, v)[0], rtol=1e-14)


def test_returned_state_is_finite_and_shaped():
    w, u, k, v = make_inputs(5, B=2, T=4, D=3)
    (_, (a, b, p)), _ = wkv.forward(w, u, k, v, return_state=True)
    for part in (a, b, p):
        assert part.shape == (2, 3) and np.all(np.isfinite(part))
    assert np.all(b >= 1.0)            # the largest term of the denominator is scaled to 1


# ---------------------------------------------------------------- precision and numerics

@given(T=st.integers(1, 8), seed=SEEDS)
def test_float32_agrees_with_float64(T, seed):
    """Stated tolerance for k ~ N(0, 4), v ~ N(0, 1): 1e-5 absolute on wkv, 1e-4 relative on gradients."""
    inputs = make_inputs(seed, T=T, k_std=2.0)
    dwkv = np.random.default_rng(seed + 1).standard_normal(inputs[2].shape)
    out64, cache64 = wkv.forward(*inputs)
    out32, cache32 = wkv.forward(*(x.astype(np.float32) for x in inputs))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, atol=1e-5, rtol=0)
    grads64 = wkv.backward(dwkv, cache64)
    grads32 = wkv.backward(dwkv.astype(np.float32), cache32)
    for g32, g64 in zip(grads32, grads64):
        assert g32.dtype == np.float32
        np.testing.assert_allclose(g32, g64, atol=1e-4 * (1 + np.abs(g64).max()), rtol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("w_value, u_value", [(None, None), (-1e3, 30.0), (2.0, -30.0)])
def test_k_of_80_stays_finite(dtype, w_value, u_value):
    """e^80 overflows float32; the stable form only exponentiates numbers <= 0."""
    w, u, k, v = make_inputs(6, T=12)
    k = np.where(np.random.default_rng(7).random(k.shape) < 0.5, -80.0, 80.0)
    if w_value is not None:
        w, u = np.full_like(w, w_value), np.full_like(u, u_value)
    w, u, k, v = (x.astype(dtype) for x in (w, u, k, v))
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        (out, state), cache = wkv.forward(w, u, k, v, return_state=True)
        grads = wkv.backward(np.ones_like(out), cache)
        step_out, _ = wkv.step(w, u, k[:, 0], v[:, 0], None)
    for x in (out, step_out, *state, *grads):
        assert np.all(np.isfinite(x))


# ---------------------------------------------------------------- bad input: one case each

def _bad(**changes):
    w, u, k, v = make_inputs(8, B=2, T=3, D=4)
    args = {"w": w, "u": u, "k": k, "v": v}
    for name, change in changes.items():
        args[name] = change(args) if callable(change) else change
    return args


def _nan_at(name, index):
    def change(args):
        x = args[name].copy()
        x[index] = np.nan
        return x
    return change


GOOD_STATE = (np.zeros((2, 4)), np.ones((2, 4)), np.zeros((2, 4)))

BAD_INPUTS = [
    ("w not an array", _bad(w=lambda a: list(a["w"])), TypeError, "w"),
    ("w rank 2", _bad(w=lambda a: a["w"][None]), ValueError, "w"),
    ("w wrong channels", _bad(w=lambda a: a["w"][:3]), ValueError, "w"),
    ("u wrong channels", _bad(u=lambda a: a["u"][:2]), ValueError, "u"),
    ("u int dtype", _bad(u=lambda a: a["u"].astype(np.int32)), TypeError, "u"),
    ("k rank 2", _bad(k=lambda a: a["k"][0]), ValueError, "k"),
    ("k float16", _bad(k=lambda a: a["k"].astype(np.float16)), TypeError, "k"),
    ("v shape differs", _bad(v=lambda a: a["v"][:, :2]), ValueError, "v"),
    ("v dtype differs", _bad(v=lambda a: a["v"].astype(np.float32)), TypeError, "v"),
    ("w dtype differs", _bad(w=lambda a: a["w"].astype(np.float32)), TypeError, "w"),
    ("NaN in k", _bad(k=_nan_at("k", (0, 1, 2))), ValueError, "k"),
    ("NaN in w", _bad(w=_nan_at("w", 0)), ValueError, "w"),
    ("Inf in v", _bad(v=lambda a: np.where(a["v"] > 0, np.inf, a["v"])), ValueError, "v"),
    ("T = 0", _bad(k=lambda a: a["k"][:, :0], v=lambda a: a["v"][:, :0]), ValueError, "k"),
    ("state not a tuple", _bad(initial_state=np.zeros((3, 2, 4))), TypeError, "initial_state"),
    ("state of two parts", _bad(initial_state=GOOD_STATE[:2]), ValueError, "initial_state"),
    ("state part wrong shape", _bad(initial_state=(np.zeros((2, 3)),) + GOOD_STATE[1:]),
     ValueError, "initial_state"),
    ("state part wrong dtype", _bad(initial_state=GOOD_STATE[:2] + (np.zeros((2, 4), np.float32),)),
     TypeError, "initial_state"),
    ("state with NaN", _bad(initial_state=(np.full((2, 4), np.nan),) + GOOD_STATE[1:]),
     ValueError, "initial_state"),
    ("state b negative", _bad(initial_state=(GOOD_STATE[0], -GOOD_STATE[1], GOOD_STATE[2])),
     ValueError, "initial_state"),
    ("return_state not a bool", _bad(return_state="yes"), TypeError, "return_state"),
]


@pytest.mark.parametrize("args, error, name", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_rejected(args, error, name):
    with pytest.raises(error, match=rf"\b{name}\b"):
        wkv.forward(**args)


@pytest.mark.parametrize("dwkv, error", [
    (np.ones((2, 3, 5)), ValueError),
    (np.ones((2, 3, 4), dtype=np.float32), TypeError),
    (np.full((2, 3, 4), np.inf), ValueError),
], ids=["shape", "dtype", "inf"])
def test_bad_dwkv_is_rejected(dwkv, error):
    _, cache = wkv.forward(**_bad())
    with pytest.raises(error, match=r"\bdwkv\b"):
        wkv.backward(dwkv, cache)


@pytest.mark.parametrize("change, error, name", [
    ({"k_t": np.zeros((2, 3, 4))}, ValueError, "k_t"),
    ({"v_t": np.zeros((2, 3))}, ValueError, "v_t"),
    ({"v_t": np.zeros((2, 4), np.float32)}, TypeError, "v_t"),
    ({"w": np.zeros(5)}, ValueError, "w"),
    ({"state": (np.zeros((2, 4)),) * 2}, ValueError, "state"),
    ({"state": (np.zeros((1, 4)),) * 3}, ValueError, "state"),
], ids=["k_t rank", "v_t shape", "v_t dtype", "w channels", "state length", "state shape"])
def test_bad_step_input_is_rejected(change, error, name):
    w, u, k, v = make_inputs(9, B=2, T=1, D=4)
    args = {"w": w, "u": u, "k_t": k[:, 0], "v_t": v[:, 0], "state": None}
    args.update(change)
    with pytest.raises(error, match=rf"\b{name}\b"):
        wkv.step(**args)
