"""AdamW, gradient clipping and the learning-rate schedule (minilm.optim)."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilm import LM, LMConfig
from minilm.optim import AdamW, clip_grad_norm, decays, global_norm, lr_at


def hand_adamw(p, g_list, lr, b1, b2, eps, wd):
    """AdamW written out element by element with Python floats (the reference for the test)."""
    p = [float(x) for x in p]
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, g in enumerate(g_list, start=1):
        for i in range(len(p)):
            p[i] = p[i] - lr * wd * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat = m[i] / (1 - b1 ** t)
            v_hat = v[i] / (1 - b2 ** t)
            p[i] = p[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
    return np.array(p)


def test_adamw_matches_hand_computed_steps():
    rng = np.random.default_rng(0)
    params = {"layers.0.mixer.in_proj.W": rng.standard_normal((3, 2)),    # decayed
              "layers.0.norm1.weight": rng.standard_normal(4),            # not decayed
              "embed.weight": rng.standard_normal((5, 2))}                # not decayed by default
    start = {name: value.copy() for name, value in params.items()}
    grads_per_step = [{name: rng.standard_normal(value.shape) for name, value in params.items()} for _ in range(3)]
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.95, 1e-8, 0.1
    opt = AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for grads in grads_per_step:
        opt.step(params, grads)
    assert opt.t == 3
    for name in params:
        decay = wd if name.endswith(".W") else 0.0
        expected = hand_adamw(start[name].ravel(), [g[name].ravel() for g in grads_per_step], lr, b1, b2, eps, decay)
        np.testing.assert_allclose(params[name].ravel(), expected, rtol=1e-12, atol=1e-15)


def test_adamw_first_step_by_hand():
    """One step from zero moments: m^ = g, v^ = g^2, so p <- p (1 - lr wd) - lr g / (|g| + eps)."""
    p = {"fc1.W": np.array([[1.0, -2.0]])}
    g = {"fc1.W": np.array([[0.5, -4.0]])}
    AdamW(p, lr=0.1, weight_decay=0.5, eps=1e-8).step(p, g)
    expected = np.array([[1.0 * 0.95 - 0.1 * 0.5 / (0.5 + 1e-8), -2.0 * 0.95 + 0.1 * 4.0 / (4.0 + 1e-8)]])
    np.testing.assert_allclose(p["fc1.W"], expected, rtol=1e-14)


def test_adamw_lr_argument_overrides_and_updates_in_place():
    p = {"fc1.W": np.ones((2, 2), dtype=np.float32)}
    array = p["fc1.W"]
    opt = AdamW(p, lr=1.0, weight_decay=0.0)
    opt.step(p, {"fc1.W": np.ones((2, 2), dtype=np.float32)}, lr=0.25)
    assert p["fc1.W"] is array and array.dtype == np.float32
    np.testing.assert_allclose(array, 0.75, rtol=1e-6)
    assert opt.m["fc1.W"].dtype == np.float32


@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 4)), seed=st.integers(0, 2**31 - 1),
       lr=st.floats(1e-4, 1e-1))
def test_adamw_first_step_moves_each_entry_by_about_lr(shape, seed, lr):
    rng = np.random.default_rng(seed)
    g = np.where(rng.random(shape) < 0.5, -1.0, 1.0) * (0.1 + np.abs(rng.standard_normal(shape)))  # |g| >= 0.1
    p = {"b": np.zeros(shape)}
    AdamW(p, lr=lr, weight_decay=0.3).step(p, {"b": g})                          # "b" is never decayed
    np.testing.assert_allclose(p["b"], -lr * np.sign(g), rtol=1e-6)


def test_adamw_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(1)
    params = {"a.W": rng.standard_normal((3, 3)), "a.b": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(4)]
    p1 = {k: v.copy() for k, v in params.items()}
    o1 = AdamW(p1, lr=0.01)
    for g in grads:
        o1.step(p1, g)
    p2 = {k: v.copy() for k, v in params.items()}
    o2 = AdamW(p2, lr=0.01)
    for g in grads[:2]:
        o2.step(p2, g)
    o3 = AdamW(p2, lr=0.01)
    o3.load_state_dict(o2.state_dict())
    for g in grads[2:]:
        o3.step(p2, g)
    for k in params:
        assert np.array_equal(p1[k], p2[k])


def test_adamw_rejects_mismatched_state_and_grads():
    opt = AdamW({"a.W": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="does not match"):
        opt.load_state_dict({"t": 1, "m": {"b.W": np.zeros((2, 2))}, "v": {"b.W": np.zeros((2, 2))}})
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict({"t": 1, "m": {"a.W": np.zeros((3, 2))}, "v": {"a.W": np.zeros((3, 2))}})
    with pytest.raises(ValueError, match="missing gradients"):
        opt.step({"a.W": np.zeros((2, 2))}, {})
    with pytest.raises(ValueError, match="lr"):
        AdamW({}, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW({}, betas=(1.0, 0.9))


def test_decay_rule_is_the_models():
    """Only projection matrices decay: not norms, biases, A_log, D, time_* vectors, conv taps, embeddings."""
    cfg = LMConfig(vocab_size=16, d_model=8, schedule="ALGMRS", n_heads=2, d_state=4, short_conv=2)
    model = LM(cfg)
    mask = model.decay_mask()
    assert {name: decays(name) for name in model.params} == mask
    never = [name for name in model.params
             if name.rsplit(".", 1)[-1] in ("weight", "b", "A_log", "D", "w") or ".time_" in name]
    assert never and not any(mask[name] for name in never)
    assert not decays("embed.weight") and decays("embed.weight", decay_embeddings=True)
    assert decays("layers.5.mixer.lstm.Wx") and decays("layers.5.mixer.lstm.Wh")


# ----------------------------------------------------------------------------------------------
# clipping

def test_clip_scales_to_max_norm_and_keeps_direction():
    rng = np.random.default_rng(2)
    grads = {"a": rng.standard_normal((4, 3)), "b": rng.standard_normal(5)}
    before = {k: v.copy() for k, v in grads.items()}
    expected_norm = math.sqrt(sum(np.sum(v ** 2) for v in before.values()))
    norm = clip_grad_norm(grads, max_norm=0.5)
    assert norm == pytest.approx(expected_norm, rel=1e-12)
    assert global_norm(grads) == pytest.approx(0.5, rel=1e-5)
    for k in grads:
        np.testing.assert_allclose(grads[k] * expected_norm / global_norm(grads), before[k], rtol=1e-10)


def test_clip_leaves_small_gradients_and_can_be_disabled():
    grads = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(grads, max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(grads["a"], [0.3, 0.4])
    big = {"a": np.array([30.0, 40.0], dtype=np.float32)}
    assert clip_grad_norm(big, max_norm=0) == pytest.approx(50.0)
    np.testing.assert_array_equal(big["a"], [30.0, 40.0])
    assert big["a"].dtype == np.float32


# ----------------------------------------------------------------------------------------------
# schedule

def test_schedule_values():
    kw = dict(max_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)                 # (0 + 1) / 10
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)                 # warmup ends at the peak
    assert lr_at(10, **kw) == pytest.approx(1.0)                # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx(0.55)               # halfway: (max + min) / 2
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))     # non-increasing after warmup


def test_schedule_without_warmup_starts_at_peak():
    assert lr_at(0, max_lr=2.0, warmup_steps=0, total_steps=4, min_lr=0.0) == pytest.approx(2.0)
    assert lr_at(2, max_lr=2.0, warmup_steps=0, total_steps=4, min_lr=0.0) == pytest.approx(1.0)
