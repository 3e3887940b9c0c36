"""The stability experiment: the linear_norm option of L/G layers (gradients, decoding, config) and
the experiment's pieces end to end at toy sizes."""
import math
import os

import numpy as np
import pytest

from minilm import LM, LMConfig
from minilm.experiments import stability
from minilm.testing import rel_error

NORMS = ["rmsnorm", "denominator", "both", "none"]
VOCAB = 11


def tiny(schedule, linear_norm, **overrides):
    options = dict(vocab_size=VOCAB, d_model=8, schedule=schedule, n_heads=2, mlp_ratio=2, chunk_size=3,
                   dtype="float64", linear_norm=linear_norm)
    options.update(overrides)
    return LMConfig(**options)


def tokens(B, T, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(B, T))


def gradient_errors(model, x, entries=8, h=1e-4, seed=0):
    """{name: rel_error} of model.grads against 4th-order centred differences of sum(logits * R),
    on the largest-gradient entries and a few random ones of every tensor."""
    rng = np.random.default_rng(seed)
    logits, cache = model.forward(x)
    weights = rng.standard_normal(logits.shape)
    model.backward(weights, cache)

    def loss():
        return float(np.sum(model.forward(x)[0] * weights))

    errors = {}
    for name, value in model.params.items():
        flat = value.reshape(-1)
        analytic = model.grads[name].reshape(-1)
        picks = np.unique(np.concatenate([np.argsort(-np.abs(analytic))[:entries // 2],
                                          rng.choice(flat.size, min(flat.size, entries // 2), replace=False)]))
        numeric = []
        for i in picks:
            old = flat[i]
            f = {}
            for k in (-2, -1, 1, 2):
                flat[i] = old + k * h
                f[k] = loss()
            flat[i] = old
            numeric.append((8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h))
        errors[name] = rel_error(analytic[picks], np.array(numeric))
    return errors


@pytest.mark.parametrize("linear_norm", NORMS)
@pytest.mark.parametrize("schedule", ["L", "G"])
def test_linear_norm_gradients_match_finite_differences(schedule, linear_norm):
    model = LM(tiny(schedule, linear_norm, short_conv=2), seed=1)
    errors = gradient_errors(model, tokens(2, 7))
    assert set(errors) == set(model.params)
    bad = {name: err for name, err in errors.items() if not err <= 1e-6}
    assert not bad, bad


@pytest.mark.parametrize("linear_norm", NORMS)
@pytest.mark.parametrize("schedule", ["LA", "GA"])
def test_linear_norm_steps_like_its_forward_and_prefill(schedule, linear_norm):
    model = LM(tiny(schedule, linear_norm), seed=2)
    x = tokens(2, 8, seed=3)
    logits, _ = model.forward(x)
    state = model.init_state(2)
    for t in range(8):
        step_logits, state = model.step(x[:, t], state)
        np.testing.assert_allclose(step_logits, logits[:, t], rtol=1e-10, atol=1e-12)
    _, state = model.prefill(x[:, :5])
    for t in range(5, 8):
        step_logits, state = model.step(x[:, t], state)
    np.testing.assert_allclose(step_logits, logits[:, -1], rtol=1e-10, atol=1e-12)


def test_linear_norm_parameters_state_and_default():
    assert LMConfig().linear_norm == "rmsnorm"
    for norm, has_gain, has_z in [("rmsnorm", True, False), ("denominator", False, True),
                                  ("both", True, True), ("none", False, False)]:
        model = LM(tiny("L", norm), seed=0)
        assert ("layers.0.mixer.out_norm.weight" in model.params) == has_gain, norm
        assert ("z" in model.init_state(1)["layers"][0]["mixer"]) == has_z, norm


def test_bad_linear_norm_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="linear_norm"):
        LMConfig(schedule="L", linear_norm="layernorm")


def test_unnormalized_output_grows_with_position_and_normalized_ones_do_not():
    """The reason for claim 5: phi(q).S sums t outer products, so its scale grows with t (here like
    sqrt(t), the values being random), while both normalizations keep it flat."""
    x = np.random.default_rng(0).standard_normal((1, 256, 8))
    growth = {}
    for norm in ("none", "denominator", "rmsnorm"):
        model = LM(tiny("L", norm, chunk_size=64), seed=0)
        mixer = model.layers[0].branches[0][2]
        p = {name[len("mixer."):]: value for name, value in model.layer_params(0).items()
             if name.startswith("mixer.")}
        y, _ = mixer.forward(p, x)
        growth[norm] = np.abs(y[0, -16:]).mean() / np.abs(y[0, 16:32]).mean()
    assert growth["none"] > 2.5, growth
    assert growth["denominator"] < 1.5 and growth["rmsnorm"] < 1.5, growth


def test_both_equals_rmsnorm_up_to_the_norm_epsilon():
    """The denominator is one positive number per head and token, and RMSNorm over the head
    dimension removes any such factor: RMSNorm(o / s) = o / sqrt(mean(o^2) + eps s^2)."""
    x = tokens(2, 9, seed=4)
    logits = {}
    for norm in ("both", "rmsnorm"):
        for eps in (1e-12, 1e-1):
            logits[norm, eps] = LM(tiny("G", norm, norm_eps=eps), seed=5).forward(x)[0]
    np.testing.assert_allclose(logits["both", 1e-12], logits["rmsnorm", 1e-12], rtol=1e-7, atol=1e-9)
    assert np.max(np.abs(logits["both", 1e-1] - logits["rmsnorm", 1e-1])) > 1e-4   # only eps tells them apart


def test_divergence_is_detected():
    corpus = stability.data.load_corpus(min_tokens=stability.SEQ_LEN + 1)
    model = LM(stability.model_config("linear_none", d_model=16), seed=0)
    for name in ("layers.0.mixer.q_proj.W", "layers.0.mixer.k_proj.W"):
        model.params[name][...] = 1e25                  # phi(q).phi(k) ~ 1e50 overflows float32
    x, y = stability.data.sample_batch(corpus.train, 2, 8, np.random.default_rng(0))
    with pytest.raises(stability.Diverged):
        stability._loss_and_grads(model, x, y)


def test_run_stability_end_to_end_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(stability, "D_MODEL", 16)
    monkeypatch.setattr(stability, "SEQ_LEN", 16)
    monkeypatch.setattr(stability, "BATCH_SIZE", 2)
    monkeypatch.setattr(stability, "EVAL_BATCHES", 1)
    monkeypatch.setattr(stability, "QUICK_MAX_STEPS", 3)
    monkeypatch.setattr(stability, "MIN_STEPS", 2)
    monkeypatch.setattr(stability, "QUICK_LR_GRID", (1e-3, 1e4))
    messages = []
    rows = stability.run_stability(quick=True, out_dir=str(tmp_path), progress=messages.append, budget_s=30,
                                  workers=1)     # workers would not see the patched constants
    assert len(rows) == len(stability.QUICK_VARIANTS) * 2
    for row in rows:
        for key in ("variant", "lr", "final_loss", "diverged", "max_grad_norm"):
            assert key in row
        assert isinstance(row["diverged"], bool)
        assert row["diverged"] == (row["final_loss"] is None)
        if not row["diverged"]:
            assert math.isfinite(row["final_loss"]) and 1 <= row["steps"] <= 3
        assert len(row["loss_curve"]) == len(row["curve_steps"]) <= row["steps"] + 1
    assert {row["variant"] for row in rows} == set(stability.QUICK_VARIANTS)
    assert len(messages) == len(rows) + 1
    assert os.path.getsize(tmp_path / "stability_curves.png") > 1000
    summary = stability.summarize(rows)
    assert set(summary) == set(stability.QUICK_VARIANTS)
