"""Softmax attention: gradients, the identities it must satisfy, numerics and input checks."""
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minilm.ops import attention as attention_op
from minilm.ops._backend import BackendUnavailable
from minilm.testing import check_op_gradients, numpy_reference

attention = numpy_reference(attention_op)

SEEDS = st.integers(0, 2**32 - 1)
SMALL = st.integers(1, 3)
TIME = st.integers(1, 7)


def make_qkv(seed, B=2, H=2, Tq=4, Tk=4, Dk=3, Dv=2, dtype=np.float64, std=1.0):
    rng = np.random.default_rng(seed)
    q = (std * rng.standard_normal((B, H, Tq, Dk))).astype(dtype)
    k = (std * rng.standard_normal((B, H, Tk, Dk))).astype(dtype)
    v = rng.standard_normal((B, H, Tk, Dv)).astype(dtype)
    return q, k, v


def naive_attention(q, k, v, causal, scale):
    """One query, one key at a time: the definition, with the causal alignment spelled out."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    out = np.zeros(q.shape[:3] + v.shape[3:])
    for bb in range(B):
        for hh in range(H):
            for i in range(Tq):
                visible = range(Tk - Tq + i + 1) if causal else range(Tk)
                logits = np.array([scale * q[bb, hh, i] @ k[bb, hh, j] for j in visible])
                weights = np.exp(logits - logits.max())
                weights /= weights.sum()
                out[bb, hh, i] = sum(wj * v[bb, hh, j] for wj, j in zip(weights, visible))
    return out


# ---------------------------------------------------------------- gradients (float64, finite differences)

@pytest.mark.parametrize("Tq, Tk, causal, options", [
    (4, 4, True, {}),
    (4, 4, False, {}),
    (2, 5, True, {}),                  # queries are the last 2 of 5 positions
    (2, 5, False, {}),
    (5, 2, False, {}),                 # more queries than keys is fine without a mask
    (1, 1, True, {}),                  # T = 1
    (1, 6, True, {}),                  # one decoding step over a cache
    (3, 3, True, {"scale": 0.7}),
])
def test_gradients_match_finite_differences(Tq, Tk, causal, options):
    q, k, v = make_qkv(0, Tq=Tq, Tk=Tk)
    errors = check_op_gradients(attention.forward, attention.backward, [q, k, v], wrt=[0, 1, 2],
                                causal=causal, **options)
    assert max(errors.values()) <= 1e-6, errors


# ---------------------------------------------------------------- identities

@pytest.mark.parametrize("Tq, Tk, causal", [(4, 4, True), (2, 5, True), (1, 5, True), (3, 5, False)])
def test_matches_naive_loop(Tq, Tk, causal):
    q, k, v = make_qkv(1, Tq=Tq, Tk=Tk)
    out, _ = attention.forward(q, k, v, causal=causal)
    np.testing.assert_allclose(out, naive_attention(q, k, v, causal, 1 / np.sqrt(q.shape[-1])),
                               rtol=1e-12, atol=1e-12)


@given(B=SMALL, H=SMALL, Tq=TIME, extra=st.integers(0, 3), causal=st.booleans(), seed=SEEDS)
def test_probability_rows_sum_to_one(B, H, Tq, extra, causal, seed):
    q, k, v = make_qkv(seed, B, H, Tq, Tq + extra, std=3.0)
    _, cache = attention.forward(q, k, v, causal=causal)
    probs = cache["probs"]
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-12)
    assert np.all(probs >= 0)
    if causal:
        assert np.all(probs[..., ~attention.causal_mask(Tq, Tq + extra)] == 0)


@given(T=st.integers(2, 8), data=st.data(), seed=SEEDS)
def test_causal_prefix_equals_prefix_of_output(T, data, seed):
    prefix = data.draw(st.integers(1, T - 1))
    q, k, v = make_qkv(seed, Tq=T, Tk=T)
    full, _ = attention.forward(q, k, v)
    head, _ = attention.forward(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix])
    np.testing.assert_allclose(head, full[:, :, :prefix], rtol=1e-12, atol=1e-12)
    # and the future does not leak: changing later keys and values leaves the prefix alone
    k2, v2 = k.copy(), v.copy()
    k2[:, :, prefix:] += 5.0
    v2[:, :, prefix:] -= 5.0
    changed, _ = attention.forward(q, k2, v2)
    np.testing.assert_allclose(changed[:, :, :prefix], full[:, :, :prefix], rtol=1e-12, atol=1e-12)


@given(Tq=TIME, extra=st.integers(0, 3), causal=st.booleans(), seed=SEEDS)
def test_invariant_to_a_per_row_logit_shift(Tq, extra, causal, seed):
    """Append c_i to every query and 1 to every key: logit (i, j) becomes q_i.k_j + c_i for all j."""
    q, k, v = make_qkv(seed, Tq=Tq, Tk=Tq + extra)
    shift = np.random.default_rng(seed + 1).uniform(-50, 50, q.shape[:3] + (1,))
    q_shifted = np.concatenate([q, shift], axis=-1)
    k_ones = np.concatenate([k, np.ones(k.shape[:3] + (1,))], axis=-1)
    scale = 0.5
    out, _ = attention.forward(q, k, v, causal=causal, scale=scale)
    out_shifted, _ = attention.forward(q_shifted, k_ones, v, causal=causal, scale=scale)
    np.testing.assert_allclose(out_shifted, out, rtol=1e-9, atol=1e-9)


def test_softmax_is_shift_invariant_per_row():
    logits = np.random.default_rng(3).standard_normal((2, 3, 4, 5))
    shift = np.random.default_rng(4).uniform(-1e3, 1e3, (2, 3, 4, 1))
    np.testing.assert_allclose(attention.stable_softmax(logits + shift), attention.stable_softmax(logits),
                               rtol=1e-9, atol=1e-12)


@given(T=st.integers(1, 8), Tq=st.integers(1, 3), seed=SEEDS)
def test_decoding_over_a_cache_equals_last_rows(T, Tq, seed):
    Tq = min(Tq, T)
    q, k, v = make_qkv(seed, Tq=T, Tk=T)
    full, _ = attention.forward(q, k, v)
    last, _ = attention.forward(q[:, :, T - Tq:], k, v)
    np.testing.assert_allclose(last, full[:, :, T - Tq:], rtol=1e-12, atol=1e-12)
    one, _ = attention.forward(q[:, :, -1:], k, v)       # Tq = 1: a single decoding step
    np.testing.assert_allclose(one, full[:, :, -1:], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- precision and numerics

@given(Tq=TIME, extra=st.integers(0, 3), causal=st.booleans(), seed=SEEDS)
def test_float32_agrees_with_float64(Tq, extra, causal, seed):
    """Stated tolerance for N(0, 1) inputs: 1e-5 absolute on outputs, 1e-4 on gradients."""
    q, k, v = make_qkv(seed, Tq=Tq, Tk=Tq + extra)
    dout = np.random.default_rng(seed + 1).standard_normal(q.shape[:3] + v.shape[3:])
    out64, cache64 = attention.forward(q, k, v, causal=causal)
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    out32, cache32 = attention.forward(q32, k32, v32, causal=causal)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, atol=1e-5, rtol=0)
    grads64 = attention.backward(dout, cache64)
    grads32 = attention.backward(dout.astype(np.float32), cache32)
    for g32, g64 in zip(grads32, grads64):
        assert g32.dtype == np.float32
        np.testing.assert_allclose(g32, g64, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [True, False])
def test_logits_of_1e4_give_no_nan_or_warning(dtype, causal):
    q = np.full((1, 1, 4, 1), 100.0, dtype=dtype)
    k = np.array([100.0, -100.0, 100.0, -100.0], dtype=dtype).reshape(1, 1, 4, 1)
    v = np.random.default_rng(0).standard_normal((1, 1, 4, 3)).astype(dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        out, cache = attention.forward(q, k, v, causal=causal, scale=1.0)     # logits +-1e4
        grads = attention.backward(np.ones_like(out), cache)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)
    # the softmax is saturated: each row picks its +1e4 keys
    assert np.allclose(cache["probs"][0, 0, -1], [0.5, 0, 0.5, 0])


def test_default_scale_is_one_over_sqrt_dk():
    q, k, v = make_qkv(5, Dk=9)
    out, cache = attention.forward(q, k, v)
    assert cache["scale"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(out, attention.forward(q, k, v, scale=1 / 3)[0])


def test_numpy_backend_is_this_reference():
    q, k, v = make_qkv(6)
    out, cache = attention.forward(q, k, v, backend="numpy")
    assert "probs" in cache
    np.testing.assert_array_equal(out, attention.forward(q, k, v)[0])


def test_missing_backend_is_reported():
    q, k, v = make_qkv(6)
    with pytest.raises(BackendUnavailable, match="attention"):
        attention.forward(q, k, v, backend="cuda")


# ---------------------------------------------------------------- bad input: one case each

def _bad(**changes):
    q, k, v = make_qkv(7, Tq=3, Tk=4)
    args = {"q": q, "k": k, "v": v, "causal": True}
    args.update({name: change(args) if callable(change) else change for name, change in changes.items()})
    return args


def _with_value(name, index, value):
    def change(args):
        x = args[name].copy()
        x[index] = value
        return x
    return change


BAD_INPUTS = [
    ("q not an array", _bad(q=lambda a: a["q"].tolist()), TypeError, "q"),
    ("q int dtype", _bad(q=lambda a: a["q"].astype(np.int64)), TypeError, "q"),
    ("q float16", _bad(q=lambda a: a["q"].astype(np.float16)), TypeError, "q"),
    ("q rank 3", _bad(q=lambda a: a["q"][0]), ValueError, "q"),
    ("k rank 5", _bad(k=lambda a: a["k"][None]), ValueError, "k"),
    ("v rank 2", _bad(v=lambda a: a["v"][0, 0]), ValueError, "v"),
    ("k batch differs", _bad(k=lambda a: a["k"][:1]), ValueError, "k"),
    ("k heads differ", _bad(k=lambda a: a["k"][:, :1]), ValueError, "k"),
    ("k Dk differs", _bad(k=lambda a: a["k"][..., :2]), ValueError, "k"),
    ("v Tk differs", _bad(v=lambda a: a["v"][:, :, :2]), ValueError, "v"),
    ("v batch differs", _bad(v=lambda a: a["v"][:1]), ValueError, "v"),
    ("mixed dtypes", _bad(v=lambda a: a["v"].astype(np.float32)), TypeError, "v"),
    ("NaN in q", _bad(q=_with_value("q", (0, 0, 0, 0), np.nan)), ValueError, "q"),
    ("Inf in k", _bad(k=_with_value("k", (0, 0, 1, 0), np.inf)), ValueError, "k"),
    ("NaN in v", _bad(v=_with_value("v", (1, 1, 1, 1), np.nan)), ValueError, "v"),
    ("Tq = 0", _bad(q=lambda a: a["q"][:, :, :0]), ValueError, "q"),
    ("Tk = 0", _bad(k=lambda a: a["k"][:, :, :0], v=lambda a: a["v"][:, :, :0]), ValueError, "k"),
    ("Dk = 0", _bad(q=lambda a: a["q"][..., :0], k=lambda a: a["k"][..., :0]), ValueError, "q"),
    ("Dv = 0", _bad(v=lambda a: a["v"][..., :0]), ValueError, "v"),
    ("causal with Tq > Tk", _bad(q=lambda a: np.concatenate([a["q"], a["q"]], axis=2)), ValueError, "q"),
    ("causal not a bool", _bad(causal=1), TypeError, "causal"),
    ("scale negative", _bad(scale=-1.0), ValueError, "scale"),
    ("scale zero", _bad(scale=0.0), ValueError, "scale"),
    ("scale not a number", _bad(scale="0.5"), TypeError, "scale"),
    ("backend unknown", _bad(backend="torch"), ValueError, "backend"),
    ("backend not a str", _bad(backend=3), TypeError, "backend"),
]


@pytest.mark.parametrize("args, error, name", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_rejected(args, error, name):
    with pytest.raises(error, match=rf"\b{name}\b"):
        attention.forward(**args)


@pytest.mark.parametrize("dout, error", [
    (np.ones((2, 2, 3, 3)), ValueError),            # wrong Dv
    (np.ones((2, 2, 3)), ValueError),               # wrong rank
    (np.ones((2, 2, 3, 2), dtype=np.float32), TypeError),
    (np.full((2, 2, 3, 2), np.nan), ValueError),
], ids=["shape", "rank", "dtype", "nan"])
def test_bad_dout_is_rejected(dout, error):
    _, cache = attention.forward(*make_qkv(8, Tq=3, Tk=4))
    with pytest.raises(error, match=r"\bdout\b"):
        attention.backward(dout, cache)
