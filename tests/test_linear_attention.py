"""Tests for minilm.ops.linear_attention.

Hand-written gradients against finite differences (float64, every mode × feature map × normalize × decay);
identities as properties (associativity; parallel == recurrent == chunked; split-and-carry == one pass;
float32 close to float64); stability at near-zero denominators and strong decay; one test per bad input.
"""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minilm.ops import linear_attention as linear_attention_op
from minilm.ops._backend import BackendUnavailable
from minilm.testing import check_op_gradients, numpy_reference

la = numpy_reference(linear_attention_op)

MODES = la.MODES
FEATURE_MAPS = la.FEATURE_MAPS
DECAYS = (None, "head", "gate")   # no decay, log_decay (H,), log_decay (B, H, T)


# ----------------------------------------------------------------------------------------------
# input builders

def make_qk(rng, shape, feature_map, normalize):
    """q or k of `shape` whose features suit the map.

    relu: entries are kept at |x| >= 0.3. At x = 0 relu has a kink, and a centred difference that
    straddles it measures the average of the two one-sided slopes, not the derivative; away from 0 the
    finite-difference check is exact. The first coordinate is made positive so every φ(x) has a
    positive entry and a normalized denominator cannot reach 0.
    identity + normalize: positive entries, because a sign-indefinite φ(q)·z can cross 0 and the
    division blows up (a property of the model, not of the code).
    elu1, taylor2: plain normal draws (their kernels are positive: elu1 features > 0, taylor2 ≥ 1/2).
    """
    x = rng.standard_normal(shape)
    if feature_map == "relu":
        x = np.sign(x) * (0.3 + np.abs(x))
        x[..., 0] = np.abs(x[..., 0])
    elif feature_map == "identity" and normalize:
        x = 0.3 + np.abs(x)
    return x


def make_inputs(rng, B, H, T, Dk, Dv, feature_map="identity", normalize=False):
    q = make_qk(rng, (B, H, T, Dk), feature_map, normalize)
    k = make_qk(rng, (B, H, T, Dk), feature_map, normalize)
    v = rng.standard_normal((B, H, T, Dv))
    return q, k, v


def make_log_decay(rng, kind, B, H, T):
    """Entries in [-1, -0.05]: strictly negative so a finite-difference step never makes one positive."""
    if kind is None:
        return None
    shape = (H,) if kind == "head" else (B, H, T)
    return -rng.uniform(0.05, 1.0, shape)


def make_initial_state(rng, feature_map, normalize, B, H, Dk, Dv):
    F = la.feature_dim(feature_map, Dk)
    S = rng.standard_normal((B, H, F, Dv))
    if normalize:
        return S, np.abs(rng.standard_normal((B, H, F)))   # z is a decayed sum of non-negative features
    return S


def forward_with_decay(q, k, v, log_decay, **options):
    """forward with log_decay as a positional input, so the gradient checker can perturb it."""
    return la.forward(q, k, v, log_decay=log_decay, **options)


def run(q, k, v, dout, **options):
    """forward (with the final state when causal) + backward; returns (out, state, grads)."""
    causal = options.get("causal", True)
    result, cache = la.forward(q, k, v, return_state=causal, **options)
    out, state = result if causal else (result, None)
    return out, state, la.backward(dout, cache)


def as_list(state):
    return list(state) if isinstance(state, tuple) else [state]


def assert_close(actual, expected, rtol, what=""):
    """|actual − expected| <= rtol · max|expected| everywhere (relative to the array's scale)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:.1g} * {scale:.3g}"


GRAD_TOL = 1e-6
SMALL = dict(B=1, H=2, T=5, Dk=3, Dv=2)


# ----------------------------------------------------------------------------------------------
# gradients against finite differences (float64)

@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_causal(mode, feature_map, normalize, decay):
    rng = np.random.default_rng(0)
    q, k, v = make_inputs(rng, **SMALL, feature_map=feature_map, normalize=normalize)
    options = dict(mode=mode, chunk_size=2, feature_map=feature_map, normalize=normalize, scale=0.7)
    g = make_log_decay(rng, decay, SMALL["B"], SMALL["H"], SMALL["T"])
    if g is None:
        errors = check_op_gradients(la.forward, la.backward, [q, k, v], wrt=[0, 1, 2], **options)
    else:
        errors = check_op_gradients(forward_with_decay, la.backward, [q, k, v, g], wrt=[0, 1, 2, 3], **options)
    assert max(errors.values()) <= GRAD_TOL, errors


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_gradients_noncausal(feature_map, normalize):
    rng = np.random.default_rng(1)
    q, k, v = make_inputs(rng, **SMALL, feature_map=feature_map, normalize=normalize)
    errors = check_op_gradients(la.forward, la.backward, [q, k, v], wrt=[0, 1, 2], causal=False,
                                feature_map=feature_map, normalize=normalize, scale=1.3)
    assert max(errors.values()) <= GRAD_TOL, errors


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_with_initial_state(mode, feature_map, normalize):
    rng = np.random.default_rng(2)
    B, H, T, Dk, Dv = SMALL.values()
    q, k, v = make_inputs(rng, **SMALL, feature_map=feature_map, normalize=normalize)
    g = make_log_decay(rng, "gate", B, H, T)
    state = make_initial_state(rng, feature_map, normalize, B, H, Dk, Dv)
    errors = check_op_gradients(forward_with_decay, la.backward, [q, k, v, g], wrt=[0, 1, 2, 3], mode=mode,
                                chunk_size=3, feature_map=feature_map, normalize=normalize, initial_state=state)
    assert max(errors.values()) <= GRAD_TOL, errors


def test_backward_returns_three_grads_without_decay_and_four_with():
    rng = np.random.default_rng(3)
    q, k, v = make_inputs(rng, **SMALL)
    out, cache = la.forward(q, k, v)
    assert len(la.backward(np.ones_like(out), cache)) == 3
    g = make_log_decay(rng, "head", SMALL["B"], SMALL["H"], SMALL["T"])
    out, cache = la.forward(q, k, v, log_decay=g)
    grads = la.backward(np.ones_like(out), cache)
    assert len(grads) == 4 and grads[3].shape == g.shape


# ----------------------------------------------------------------------------------------------
# against the definition, written out independently of the module's algebra

def reference_loops(q, k, v, feature_map, scale, normalize, g):
    """out_t = Σ_{s<=t} (Π_{s<r<=t} exp(g_r)) · (scale·φ(q_t)·φ(k_s)) v_s [/ Σ_s (same weight without v) + EPS]."""
    phi_q, phi_k = la.apply_feature_map(q, feature_map), la.apply_feature_map(k, feature_map)
    B, H, T, _ = q.shape
    out = np.zeros(v.shape)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                numerator, denominator = np.zeros(v.shape[3]), 0.0
                for s in range(t + 1):
                    weight = math.exp(sum(g[b, h, r] for r in range(s + 1, t + 1)))
                    weight *= scale * float(phi_q[b, h, t] @ phi_k[b, h, s])
                    numerator += weight * v[b, h, s]
                    denominator += weight
                out[b, h, t] = numerator / (denominator + la.EPS) if normalize else numerator
    return out


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_matches_definition(feature_map, normalize):
    rng = np.random.default_rng(4)
    B, H, T, Dk, Dv = 2, 2, 7, 3, 2
    q, k, v = make_inputs(rng, B, H, T, Dk, Dv, feature_map, normalize)
    g = make_log_decay(rng, "gate", B, H, T)
    expected = reference_loops(q, k, v, feature_map, 0.6, normalize, g)
    for mode in MODES:
        out, _ = la.forward(q, k, v, mode=mode, chunk_size=3, feature_map=feature_map, scale=0.6,
                            normalize=normalize, log_decay=g)
        assert_close(out, expected, 1e-12, mode)


def test_taylor2_kernel_is_the_second_order_expansion():
    """φ(x)·φ(y) = 1 + s + s²/2 with s = x·y/√Dk (Based's constants), and F = 1 + Dk + Dk²."""
    rng = np.random.default_rng(5)
    for Dk in (1, 3, 8):
        x, y = rng.standard_normal((2, 10, Dk))
        phi_x, phi_y = la.apply_feature_map(x, "taylor2"), la.apply_feature_map(y, "taylor2")
        assert phi_x.shape == (10, la.feature_dim("taylor2", Dk)) == (10, 1 + Dk + Dk * Dk)
        s = np.sum(x * y, axis=-1) / math.sqrt(Dk)
        np.testing.assert_allclose(np.sum(phi_x * phi_y, axis=-1), 1 + s + s * s / 2, rtol=1e-12)


def test_elu1_is_positive_and_matches_elu_plus_one():
    x = np.linspace(-30, 5, 71)
    phi = la.apply_feature_map(x, "elu1")
    assert np.all(phi > 0)
    np.testing.assert_allclose(phi, np.where(x > 0, x, np.expm1(x)) + 1, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# properties (hypothesis: shapes and a seed are drawn, arrays are built from the seed)

@given(B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 40), Dk=st.integers(1, 4), Dv=st.integers(1, 3),
       feature_map=st.sampled_from(FEATURE_MAPS), normalize=st.booleans(), scale=st.floats(0.1, 2.0),
       seed=st.integers(0, 2**32 - 1))
def test_noncausal_associativity(B, H, T, Dk, Dv, feature_map, normalize, scale, seed):
    """(Q̃K̃ᵀ)V with the explicit T×T matrix == Q̃(K̃ᵀV) as computed by forward(causal=False)."""
    rng = np.random.default_rng(seed)
    q, k, v = make_inputs(rng, B, H, T, Dk, Dv, feature_map, normalize)
    scores = scale * la.apply_feature_map(q, feature_map) @ la.apply_feature_map(k, feature_map).swapaxes(-1, -2)
    expected = scores @ v
    if normalize:
        expected = expected / (scores.sum(axis=-1, keepdims=True) + la.EPS)
    out, _ = la.forward(q, k, v, causal=False, feature_map=feature_map, scale=scale, normalize=normalize)
    assert_close(out, expected, 1e-10)


@given(B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 70), Dk=st.integers(1, 4), Dv=st.integers(1, 3),
       chunk_size=st.integers(1, 24), feature_map=st.sampled_from(FEATURE_MAPS), normalize=st.booleans(),
       decay=st.sampled_from(DECAYS), with_state=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_causal_modes_agree(B, H, T, Dk, Dv, chunk_size, feature_map, normalize, decay, with_state, seed):
    """parallel == recurrent == chunked: output, final state and every gradient (chunk_size may or may
    not divide T, and may exceed it)."""
    rng = np.random.default_rng(seed)
    q, k, v = make_inputs(rng, B, H, T, Dk, Dv, feature_map, normalize)
    g = make_log_decay(rng, decay, B, H, T)
    state = make_initial_state(rng, feature_map, normalize, B, H, Dk, Dv) if with_state else None
    dout = rng.standard_normal(v.shape)
    options = dict(chunk_size=chunk_size, feature_map=feature_map, normalize=normalize, log_decay=g,
                   initial_state=state)
    ref_out, ref_state, ref_grads = run(q, k, v, dout, mode="recurrent", **options)
    for mode in ("parallel", "chunked"):
        out, state_out, grads = run(q, k, v, dout, mode=mode, **options)
        assert_close(out, ref_out, 1e-10, f"{mode} out")
        for a, b in zip(as_list(state_out), as_list(ref_state)):
            assert_close(a, b, 1e-10, f"{mode} final state")
        assert len(grads) == len(ref_grads)
        for name, a, b in zip(("dq", "dk", "dv", "dlog_decay"), grads, ref_grads):
            assert_close(a, b, 1e-9, f"{mode} {name}")


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 28, 64])
def test_chunked_equals_recurrent_for_dividing_and_ragged_chunks(chunk_size):
    rng = np.random.default_rng(6)
    q, k, v = make_inputs(rng, 2, 2, 28, 3, 2, "elu1", True)
    g = make_log_decay(rng, "gate", 2, 2, 28)
    dout = rng.standard_normal(v.shape)
    options = dict(feature_map="elu1", normalize=True, log_decay=g)
    ref = run(q, k, v, dout, mode="recurrent", **options)
    got = run(q, k, v, dout, mode="chunked", chunk_size=chunk_size, **options)
    assert_close(got[0], ref[0], 1e-10)
    for a, b in zip(got[2], ref[2]):
        assert_close(a, b, 1e-9)


@given(T=st.integers(2, 40), split=st.floats(0.0, 1.0), mode=st.sampled_from(MODES),
       first_mode=st.sampled_from(MODES), feature_map=st.sampled_from(FEATURE_MAPS), normalize=st.booleans(),
       decay=st.sampled_from(DECAYS), chunk_size=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_split_and_carry_state_equals_one_pass(T, split, mode, first_mode, feature_map, normalize, decay,
                                               chunk_size, seed):
    """Run [0, t) then [t, T) from the carried state (a prompt in one mode, the rest in another) ==
    one pass over [0, T)."""
    rng = np.random.default_rng(seed)
    B, H, Dk, Dv = 2, 2, 3, 2
    q, k, v = make_inputs(rng, B, H, T, Dk, Dv, feature_map, normalize)
    g = make_log_decay(rng, decay, B, H, T)
    t = min(T - 1, max(1, int(split * T)))
    options = dict(chunk_size=chunk_size, feature_map=feature_map, normalize=normalize, return_state=True)

    def decay_for(sl):
        """A per-head decay applies to every piece; a per-token gate is cut with the tokens."""
        return g if g is None or g.ndim == 1 else g[:, :, sl]

    (full, full_state), _ = la.forward(q, k, v, mode=mode, log_decay=g, **options)
    head, tail = slice(0, t), slice(t, T)
    (out1, state1), _ = la.forward(q[:, :, head], k[:, :, head], v[:, :, head], mode=first_mode,
                                   log_decay=decay_for(head), **options)
    (out2, state2), _ = la.forward(q[:, :, tail], k[:, :, tail], v[:, :, tail], mode=mode,
                                   initial_state=state1, log_decay=decay_for(tail), **options)
    assert_close(np.concatenate([out1, out2], axis=2), full, 1e-10)
    for a, b in zip(as_list(state2), as_list(full_state)):
        assert_close(a, b, 1e-10)


# float32 inputs are computed in float32 throughout. Relative to the largest magnitude of the float64
# result, outputs and states agree within 1e-5 and gradients within 3e-4 (T <= 70; in 1500 random
# draws the worst seen was 1.4e-6 for outputs and 3.1e-5 for dlog_decay, the reverse cumulative sum
# being the least precise quantity).
FLOAT32_OUT_TOL = 1e-5
FLOAT32_GRAD_TOL = 3e-4


@given(T=st.integers(1, 70), mode=st.sampled_from(MODES), causal=st.booleans(),
       feature_map=st.sampled_from(FEATURE_MAPS), normalize=st.booleans(), decay=st.sampled_from(DECAYS),
       chunk_size=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_float32_agrees_with_float64(T, mode, causal, feature_map, normalize, decay, chunk_size, seed):
    rng = np.random.default_rng(seed)
    B, H, Dk, Dv = 1, 2, 3, 2
    q, k, v = make_inputs(rng, B, H, T, Dk, Dv, feature_map, normalize)
    g = make_log_decay(rng, decay, B, H, T) if causal else None
    dout = rng.standard_normal(v.shape)
    options = dict(mode=mode, causal=causal, chunk_size=chunk_size, feature_map=feature_map, normalize=normalize)

    def as32(x):
        return None if x is None else x.astype(np.float32)

    out64, state64, grads64 = run(q, k, v, dout, log_decay=g, **options)
    out32, state32, grads32 = run(as32(q), as32(k), as32(v), as32(dout), log_decay=as32(g), **options)
    assert out32.dtype == np.float32 and all(grad.dtype == np.float32 for grad in grads32)
    assert_close(out32, out64, FLOAT32_OUT_TOL, "out")
    if causal:
        for a, b in zip(as_list(state32), as_list(state64)):
            assert a.dtype == np.float32
            assert_close(a, b, FLOAT32_OUT_TOL, "state")
    for name, a, b in zip(("dq", "dk", "dv", "dlog_decay"), grads32, grads64):
        assert_close(a, b, FLOAT32_GRAD_TOL, name)


# ----------------------------------------------------------------------------------------------
# stability

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", MODES)
def test_normalize_near_zero_denominator_stays_finite(mode, dtype):
    """elu1 of very negative inputs is exp(x) ≈ 0 (exactly 0 in float32 below about −104): the
    denominator falls to EPS, and output and gradients must stay finite."""
    rng = np.random.default_rng(7)
    q = -rng.uniform(60, 120, (1, 2, 9, 3)).astype(dtype)
    k = -rng.uniform(60, 120, (1, 2, 9, 3)).astype(dtype)
    v = rng.standard_normal((1, 2, 9, 2)).astype(dtype)
    for causal in (True, False):
        out, cache = la.forward(q, k, v, causal=causal, mode=mode, chunk_size=4, feature_map="elu1", normalize=True)
        grads = la.backward(np.ones_like(out), cache)
        assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(grad)) for grad in grads)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_strong_decay_stays_finite_and_forgets(mode, normalize):
    """log_decay = −50 (exp ≈ 2e-22): every step forgets the past; no overflow anywhere (the chunked
    form would hit exp(+50·C) if it divided by cumulative decays)."""
    rng = np.random.default_rng(8)
    B, H, T = 1, 2, 40
    q, k, v = make_inputs(rng, B, H, T, 3, 2, "elu1", normalize)
    for g in (np.full((H,), -50.0), np.full((B, H, T), -50.0)):
        out, cache = la.forward(q, k, v, mode=mode, chunk_size=16, feature_map="elu1", normalize=normalize,
                                log_decay=g)
        grads = la.backward(np.ones_like(out), cache)
        assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(grad)) for grad in grads)
        phi_q, phi_k = la.apply_feature_map(q, "elu1"), la.apply_feature_map(k, "elu1")
        only_current = np.sum(phi_q * phi_k, axis=-1, keepdims=True)
        expected = v * only_current / (only_current + la.EPS) if normalize else v * only_current
        assert_close(out, expected, 1e-12)


# ----------------------------------------------------------------------------------------------
# bad input: one test per case, each asserting the exception type and the argument named

def good_inputs(dtype=np.float64):
    rng = np.random.default_rng(9)
    q, k, v = make_inputs(rng, 1, 2, 5, 3, 2)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def test_rejects_wrong_rank():
    q, k, v = good_inputs()
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        la.forward(q[0], k, v)
    with pytest.raises(ValueError, match="v must have 4 dimensions"):
        la.forward(q, k, v[0])


def test_rejects_mismatched_batch_heads_time():
    q, k, v = good_inputs()
    with pytest.raises(ValueError, match="k must have shape"):
        la.forward(q, np.concatenate([k, k], axis=0), v)          # B
    with pytest.raises(ValueError, match="v must have shape"):
        la.forward(q, k, np.concatenate([v, v], axis=1))          # H
    with pytest.raises(ValueError, match="k must have shape"):
        la.forward(q, k[:, :, :3], v)                             # T


def test_rejects_key_dim_mismatch():
    q, k, v = good_inputs()
    with pytest.raises(ValueError, match="k must have shape"):
        la.forward(q, k[..., :2], v)


def test_rejects_int_and_float16_dtypes():
    q, k, v = good_inputs()
    with pytest.raises(TypeError, match="q must have dtype float32 or float64"):
        la.forward(q.astype(np.int64), k, v)
    with pytest.raises(TypeError, match="k must have dtype float32 or float64"):
        la.forward(q, k.astype(np.float16), v)


def test_rejects_mixed_dtypes():
    q, k, v = good_inputs()
    with pytest.raises(TypeError, match="v must have the same dtype as q"):
        la.forward(q, k, v.astype(np.float32))
    with pytest.raises(TypeError, match="log_decay must have the same dtype as q"):
        la.forward(q, k, v, log_decay=np.full(2, -0.1, dtype=np.float32))


def test_rejects_nan_and_inf():
    q, k, v = good_inputs()
    bad = q.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="q contains NaN or Inf"):
        la.forward(bad, k, v)
    bad = v.copy()
    bad[0, 1, 2, 1] = np.inf
    with pytest.raises(ValueError, match="v contains NaN or Inf"):
        la.forward(q, k, bad)
    with pytest.raises(ValueError, match="log_decay contains NaN or Inf"):
        la.forward(q, k, v, log_decay=np.array([-0.1, -np.inf]))


def test_rejects_empty_time():
    q, k, v = good_inputs()
    with pytest.raises(ValueError, match="q must have at least one time step"):
        la.forward(q[:, :, :0], k[:, :, :0], v[:, :, :0])


def test_rejects_unknown_mode():
    q, k, v = good_inputs()
    with pytest.raises(ValueError, match="mode must be one of"):
        la.forward(q, k, v, mode="fused")


def test_rejects_unknown_feature_map():
    q, k, v = good_inputs()
    with pytest.raises(ValueError, match="feature_map must be one of"):
        la.forward(q, k, v, feature_map="softmax")


def test_rejects_nonpositive_chunk_size():
    q, k, v = good_inputs()
    for bad in (0, -4):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            la.forward(q, k, v, chunk_size=bad)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        la.forward(q, k, v, chunk_size=2.0)


def test_rejects_positive_log_decay():
    q, k, v = good_inputs()
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        la.forward(q, k, v, log_decay=np.array([-0.1, 0.2]))


def test_rejects_wrong_log_decay_shape():
    q, k, v = good_inputs()
    for shape in ((3,), (1, 2), (1, 2, 4), (2, 2, 5)):
        with pytest.raises(ValueError, match="log_decay must have shape"):
            la.forward(q, k, v, log_decay=np.full(shape, -0.1))


def test_rejects_bad_initial_state_shape():
    q, k, v = good_inputs()
    with pytest.raises(ValueError, match=r"initial_state must have shape \(1, 2, 3, 2\)"):
        la.forward(q, k, v, initial_state=np.zeros((1, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(1, 2, 13, 2\)"):
        la.forward(q, k, v, feature_map="taylor2", initial_state=np.zeros((1, 2, 3, 2)))
    with pytest.raises(ValueError, match=r"initial_state\[1\] must have shape"):
        la.forward(q, k, v, normalize=True, initial_state=(np.zeros((1, 2, 3, 2)), np.zeros((1, 2, 2))))
    with pytest.raises(TypeError, match=r"initial_state must be a tuple \(S, z\)"):
        la.forward(q, k, v, normalize=True, initial_state=np.zeros((1, 2, 3, 2)))
    with pytest.raises(TypeError, match="initial_state must be an ndarray S"):
        la.forward(q, k, v, initial_state=(np.zeros((1, 2, 3, 2)), np.zeros((1, 2, 3))))


def test_rejects_order_dependent_options_when_noncausal():
    q, k, v = good_inputs()
    with pytest.raises(ValueError, match="log_decay must be None when causal=False"):
        la.forward(q, k, v, causal=False, log_decay=np.full(2, -0.1))
    with pytest.raises(ValueError, match="initial_state must be None when causal=False"):
        la.forward(q, k, v, causal=False, initial_state=np.zeros((1, 2, 3, 2)))
    with pytest.raises(ValueError, match="return_state must be False when causal=False"):
        la.forward(q, k, v, causal=False, return_state=True)


def test_backend_that_cannot_run_the_options_is_reported():
    q, k, v = good_inputs()
    with pytest.raises(BackendUnavailable, match="backend='numba'.*mode='parallel'"):
        la.forward(q, k, v, mode="parallel", backend="numba")
    with pytest.raises(BackendUnavailable, match="backend='numba'.*taylor2"):
        la.forward(q, k, v, feature_map="taylor2", backend="numba")
    with pytest.raises(ValueError, match="backend must be one of"):
        la.forward(q, k, v, backend="gpu")


def test_backward_rejects_bad_dout():
    q, k, v = good_inputs()
    out, cache = la.forward(q, k, v)
    with pytest.raises(ValueError, match="dout must have shape"):
        la.backward(out[..., :1], cache)
    with pytest.raises(TypeError, match="dout must have the same dtype as q"):
        la.backward(out.astype(np.float32), cache)
