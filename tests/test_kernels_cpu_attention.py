"""Numba CPU kernels for softmax attention and linear attention, against the NumPy reference ops.

Every kernel output (out, final state, every gradient, decode steps) is compared with the reference
run in float64 on the same inputs, on hypothesis-drawn shapes that include T = 1, T not a multiple
of the chunk or tile (small chunk / tile overrides), and B or H of 1.

Error metric (scale-aware): max|kernel − reference| / max(max|reference|, 1). The inputs are unit
normal, so entries of order 1 are the natural scale; the floor at 1 keeps a gradient that is exactly
zero in exact arithmetic (e.g. dq when a query sees a single key) from being judged relatively.
Tolerances: 1e-5 for float32 kernels, 1e-10 for float64.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minilm.kernels.cpu import attention as kernel_attention
from minilm.kernels.cpu import linear_attention as kernel_linear
from minilm.ops import attention as attention_op
from minilm.ops import linear_attention as linear_attention_op
from minilm.testing import numpy_reference

ref_attention = numpy_reference(attention_op)
ref_linear = numpy_reference(linear_attention_op)

TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}
SEEDS = st.integers(0, 2**32 - 1)
DTYPES = st.sampled_from([np.float32, np.float64])


def scaled_error(actual, reference):
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    return float(np.max(np.abs(actual - reference), initial=0.0) / max(np.max(np.abs(reference), initial=0.0), 1.0))


def assert_close(actual, reference, dtype, what):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    error = scaled_error(actual, reference)
    assert error <= TOLERANCE[np.dtype(dtype)], f"{what}: scaled error {error:.3g}"


def cast(x, dtype):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(cast(part, dtype) for part in x)
    return x.astype(dtype)


# ----------------------------------------------------------------------------------------------
# linear attention

@st.composite
def linear_cases(draw):
    feature_map = draw(st.sampled_from(["identity", "elu1", "relu"]))
    return dict(
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 3)), T=draw(st.integers(1, 19)),
        Dk=draw(st.integers(1, 4)), Dv=draw(st.integers(1, 4)), chunk_size=draw(st.integers(1, 8)),
        feature_map=feature_map,
        normalize=feature_map == "elu1" and draw(st.booleans()),   # needs a positive feature map
        decay=draw(st.sampled_from([None, "head", "token"])),
        with_state=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.5])),
        dtype=draw(DTYPES), seed=draw(SEEDS))


def make_linear_inputs(case):
    rng = np.random.default_rng(case["seed"])
    B, H, T, Dk, Dv = (case[name] for name in ("B", "H", "T", "Dk", "Dv"))
    q = rng.standard_normal((B, H, T, Dk))
    k = rng.standard_normal((B, H, T, Dk))
    v = rng.standard_normal((B, H, T, Dv))
    log_decay = None
    if case["decay"] is not None:
        shape = (H,) if case["decay"] == "head" else (B, H, T)
        log_decay = -rng.uniform(0.0, 1.0, shape)
    state = None
    if case["with_state"]:
        S = rng.standard_normal((B, H, Dk, Dv))
        state = (S, rng.uniform(0.5, 1.5, (B, H, Dk))) if case["normalize"] else S
    dout = rng.standard_normal((B, H, T, Dv))
    return q, k, v, log_decay, state, dout


@given(case=linear_cases())
def test_linear_attention_matches_reference(case):
    q, k, v, log_decay, state, dout = make_linear_inputs(case)
    options = dict(feature_map=case["feature_map"], scale=case["scale"], normalize=case["normalize"],
                   return_state=True)
    (ref_out, ref_state), ref_cache = ref_linear.forward(q, k, v, mode="recurrent", log_decay=log_decay,
                                                        initial_state=state, **options)
    ref_grads = ref_linear.backward(dout, ref_cache)

    dtype = case["dtype"]
    (out, final_state), cache = kernel_linear.forward(
        cast(q, dtype), cast(k, dtype), cast(v, dtype), chunk_size=case["chunk_size"],
        log_decay=cast(log_decay, dtype), initial_state=cast(state, dtype), **options)
    grads = kernel_linear.backward(cast(dout, dtype), cache)

    assert_close(out, ref_out, dtype, "out")
    if case["normalize"]:
        assert_close(final_state[0], ref_state[0], dtype, "final S")
        assert_close(final_state[1], ref_state[1], dtype, "final z")
    else:
        assert_close(final_state, ref_state, dtype, "final S")
    assert len(grads) == len(ref_grads) == (3 if log_decay is None else 4)
    for name, grad, ref_grad in zip(("dq", "dk", "dv", "dlog_decay"), grads, ref_grads):
        assert_close(grad, ref_grad, dtype, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_attention_default_chunk_long_sequence(dtype):
    """T = 150 with the default chunk (64): two full chunks and a ragged one; decay per token."""
    case = dict(B=1, H=2, T=150, Dk=8, Dv=6, decay="token", with_state=True, normalize=False, seed=3)
    q, k, v, log_decay, state, dout = make_linear_inputs(case)
    (ref_out, ref_state), ref_cache = ref_linear.forward(q, k, v, log_decay=log_decay, initial_state=state,
                                                        return_state=True)
    ref_grads = ref_linear.backward(dout, ref_cache)
    (out, final_state), cache = kernel_linear.forward(cast(q, dtype), cast(k, dtype), cast(v, dtype),
                                                      log_decay=cast(log_decay, dtype),
                                                      initial_state=cast(state, dtype), return_state=True)
    assert_close(out, ref_out, dtype, "out")
    assert_close(final_state, ref_state, dtype, "final S")
    for grad, ref_grad in zip(kernel_linear.backward(cast(dout, dtype), cache), ref_grads):
        assert_close(grad, ref_grad, dtype, "grad")


def test_linear_attention_without_return_state_and_noncontiguous_inputs():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 7, 3, 4)).transpose(0, 2, 1, 3) for _ in range(3))  # (B, H, T, D) views
    out, cache = kernel_linear.forward(q, k, v, chunk_size=3)
    ref_out, _ = ref_linear.forward(q, k, v)
    assert isinstance(out, np.ndarray)
    assert scaled_error(out, ref_out) <= 1e-10


def test_linear_attention_supports():
    assert kernel_linear.available()[0]
    assert kernel_linear.supports(causal=True, feature_map="elu1", normalize=True)[0]
    ok, reason = kernel_linear.supports(feature_map="taylor2")
    assert not ok and "taylor2" in reason
    ok, reason = kernel_linear.supports(causal=False)
    assert not ok and "causal" in reason


@given(B=st.integers(1, 2), H=st.integers(1, 3), Dk=st.integers(1, 4), Dv=st.integers(1, 4),
       feature_map=st.sampled_from(["identity", "elu1", "relu"]), normalize=st.booleans(),
       decay=st.sampled_from([None, "head", "token"]), dtype=DTYPES, seed=SEEDS)
def test_linear_attention_step_matches_recurrent_reference(B, H, Dk, Dv, feature_map, normalize, decay, dtype,
                                                           seed):
    normalize = normalize and feature_map == "elu1"
    case = dict(B=B, H=H, T=1, Dk=Dk, Dv=Dv, decay=decay, with_state=True, normalize=normalize, seed=seed)
    q, k, v, log_decay, state, _ = make_linear_inputs(case)
    (ref_out, ref_state), _ = ref_linear.forward(q, k, v, mode="recurrent", feature_map=feature_map, scale=0.7,
                                                 normalize=normalize, log_decay=log_decay, initial_state=state,
                                                 return_state=True)
    log_decay_t = None if log_decay is None else (log_decay if log_decay.ndim == 1 else log_decay[:, :, 0])
    out_t, new_state = kernel_linear.linear_attention_step(
        cast(q[:, :, 0], dtype), cast(k[:, :, 0], dtype), cast(v[:, :, 0], dtype), cast(state, dtype),
        feature_map, 0.7, normalize, cast(log_decay_t, dtype))
    assert_close(out_t, ref_out[:, :, 0], dtype, "out_t")
    if normalize:
        assert_close(new_state[0], ref_state[0], dtype, "S")
        assert_close(new_state[1], ref_state[1], dtype, "z")
    else:
        assert_close(new_state, ref_state, dtype, "S")


def test_linear_attention_steps_continue_a_chunked_prefill():
    """Prefill 9 tokens with the chunked kernel, then decode 4 with steps == one pass over 13 tokens."""
    case = dict(B=2, H=2, T=13, Dk=3, Dv=4, decay="token", with_state=False, normalize=True, seed=5)
    q, k, v, log_decay, _, _ = make_linear_inputs(case)
    options = dict(feature_map="elu1", normalize=True)
    (out_all, state_all), _ = kernel_linear.forward(q, k, v, chunk_size=4, log_decay=log_decay,
                                                    return_state=True, **options)
    (out_prefix, state), _ = kernel_linear.forward(q[:, :, :9], k[:, :, :9], v[:, :, :9], chunk_size=4,
                                                   log_decay=log_decay[:, :, :9], return_state=True, **options)
    assert scaled_error(out_prefix, out_all[:, :, :9]) <= 1e-12
    for t in range(9, 13):
        out_t, state = kernel_linear.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state,
                                                           log_decay_t=log_decay[:, :, t], **options)
        assert scaled_error(out_t, out_all[:, :, t]) <= 1e-12
    assert scaled_error(state[0], state_all[0]) <= 1e-12
    assert scaled_error(state[1], state_all[1]) <= 1e-12


# ----------------------------------------------------------------------------------------------
# softmax attention

@st.composite
def attention_cases(draw):
    causal = draw(st.booleans())
    Tk = draw(st.integers(1, 17))
    Tq = draw(st.integers(1, Tk)) if causal else draw(st.integers(1, 17))
    return dict(
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)), Tq=Tq, Tk=Tk,
        Dk=draw(st.integers(1, 5)), Dv=draw(st.integers(1, 5)), causal=causal,
        block_q=draw(st.integers(1, 6)), block_k=draw(st.integers(1, 6)),
        scale=draw(st.sampled_from([None, 0.3, 2.0])), dtype=draw(DTYPES), seed=draw(SEEDS))


def make_attention_inputs(B, H, Tq, Tk, Dk, Dv, seed, logit_std=1.0):
    rng = np.random.default_rng(seed)
    q = logit_std * rng.standard_normal((B, H, Tq, Dk))
    k = rng.standard_normal((B, H, Tk, Dk))
    v = rng.standard_normal((B, H, Tk, Dv))
    dout = rng.standard_normal((B, H, Tq, Dv))
    return q, k, v, dout


def check_attention(q, k, v, dout, causal, scale, dtype, **tiles):
    ref_out, ref_cache = ref_attention.forward(q, k, v, causal=causal, scale=scale)
    ref_grads = ref_attention.backward(dout, ref_cache)
    out, cache = kernel_attention.forward(cast(q, dtype), cast(k, dtype), cast(v, dtype), causal=causal,
                                          scale=scale, **tiles)
    grads = kernel_attention.backward(cast(dout, dtype), cache)
    assert_close(out, ref_out, dtype, "out")
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(grad, ref_grad, dtype, name)


@given(case=attention_cases())
def test_attention_matches_reference(case):
    q, k, v, dout = make_attention_inputs(*(case[n] for n in ("B", "H", "Tq", "Tk", "Dk", "Dv", "seed")))
    check_attention(q, k, v, dout, case["causal"], case["scale"], case["dtype"],
                    block_q=case["block_q"], block_k=case["block_k"])


@pytest.mark.parametrize("Tq, Tk, causal", [(130, 130, True), (70, 200, True), (100, 150, False)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_default_tiles(Tq, Tk, causal, dtype):
    """Several 64-row tiles, ragged last tiles, the causal diagonal crossing tile boundaries."""
    q, k, v, dout = make_attention_inputs(1, 2, Tq, Tk, 8, 5, seed=Tq + Tk)
    check_attention(q, k, v, dout, causal, None, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_large_logits_are_stable(dtype):
    """Logits of order ±300 overflow a naive exp; the online softmax's running max keeps them finite."""
    q, k, v, dout = make_attention_inputs(1, 2, 20, 20, 4, 3, seed=1, logit_std=150.0)
    check_attention(q, k, v, dout, True, None, dtype, block_q=8, block_k=8)


def test_attention_backward_key_groups_cover_all_tiles(monkeypatch):
    """With more threads than heads the key tiles are split into groups; the sum must be unchanged."""
    monkeypatch.setattr(kernel_attention, "_n_key_groups", lambda B, H, n_tiles: min(3, n_tiles))
    q, k, v, dout = make_attention_inputs(1, 1, 11, 11, 3, 2, seed=2)
    check_attention(q, k, v, dout, True, None, np.float64, block_q=2, block_k=2)


@given(B=st.integers(1, 2), H=st.integers(1, 3), Tmax=st.integers(1, 12), Dk=st.integers(1, 5),
       Dv=st.integers(1, 5), data=st.data(), dtype=DTYPES, seed=SEEDS)
def test_attention_decode_matches_reference(B, H, Tmax, Dk, Dv, data, dtype, seed):
    length = data.draw(st.integers(1, Tmax))
    rng = np.random.default_rng(seed)
    q_t = rng.standard_normal((B, H, Dk))
    k_cache = rng.standard_normal((B, H, Tmax, Dk))
    v_cache = rng.standard_normal((B, H, Tmax, Dv))
    ref_out, _ = ref_attention.forward(q_t[:, :, None], k_cache[:, :, :length], v_cache[:, :, :length], causal=True)
    out_t = kernel_attention.attention_decode(cast(q_t, dtype), cast(k_cache, dtype), cast(v_cache, dtype), length,
                                              None)
    assert_close(out_t, ref_out[:, :, 0], dtype, "out_t")


def test_attention_decode_rejects_bad_length():
    q_t, k_cache = np.zeros((1, 1, 2)), np.zeros((1, 1, 4, 2))
    for length in (0, 5):
        with pytest.raises(ValueError, match="length"):
            kernel_attention.attention_decode(q_t, k_cache, k_cache, length)


def test_attention_supports_every_option():
    assert kernel_attention.available()[0]
    assert kernel_attention.supports(causal=False, scale=0.5)[0]
