"""Data (minilm.data) and the training loop (minilm.train): determinism, resume, learning."""
import math

import numpy as np
import pytest

from minilm import LMConfig, data
from minilm.checkpoint import CheckpointError
from minilm.train import TrainConfig, Trainer, TrainingDiverged, evaluate


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus()


def tiny_model_config(schedule, **overrides):
    options = dict(schedule=schedule, d_model=16, n_heads=2, d_state=4, mlp_ratio=2, chunk_size=8)
    options.update(overrides)
    return LMConfig(**options)


def tiny_train_config(**overrides):
    options = dict(steps=6, batch_size=4, seq_len=16, warmup_steps=2, eval_interval=0, eval_batches=1,
                   save_interval=0)
    options.update(overrides)
    return TrainConfig(**options)


# ----------------------------------------------------------------------------------------------
# data

def test_byte_tokenizer_round_trips():
    text = "Mamba, RWKV & attention: naïve → O(N²) ✓\n"
    ids = data.encode(text)
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < data.VOCAB_SIZE
    assert len(ids) == len(text.encode("utf-8"))
    assert data.decode(ids) == text
    assert data.decode(ids[:-3]).endswith("\ufffd")                 # a cut multi-byte char is replaced, not fatal
    with pytest.raises(ValueError, match="bytes"):
        data.decode([300])


def test_default_corpus_is_english_text_from_the_standard_library(corpus):
    text = data.default_corpus()
    assert text == data.default_corpus()                             # deterministic
    assert len(text) > 200_000
    assert "The \"if\" statement" in text and "assert" in text
    words = text.split()
    common = sum(w.lower() in {"the", "of", "a", "is", "to", "and", "in"} for w in words)
    assert common / len(words) > 0.1                                 # prose, not a table of numbers
    assert len(corpus.train) + len(corpus.val) == len(data.encode(text))
    assert len(corpus.val) == pytest.approx(0.1 * len(corpus.tokens), abs=1)
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), corpus.tokens)


def test_text_file_and_errors(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("abcdefghij" * 10)
    c = data.load_corpus(path, val_fraction=0.2)
    assert len(c.train) == 80 and len(c.val) == 20
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="too short"):
        data.load_corpus(path, min_tokens=50)


def test_batches():
    tokens = np.arange(100)
    rng = np.random.default_rng(0)
    x, y = data.sample_batch(tokens, 5, 7, rng)
    assert x.shape == y.shape == (5, 7)
    np.testing.assert_array_equal(y, x + 1)                         # targets are the next tokens
    x2, _ = data.sample_batch(tokens, 5, 7, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)                             # the Generator fixes the batch
    windows = list(data.eval_windows(tokens, 4, 10, max_batches=3))
    assert len(windows) == 3 and all(xv.shape == (4, 10) for xv, _ in windows)
    assert windows[0][0][0, 0] == 0 and windows[-1][1][-1, -1] == 99 # spread over the whole text
    with pytest.raises(ValueError, match="seq_len"):
        data.sample_batch(tokens, 1, 100, rng)


def test_unigram_entropy():
    tokens = np.array([0, 0, 1, 2])
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert data.unigram_entropy(tokens) == pytest.approx(expected)
    smoothed = data.unigram_entropy(np.array([0]), reference=np.array([0, 0]))
    assert smoothed == pytest.approx(-math.log(3 / 258))
    assert data.bits_per_byte(math.log(2)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# training loop

@pytest.mark.parametrize("schedule", ["MA", "LGRS"])
def test_same_seed_gives_bit_identical_losses(corpus, schedule):
    model_cfg, train_cfg = tiny_model_config(schedule), tiny_train_config()
    first = Trainer.new(model_cfg, train_cfg, corpus)
    a = first.run(progress=False)
    second = Trainer.new(model_cfg, train_cfg, corpus)
    b = second.run(progress=False)
    assert len(a.losses) == train_cfg.steps
    assert a.losses == b.losses                                      # exact float equality
    assert a.val_loss == b.val_loss
    for name in first.model.params:
        assert np.array_equal(first.model.params[name], second.model.params[name])
    other = Trainer.new(model_cfg, tiny_train_config(seed=1), corpus).run(progress=False)
    assert other.losses != a.losses                                  # the seed matters


@pytest.mark.parametrize("schedule", ["MA", "LGRS"])
def test_resume_equals_uninterrupted(corpus, tmp_path, schedule):
    model_cfg = tiny_model_config(schedule)
    train_cfg = tiny_train_config(steps=7, eval_interval=2)
    straight = Trainer.new(model_cfg, train_cfg, corpus)
    full = straight.run(progress=False)

    Trainer.new(model_cfg, train_cfg, corpus).run(out_dir=tmp_path, progress=False, stop_at=3)
    resumed = Trainer.resume(tmp_path, corpus=corpus)
    assert resumed.step == 3
    rest = resumed.run(out_dir=tmp_path, progress=False)
    head = full.losses[:3]
    assert head + rest.losses == full.losses                         # bit for bit
    assert rest.val_loss == full.val_loss
    for name in straight.model.params:
        assert np.array_equal(resumed.model.params[name], straight.model.params[name]), name
        assert np.array_equal(resumed.optimizer.m[name], straight.optimizer.m[name]), name
    again = Trainer.resume(tmp_path, corpus=corpus)                  # the final checkpoint: nothing left to do
    assert again.step == 7 and again.run(progress=False).losses == []


def test_resume_refuses_changed_settings(corpus, tmp_path):
    model_cfg, train_cfg = tiny_model_config("R"), tiny_train_config(steps=2)
    Trainer.new(model_cfg, train_cfg, corpus).run(out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="lr: 0.003 != 0.01"):
        Trainer.resume(tmp_path, train_cfg=tiny_train_config(steps=2, lr=0.01), corpus=corpus)
    with pytest.raises(CheckpointError, match="d_model: 16 != 32"):
        Trainer.resume(tmp_path, model_cfg=tiny_model_config("R", d_model=32), corpus=corpus)
    with pytest.raises(CheckpointError, match="same --data"):
        Trainer.resume(tmp_path, corpus=data.Corpus(corpus.tokens[:5000], "short"))
    longer = Trainer.resume(tmp_path, train_cfg=tiny_train_config(steps=3), corpus=corpus)
    assert longer.run(progress=False).last_step == 3                 # more steps may be asked for


def test_model_only_checkpoint_cannot_be_resumed(corpus, tmp_path):
    from minilm import LM
    LM(tiny_model_config("M")).save(tmp_path / "checkpoint.npz")
    with pytest.raises(CheckpointError, match="model only"):
        Trainer.resume(tmp_path, corpus=corpus)


def test_divergence_is_reported_and_not_saved(corpus, tmp_path):
    trainer = Trainer.new(tiny_model_config("A"), tiny_train_config(steps=2), corpus)
    trainer.model.params["norm_f.weight"][:] = np.inf
    with pytest.raises(TrainingDiverged, match="step 0"):
        trainer.run(out_dir=tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.npz").exists()


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="beta2"):
        TrainConfig(beta2=1.0)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.5)


def test_training_beats_the_unigram_baseline(corpus):
    """A one-layer Transformer on the built-in corpus must use context: 120 steps of 16 x 32 bytes take
    the validation loss well below the unigram (byte-frequency) cross-entropy, which any model that
    learned only byte frequencies would be stuck at (~4.7 bits/byte here)."""
    model_cfg = LMConfig(schedule="A", d_model=32, n_heads=2, mlp_ratio=4, backend="numpy")
    train_cfg = TrainConfig(steps=120, batch_size=16, seq_len=32, lr=1e-2, min_lr=1e-3, warmup_steps=10,
                            eval_interval=0, eval_batches=8)
    trainer = Trainer.new(model_cfg, train_cfg, corpus)
    initial = evaluate(trainer.model, corpus.val, 16, 32, 8)
    result = trainer.run(progress=False)
    assert initial == pytest.approx(math.log(256), abs=0.1)          # starts near uniform (8 bits/byte)
    assert result.unigram_bpb == pytest.approx(data.bits_per_byte(data.unigram_entropy(corpus.val, corpus.train)))
    assert result.val_bpb < result.unigram_bpb - 0.5, result.summary
    assert "bits/byte" in result.summary and "tok/s" in result.summary
