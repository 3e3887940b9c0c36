"""Sampling: seeded and deterministic, top-k and temperature respected, prefill + steps = forward."""
import numpy as np
import pytest

from minilm import LM, LMConfig
from minilm.generate import generate, sample_next

VOCAB = 13


def tiny_model(schedule="MA", dtype="float64", seed=0):
    cfg = LMConfig(vocab_size=VOCAB, d_model=8, schedule=schedule, n_heads=2, d_state=4, mlp_ratio=2,
                   chunk_size=4, dtype=dtype, embed_std=1.0)    # larger embeddings: peakier, varied logits
    return LM(cfg, seed=seed)


PROMPT = np.array([1, 5, 2, 7])


def test_same_seed_same_text_and_seeds_differ():
    model = tiny_model()
    a = model.generate(PROMPT, 20, temperature=1.0, seed=123)
    b = model.generate(PROMPT, 20, temperature=1.0, seed=123)
    np.testing.assert_array_equal(a, b)
    others = [model.generate(PROMPT, 20, temperature=1.0, seed=s) for s in range(5)]
    assert any(not np.array_equal(a, o) for o in others)


def test_output_layout_and_dtype():
    model = tiny_model()
    out = model.generate(PROMPT, 6, seed=0)
    assert out.shape == (len(PROMPT) + 6,) and out.dtype == np.int64
    np.testing.assert_array_equal(out[:len(PROMPT)], PROMPT)
    assert out.min() >= 0 and out.max() < VOCAB
    batched = model.generate(np.stack([PROMPT, PROMPT[::-1]]), 3, seed=0)
    assert batched.shape == (2, len(PROMPT) + 3)
    np.testing.assert_array_equal(model.generate(PROMPT, 0, seed=0), PROMPT)


@pytest.mark.parametrize("schedule", ["A", "L", "G", "M", "R", "S", "MA", "LMA"])
def test_greedy_decoding_equals_argmax_of_full_forward(schedule):
    """Each greedy token (prefill + one step per token) is the argmax of a full forward pass over
    the text so far: the cached / recurrent path picks what the parallel path would."""
    model = tiny_model(schedule, seed=1)
    out = model.generate(PROMPT, 8, temperature=0)
    logits, _ = model.forward(out[None, :-1])
    np.testing.assert_array_equal(out[len(PROMPT):], np.argmax(logits[0, len(PROMPT) - 1:], axis=-1))


def test_top_k_one_is_greedy():
    model = tiny_model("LMA")
    greedy = model.generate(PROMPT, 10, temperature=0)
    for seed in range(3):
        np.testing.assert_array_equal(model.generate(PROMPT, 10, temperature=1.5, top_k=1, seed=seed), greedy)


@pytest.mark.parametrize("k", [2, 4])
def test_generated_tokens_are_in_the_top_k(k):
    model = tiny_model("MA")
    for seed in range(3):
        out = model.generate(PROMPT, 15, temperature=2.0, top_k=k, seed=seed)
        logits, _ = model.forward(out[None, :-1])
        for t in range(len(PROMPT), len(out)):
            row = logits[0, t - 1]
            assert np.sum(row > row[out[t]]) < k, (seed, t)    # fewer than k logits beat the choice


def test_sample_next_frequencies_follow_softmax_and_top_k():
    logits = np.array([[2.0, 1.0, 0.0, -1.0, 0.5]])
    rng = np.random.default_rng(0)
    draws = np.array([sample_next(logits, rng, temperature=0.7, top_k=3)[0] for _ in range(4000)])
    assert set(np.unique(draws)) <= {0, 1, 4}                  # only the three largest logits
    kept = np.array([2.0, 1.0, 0.5]) / 0.7
    expected = np.exp(kept - kept.max()) / np.exp(kept - kept.max()).sum()
    observed = np.array([np.mean(draws == i) for i in (0, 1, 4)])
    np.testing.assert_allclose(observed, expected, atol=0.03)

    flat = np.zeros((1, 4))                                    # high temperature on equal logits: uniform
    draws = np.array([sample_next(flat, rng, temperature=5.0)[0] for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, 0.25, atol=0.03)


def test_greedy_sample_next_is_argmax():
    logits = np.array([[0.1, 3.0, -2.0], [5.0, 0.0, 4.9]])
    np.testing.assert_array_equal(sample_next(logits, np.random.default_rng(0), temperature=0), [1, 0])


def test_float32_generation_runs():
    model = tiny_model("LMARGS", dtype="float32")
    out = generate(model, PROMPT, 5, temperature=0.8, top_k=5, seed=0)
    assert out.shape == (len(PROMPT) + 5,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
])
def test_bad_options_raise(kwargs, match):
    options = dict(max_new_tokens=3)
    options.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tiny_model().generate(PROMPT, **options)


def test_bad_prompt_raises():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt_tokens"):
        model.generate(np.array([], dtype=int), 3)
    with pytest.raises(TypeError, match="prompt_tokens"):
        model.generate(np.array([0.5, 1.0]), 3)
