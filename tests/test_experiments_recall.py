"""The recall experiment: the MQAR and passkey generators, scoring, parameter matching, and the
experiment end to end at toy sizes."""
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilm.experiments import recall, tasks

IGNORE = tasks.IGNORE_INDEX


# ----------------------------------------------------------------------------------------------
# MQAR

@given(pairs=st.integers(1, 8), extra=st.integers(0, 20), vocab=st.integers(20, 64),
       seed=st.integers(0, 2**31 - 1), random_fill=st.booleans())
def test_mqar_answers_are_recoverable_from_the_sequence(pairs, extra, vocab, seed, random_fill):
    T = 4 * pairs + extra
    x, y = tasks.mqar(6, T, pairs, vocab, seed=seed, random_non_queries=random_fill)
    assert x.shape == y.shape == (6, T) and x.dtype == y.dtype == np.int64
    assert np.all((x >= 0) & (x < vocab))
    keep = y != IGNORE
    assert np.all(keep.sum(axis=1) == pairs)                       # one answer per pair
    assert np.all(y[keep] >= vocab // 2) and np.all(y[keep] < vocab)  # answers are values
    keys, values = x[:, 0:2 * pairs:2], x[:, 1:2 * pairs:2]
    assert np.all((keys >= 1) & (keys < vocab // 2)) and np.all(values >= vocab // 2)
    for row_keys, row_values in zip(keys, values):
        assert len(set(row_keys.tolist())) == pairs and len(set(row_values.tolist())) == pairs
    np.testing.assert_array_equal(tasks.mqar_answers_from_context(x, y, pairs), y)
    # every query sits in the query region at an even offset, and asks for a key of the context
    rows, cols = np.nonzero(keep)
    assert np.all(cols >= 2 * pairs) and np.all((cols - 2 * pairs) % 2 == 0)
    for r in range(6):
        assert sorted(x[r, keep[r]].tolist()) == sorted(keys[r].tolist())
    if not random_fill:
        assert np.all(x[:, 2 * pairs:][~keep[:, 2 * pairs:]] == 0)


def test_mqar_is_seeded_and_favours_queries_near_the_context():
    a = tasks.mqar(50, 64, 4, 128, seed=3)
    b = tasks.mqar(50, 64, 4, 128, seed=3)
    c = tasks.mqar(50, 64, 4, 128, seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    _, y = tasks.mqar(2000, 64, 4, 128, seed=0)
    gaps = (np.nonzero(y != IGNORE)[1] - 8) // 2                   # slot index in the query region
    near, far = np.mean(gaps < 7), np.mean(gaps >= 21)             # first vs last quarter of 28 slots
    assert near > far                                              # the power law p(g) ~ (g+1)^(a-1)


def test_query_gaps_sample_without_replacement():
    gaps = tasks.query_gaps(np.random.default_rng(0), 100, 10, 10)
    assert np.all(np.sort(gaps, axis=1) == np.arange(10))


@pytest.mark.parametrize("kwargs, word", [
    (dict(num_examples=2, seq_len=15, num_kv_pairs=4, vocab_size=128), "seq_len"),
    (dict(num_examples=2, seq_len=64, num_kv_pairs=8, vocab_size=16), "vocab_size"),
    (dict(num_examples=0, seq_len=64, num_kv_pairs=4, vocab_size=128), "num_examples"),
    (dict(num_examples=2, seq_len=64, num_kv_pairs=4, vocab_size=128, power_a=0.0), "power_a"),
])
def test_mqar_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        tasks.mqar(**kwargs)


# ----------------------------------------------------------------------------------------------
# passkey

@given(T=st.integers(12, 80), digits=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_passkey_answer_is_the_hidden_number(T, digits, seed):
    if T < 2 * (digits + 1):
        return
    x, y = tasks.passkey(5, T, digits, seed=seed)
    assert x.shape == y.shape == (5, T)
    assert np.all((x >= 0) & (x < tasks.PASSKEY_VOCAB_SIZE))
    needle = tasks.passkey_needle_positions(x)
    for r in range(5):
        hidden = x[r, needle[r] + 1:needle[r] + 1 + digits]
        assert x[r, T - digits - 1] == tasks.QUERY
        answers = y[r][y[r] != IGNORE]
        np.testing.assert_array_equal(answers, hidden)             # the targets are the passkey
        np.testing.assert_array_equal(x[r, T - digits:], hidden)   # teacher forcing after QUERY
        assert np.sum(x[r] == tasks.NEEDLE) == 1 and np.sum(x[r] == tasks.QUERY) == 1
        filler = np.delete(x[r], list(range(needle[r], needle[r] + digits + 1)) + list(range(T - digits - 1, T)))
        assert np.all(filler >= tasks.FILLER_START)
        # the filler is one repeating sentence, running on across the needle
        assert np.all(np.diff(filler - tasks.FILLER_START) % tasks.FILLER_LENGTH == 1)


def test_passkey_depth_places_the_needle():
    T, n = 40, 5
    filler = T - 2 * (n + 1)
    assert np.all(tasks.passkey_needle_positions(tasks.passkey(4, T, n, seed=0, depth=0.0)[0]) == 0)
    assert np.all(tasks.passkey_needle_positions(tasks.passkey(4, T, n, seed=0, depth=1.0)[0]) == filler)
    assert np.all(tasks.passkey_needle_positions(tasks.passkey(4, T, n, seed=0, depth=0.5)[0]) == filler // 2)
    with pytest.raises(ValueError, match="seq_len"):
        tasks.passkey(1, 2 * n + 1, n)
    with pytest.raises(ValueError, match="depth"):
        tasks.passkey(1, T, n, depth=1.5)


# ----------------------------------------------------------------------------------------------
# scoring

def test_accuracy_and_exact_match_count_only_answer_positions():
    targets = np.array([[IGNORE, 2, IGNORE, 1], [0, IGNORE, IGNORE, 2]])
    predicted = np.array([[0, 2, 0, 0], [0, 1, 1, 2]])              # row 0: 1 of 2, row 1: 2 of 2
    logits = np.eye(3)[predicted]
    assert tasks.accuracy(logits, targets) == pytest.approx(3 / 4)
    assert tasks.exact_match(logits, targets) == pytest.approx(1 / 2)


# ----------------------------------------------------------------------------------------------
# models and the experiment

def test_two_layer_schedules_have_matched_parameter_counts():
    counts = {s: recall.count_params(s, 64) for s in ("AA", "LL", "GG", "MM", "MA", "LA")}
    reference = counts["AA"]
    for schedule, n in counts.items():
        assert abs(n - reference) / reference < 0.05, counts
    assert abs(recall.count_params("RR", 64) - reference) / reference < 0.2
    d = recall.matched_d_model("MMA", 64)
    assert d % (2 * recall.N_HEADS) == 0
    assert abs(recall.count_params("MMA", d) - reference) <= min(
        abs(recall.count_params("MMA", d + s) - reference) for s in (-8, 8))
    assert recall.matched_d_model("MA", 64) == 64


def test_every_attention_like_layer_gets_the_short_conv():
    cfg = recall.model_config("LA", 16)
    assert cfg.short_conv == recall.SHORT_CONV > 0
    model = recall.LM(cfg)
    assert any(name.endswith("short_conv.w") for name in model.params)


def test_full_plan_gives_every_family_of_a_study_the_same_grid():
    for quick in (True, False):
        for study in recall.studies(quick):
            assert study["lrs"] and study["schedules"]
    full = recall.studies(False)
    assert set(full[0]["schedules"]) >= {"AA", "LL", "GG", "MM", "RR", "MA"}
    assert {s["task"] for s in full} == {"mqar", "passkey"}


def test_mixture_batch_and_training_run_end_to_end():
    rng = np.random.default_rng(0)
    x, y = recall.mqar_batch(rng, 7, 32, (2, 4, 8))
    assert x.shape == (7, 32)
    assert sorted((y != IGNORE).sum(axis=1).tolist()) == [2, 2, 2, 4, 4, 8, 8]
    eval_sets = {2: tasks.mqar(8, 32, 2, recall.VOCAB_SIZE, seed=1)}
    result = recall.train_recall_model("MA", 16, 3e-3, 3, lambda r: recall.mqar_batch(r, 4, 32, (2,)),
                                       eval_sets, early_stop_set=eval_sets[2], eval_every=1)
    assert 1 <= result["steps"] <= 3 and result["stopped"] in ("steps", "target")
    assert 0.0 <= result["accuracy"][2] <= 1.0 and len(result["losses"]) == result["steps"]
    assert np.isfinite(result["losses"]).all()
    # state bytes: A's KV cache grows with the length, the fixed-state layers do not
    model = result["model"]
    assert recall.decoding_state_bytes(model, 32) > recall.decoding_state_bytes(model, 16)
    mm = recall.LM(recall.model_config("MM", 16))
    assert recall.decoding_state_bytes(mm, 32) == recall.decoding_state_bytes(mm, 16)


def test_run_recall_end_to_end_tiny(tmp_path, monkeypatch):
    tiny = [{"task": "mqar", "seq_len": 16, "eval_lens": (16, 24), "kv_pairs": (2, 4), "width": 16,
             "schedules": ("AA", "MA"), "lrs": (1e-3, 3e-3)},
            {"task": "passkey", "seq_len": 16, "kv_pairs": (1,), "width": 16, "schedules": ("MA",),
             "lrs": (3e-3,)}]
    monkeypatch.setattr(recall, "studies", lambda quick: tiny)
    monkeypatch.setattr(recall, "MAIN_WIDTH", 16)
    monkeypatch.setattr(recall, "BATCH_SIZE", 4)
    monkeypatch.setattr(recall, "EVAL_EXAMPLES", 8)
    monkeypatch.setattr(recall, "QUICK_MAX_STEPS", 2)
    monkeypatch.setattr(recall, "MIN_STEPS", 1)
    monkeypatch.setattr(recall, "PASSKEY_DIGITS", 2)
    monkeypatch.setattr(recall, "PASSKEY_DEPTHS", (0.0, 1.0))
    messages = []
    rows = recall.run_recall(quick=True, out_dir=str(tmp_path), progress=messages.append, budget_s=60,
                            workers=1)           # workers would not see the patched constants
    mqar_rows = [r for r in rows if r["task"] == "mqar"]
    passkey_rows = [r for r in rows if r["task"] == "passkey"]
    assert len(mqar_rows) == 2 * 2 * 2 and len(passkey_rows) == 2
    assert {(r["seq_len"], r["train_seq_len"]) for r in mqar_rows} == {(16, 16), (24, 16)}
    for row in rows:
        for key in ("task", "schedule", "kv_pairs", "seq_len", "d_model", "accuracy", "lr", "steps",
                    "seed", "params", "state_bytes"):
            assert key in row, key
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["lr"] in (1e-3, 3e-3) and row["d_model"] == 16
    assert {r["kv_pairs"] for r in mqar_rows} == {2, 4}
    assert {r["depth"] for r in passkey_rows} == {0.0, 1.0} and {r["kv_pairs"] for r in passkey_rows} == {1}
    assert all(len(r["lr_sweep"].split(";")) == 2 for r in mqar_rows)
    assert len(messages) == 1 + 5 + 1                  # plan, one line per training run, done
    assert os.path.getsize(tmp_path / "recall_vs_pairs.png") > 1000
    table = recall.accuracy_table(rows, seq_len=16)
    assert set(table) == {"AA", "MA"} and set(table["AA"]) == {2, 4}
