"""The language model of every family and hybrid: gradients, decoding, state sizes, config errors."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilm import LM, LMConfig
from minilm.model import state_bytes
from minilm.testing import rel_error

SCHEDULES = ["A", "L", "G", "M", "R", "S", "MA", "LMA"]
VOCAB = 11


def tiny_config(schedule, dtype="float64", **overrides):
    """vocab 11, d_model 8, 2 heads of 4, Mamba N = 4 (E = 16, R = 1), MLP width 16, chunks of 3.

    Mamba's step sizes start in [0.05, 0.5] instead of [0.001, 0.1]: with the reference's tiny steps
    A_log barely affects a 5-token output (gradients ~1e-6, at the noise floor of finite differences).
    """
    options = dict(vocab_size=VOCAB, d_model=8, schedule=schedule, n_heads=2, d_state=4, mlp_ratio=2,
                   chunk_size=3, dtype=dtype, dt_min=0.05, dt_max=0.5)
    options.update(overrides)
    return LMConfig(**options)


def random_tokens(B, T, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(B, T))


def model_gradient_errors(model, tokens, entries=12, seed=0, h=1e-4):
    """{name: rel_error} of model.grads against finite differences of L = sum(logits * R).

    For each tensor, the entries with the largest analytic gradients plus random ones are checked
    (all of them when the tensor is small), so every tensor is covered at a bounded cost. The
    difference quotient is the fourth-order centred stencil
        (8 (L(+h) - L(-h)) - (L(+2h) - L(-2h))) / 12h,
    accurate enough for both strongly curved tensors (the 0.02-scale embedding) and weakly coupled
    ones (A_log, whose gradient is ~1e-6 at the reference init).
    """
    rng = np.random.default_rng(seed)
    logits, cache = model.forward(tokens)
    weights = rng.standard_normal(logits.shape)
    model.backward(weights.astype(logits.dtype), cache)

    def loss():
        return float(np.sum(model.forward(tokens)[0] * weights))

    errors = {}
    for name, value in model.params.items():
        flat = value.reshape(-1)                           # a view: perturbs the model's own array
        analytic_all = model.grads[name].reshape(-1)
        if flat.size <= entries:
            picks = np.arange(flat.size)
        else:
            largest = np.argsort(-np.abs(analytic_all))[:entries // 2]
            picks = np.unique(np.concatenate([largest, rng.choice(flat.size, entries - entries // 2, replace=False)]))
        numeric = np.empty(len(picks))
        for j, i in enumerate(picks):
            old = flat[i]
            values = {}
            for k in (-2, -1, 1, 2):
                flat[i] = old + k * h
                values[k] = loss()
            flat[i] = old
            numeric[j] = (8 * (values[1] - values[-1]) - (values[2] - values[-2])) / (12 * h)
        errors[name] = rel_error(analytic_all[picks], numeric)
    return errors


def stepwise_logits(model, tokens, state=None):
    """Logits of token-by-token decoding, (B, T, V)."""
    if state is None:
        state = model.init_state(tokens.shape[0])
    out = []
    for t in range(tokens.shape[1]):
        logits_t, state = model.step(tokens[:, t], state)
        out.append(logits_t)
    return np.stack(out, axis=1), state


# ----------------------------------------------------------------------------------------------
# gradients

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_parameter_gradient_matches_finite_differences(schedule):
    model = LM(tiny_config(schedule), seed=1)
    errors = model_gradient_errors(model, random_tokens(2, 5))
    assert set(errors) == set(model.params)                     # every tensor was checked
    bad = {name: err for name, err in errors.items() if not err <= 1e-6}
    assert not bad, bad


def test_gradients_with_short_conv_and_untied_head():
    model = LM(tiny_config("AGL", short_conv=3, tie_embeddings=False), seed=2)
    # give the conv's history taps non-zero values so their effect is tested, not only their gradient
    rng = np.random.default_rng(5)
    for name in model.params:
        if name.endswith("short_conv.w"):
            model.params[name][:, :-1] = 0.3 * rng.standard_normal(model.params[name][:, :-1].shape)
    errors = model_gradient_errors(model, random_tokens(2, 5, seed=3))
    assert any(name.endswith("short_conv.w") for name in errors) and "head.W" in errors
    bad = {name: err for name, err in errors.items() if not err <= 1e-6}
    assert not bad, bad


def test_backward_overwrites_grads():
    model = LM(tiny_config("MA"), seed=0)
    tokens = random_tokens(2, 4)
    logits, cache = model.forward(tokens)
    dlogits = np.random.default_rng(1).standard_normal(logits.shape)
    ids_before = {name: id(g) for name, g in model.grads.items()}
    first = {name: g.copy() for name, g in model.backward(dlogits, cache).items()}
    model.backward(dlogits, cache)
    for name, g in model.grads.items():
        assert id(g) == ids_before[name]                     # the same arrays, filled in place
        np.testing.assert_array_equal(g, first[name])         # set, not accumulated


def test_float32_end_to_end():
    model = LM(tiny_config("LMARGS", dtype="float32"), seed=0)
    logits, cache = model.forward(random_tokens(2, 6))
    assert logits.dtype == np.float32
    model.backward(np.ones_like(logits), cache)
    for name in model.params:
        assert model.params[name].dtype == np.float32
        assert model.grads[name].dtype == np.float32 and np.all(np.isfinite(model.grads[name])), name


def test_backward_rejects_bad_dlogits():
    model = LM(tiny_config("A"), seed=0)
    logits, cache = model.forward(random_tokens(1, 3))
    with pytest.raises(ValueError, match="dlogits"):
        model.backward(np.ones((1, 2, VOCAB)), cache)
    with pytest.raises(TypeError, match="dlogits"):
        model.backward(np.ones(logits.shape, dtype=np.float32), cache)


# ----------------------------------------------------------------------------------------------
# decoding: step and prefill against the parallel form

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_step_by_step_equals_forward_float64(schedule):
    model = LM(tiny_config(schedule), seed=3)
    tokens = random_tokens(2, 9, seed=1)
    full, _ = model.forward(tokens)
    stepped, _ = stepwise_logits(model, tokens)
    np.testing.assert_allclose(stepped, full, rtol=0, atol=1e-10)


@given(schedule=st.text(alphabet="ALGMRS", min_size=1, max_size=3), T=st.integers(1, 7),
       batch=st.integers(1, 2), short_conv=st.sampled_from([0, 2]), seed=st.integers(0, 2**16))
def test_any_schedule_steps_like_its_forward(schedule, T, batch, short_conv, seed):
    model = LM(tiny_config(schedule, short_conv=short_conv), seed=seed)
    tokens = random_tokens(batch, T, seed=seed)
    full, _ = model.forward(tokens)
    np.testing.assert_allclose(stepwise_logits(model, tokens)[0], full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("schedule", ["A", "L", "G"])
def test_step_equals_forward_with_short_conv(schedule):
    model = LM(tiny_config(schedule, short_conv=4), seed=4)
    rng = np.random.default_rng(0)
    for name in model.params:
        if name.endswith("short_conv.w"):
            model.params[name] += 0.3 * rng.standard_normal(model.params[name].shape)
    tokens = random_tokens(2, 8, seed=2)
    full, _ = model.forward(tokens)
    np.testing.assert_allclose(stepwise_logits(model, tokens)[0], full, rtol=0, atol=1e-10)


FLOAT32_ATOL = 1e-5   # logits are O(0.1-1) here; float32 rounding of the two orders of summation


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_step_by_step_equals_forward_float32(schedule):
    model = LM(tiny_config(schedule, dtype="float32"), seed=3)
    tokens = random_tokens(2, 9, seed=1)
    full, _ = model.forward(tokens)
    stepped, _ = stepwise_logits(model, tokens)
    assert stepped.dtype == np.float32
    np.testing.assert_allclose(stepped, full, rtol=0, atol=FLOAT32_ATOL)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_prefill_then_steps_equals_forward(schedule):
    model = LM(tiny_config(schedule), seed=5)
    tokens = random_tokens(3, 10, seed=4)
    full, _ = model.forward(tokens)
    prefix_logits, state = model.prefill(tokens[:, :6])
    assert state["position"] == 6
    rest, state = stepwise_logits(model, tokens[:, 6:], state)
    np.testing.assert_allclose(prefix_logits, full[:, :6], rtol=0, atol=1e-10)
    np.testing.assert_allclose(rest, full[:, 6:], rtol=0, atol=1e-10)
    assert state["position"] == 10


def test_prefill_in_pieces_continues_the_state():
    model = LM(tiny_config("LMARGS"), seed=6)
    tokens = random_tokens(2, 11, seed=5)
    full, _ = model.forward(tokens)
    first, state = model.prefill(tokens[:, :4])
    second, state = model.prefill(tokens[:, 4:], state)       # a prompt continued in parallel form
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), full, rtol=0, atol=1e-10)


def test_step_does_not_modify_the_given_state():
    model = LM(tiny_config("LMARGS"), seed=0)
    state = model.init_state(2)
    _, state = model.prefill(random_tokens(2, 3))
    before = [{k: np.copy(v) for k, v in _flatten(layer).items()} for layer in state["layers"]]
    model.step(np.array([1, 2]), state)
    after = [_flatten(layer) for layer in state["layers"]]
    for b, a in zip(before, after):
        for key in b:
            np.testing.assert_array_equal(b[key], a[key])


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}/"))
        return out
    return {prefix: tree}


# ----------------------------------------------------------------------------------------------
# state sizes

@pytest.mark.parametrize("schedule", ["L", "G", "M", "R", "S"])
def test_recurrent_state_does_not_grow(schedule):
    model = LM(tiny_config(schedule), seed=0)
    state = model.init_state(2)
    sizes = []
    for t in range(12):
        _, state = model.step(np.array([t % VOCAB, 3]), state)
        sizes.append(state_bytes(state))
    assert all(s == sizes[0] for s in sizes)
    assert sizes[0] == model.state_bytes(model.init_state(2))
    row = model.layer_info()[0]
    assert row["state_bytes_per_token"] == 0
    assert row["state_bytes_per_sequence"] == sum(model.state_bytes(model.init_state(1)))


def test_attention_cache_grows_by_two_d_per_token():
    model = LM(tiny_config("MA"), seed=0)
    state = model.init_state(1)
    sizes = [state_bytes(state)]
    for t in range(5):
        _, state = model.step(np.array([t]), state)
        sizes.append(state_bytes(state))
    per_token = 2 * 8 * 8                                     # k and v, d_model 8, float64
    assert [s[0] for s in sizes] == [sizes[0][0]] * 6         # the M layer: fixed
    assert [s[1] for s in sizes] == [per_token * t for t in range(6)]
    rows = model.layer_info()
    assert rows[1]["state_bytes_per_token"] == per_token and rows[0]["state_bytes_per_token"] == 0


def test_param_counts_and_names():
    model = LM(tiny_config("MA"), seed=0)
    assert set(model.params) == set(model.grads)
    assert "layers.0.mixer.in_proj.W" in model.params and "layers.1.mlp.fc1.W" in model.params
    counts = model.param_counts()
    assert sum(counts.values()) == model.num_params()
    assert sum(row["params"] for row in model.layer_info()) == counts["layers.0"] + counts["layers.1"]
    decay = model.decay_mask()
    assert decay["layers.0.mixer.in_proj.W"] and not decay["layers.0.mixer.A_log"]
    assert not decay["embed.weight"] and not decay["layers.0.mixer.dt_proj.b"]
    assert decay["layers.1.mlp.fc1.W"] and not decay["layers.1.norm1.weight"]


# ----------------------------------------------------------------------------------------------
# initialization

def test_mamba_reference_initialization():
    cfg = LMConfig(vocab_size=VOCAB, d_model=32, schedule="M", d_state=16)
    p = LM(cfg, seed=0).params
    E, N = 64, 16
    assert p["layers.0.mixer.A_log"].shape == (E, N)
    np.testing.assert_allclose(-np.exp(p["layers.0.mixer.A_log"]), -np.tile(np.arange(1, N + 1), (E, 1)), rtol=1e-6)
    np.testing.assert_array_equal(p["layers.0.mixer.D"], np.ones(E))
    dt = np.log1p(np.exp(p["layers.0.mixer.dt_proj.b"].astype(np.float64)))   # softplus(bias)
    assert np.all(dt >= 0.001 * (1 - 1e-5)) and np.all(dt <= 0.1 * (1 + 1e-5))
    R = math.ceil(32 / 16)
    assert p["layers.0.mixer.dt_proj.W"].shape == (R, E)
    assert np.abs(p["layers.0.mixer.dt_proj.W"]).max() <= R ** -0.5
    assert p["layers.0.mixer.x_proj.W"].shape == (E, R + 2 * N)


def test_same_seed_same_model():
    a, b = LM(tiny_config("LMA"), seed=7), LM(tiny_config("LMA"), seed=7)
    c = LM(tiny_config("LMA"), seed=8)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not all(np.array_equal(a.params[k], c.params[k]) for k in a.params)


# ----------------------------------------------------------------------------------------------
# configuration errors name the field

@pytest.mark.parametrize("overrides, field", [
    (dict(schedule="AXM"), "schedule"),
    (dict(schedule=""), "schedule"),
    (dict(schedule="AM", n_layers=3), "n_layers"),
    (dict(dtype="float16"), "dtype"),
    (dict(dtype="int32"), "dtype"),
    (dict(dtype=np.float64), "dtype"),
    (dict(d_model=8, n_heads=3), "n_heads"),
    (dict(d_model=6, n_heads=2), "n_heads"),        # odd head dim: no RoPE
    (dict(backend="tpu"), "backend"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(short_conv=-1), "short_conv"),
    (dict(dt_rank=0), "dt_rank"),
])
def test_bad_config_raises_value_error_naming_the_field(overrides, field):
    options = dict(vocab_size=VOCAB, d_model=8, schedule="AM", n_heads=2)
    options.update(overrides)
    with pytest.raises(ValueError, match=field):
        LMConfig(**options)


def test_config_round_trips_through_a_dict():
    cfg = tiny_config("LMA", short_conv=2)
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        LMConfig.from_dict({**cfg.to_dict(), "n_experts": 4})


def test_bad_tokens_are_refused():
    model = LM(tiny_config("M"), seed=0)
    with pytest.raises(ValueError, match="tokens"):
        model.forward(np.array([[0, VOCAB]]))
    with pytest.raises(ValueError, match="tokens_t"):
        model.step(np.array([-1]), model.init_state(1))
    with pytest.raises(TypeError, match="tokens"):
        model.forward(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="tokens"):
        model.forward(np.zeros(3, dtype=int))


# ----------------------------------------------------------------------------------------------
# save / load (the file format itself is tested with the checkpoints)

def test_save_load_round_trip(tmp_path):
    model = LM(tiny_config("LMA", dtype="float32"), seed=3)
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = LM.load(path)
    assert loaded.cfg == model.cfg
    for name in model.params:
        assert loaded.params[name].dtype == model.params[name].dtype
        np.testing.assert_array_equal(loaded.params[name], model.params[name])
    tokens = random_tokens(1, 5)
    np.testing.assert_array_equal(loaded.forward(tokens)[0], model.forward(tokens)[0])


def test_truncated_or_mismatched_checkpoint_is_refused(tmp_path):
    model = LM(tiny_config("MA"), seed=0)
    path = tmp_path / "model.npz"
    model.save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        LM.load(truncated)
    # a parameter with the wrong shape for the stored config
    arrays = dict(np.load(path))
    arrays["param/layers.0.mixer.D"] = np.ones(3)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="layers.0.mixer.D"):
        LM.load(bad)
    # no temporary files are left behind by the atomic save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "model.npz", "truncated.npz"]
