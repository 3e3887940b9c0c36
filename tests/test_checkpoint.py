"""Checkpoints (minilm.checkpoint): bit-identical round trips, atomic writes, refusal of bad files."""
import json
import os

import numpy as np
import pytest

from minilm import LM, LMConfig
from minilm.checkpoint import (CHECKPOINT_FILE, CheckpointError, load_checkpoint, load_model, model_arrays,
                               save_checkpoint)
from minilm.optim import AdamW


def tiny_model(schedule="MA", dtype="float32", seed=0, **overrides):
    options = dict(vocab_size=32, d_model=8, schedule=schedule, n_heads=2, d_state=4, chunk_size=4, dtype=dtype)
    options.update(overrides)
    return LM(LMConfig(**options), seed=seed)


def trained_state(model, steps=3, seed=0):
    """An optimizer that has taken a few steps and a Generator that has been used."""
    rng = np.random.default_rng(seed)
    opt = AdamW(model.params, lr=0.01)
    for _ in range(steps):
        opt.step(model.params, {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in model.params.items()})
    data_rng = np.random.default_rng([seed, 1])
    data_rng.integers(0, 100, size=7)
    return opt, data_rng


def write_archive(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_round_trip_is_bit_identical(tmp_path, dtype):
    model = tiny_model("LMRA", dtype=dtype, seed=3)
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = LM.load(path)
    assert loaded.cfg == model.cfg
    assert set(loaded.params) == set(model.params)
    for name, value in model.params.items():
        assert loaded.params[name].dtype == value.dtype
        assert np.array_equal(loaded.params[name], value), name
    tokens = np.random.default_rng(0).integers(0, 32, size=(2, 5))
    assert np.array_equal(loaded.forward(tokens)[0], model.forward(tokens)[0])


def test_training_checkpoint_round_trip_is_bit_identical(tmp_path):
    model = tiny_model("GS")
    opt, rng = trained_state(model)
    train_config = {"steps": 10, "lr": 0.01}
    save_checkpoint(tmp_path, model, opt, step=3, rng=rng, train_config=train_config, stats={"val_loss": 1.5})
    assert os.path.isfile(tmp_path / CHECKPOINT_FILE)                 # a directory means the file inside it
    state = load_checkpoint(tmp_path)
    assert state.step == 3 and state.train_config == train_config and state.stats == {"val_loss": 1.5}
    for name in model.params:
        assert np.array_equal(state.model.params[name], model.params[name])
        assert np.array_equal(state.optimizer["m"][name], opt.m[name])
        assert np.array_equal(state.optimizer["v"][name], opt.v[name])
    assert state.optimizer["t"] == opt.t
    assert np.array_equal(state.make_rng().integers(0, 2**62, size=5), rng.integers(0, 2**62, size=5))
    restored = AdamW(state.model.params, lr=0.01)
    restored.load_state_dict(state.optimizer)                        # accepted as is
    assert LM.load(tmp_path).cfg == model.cfg                       # a training checkpoint is also a model file


def test_save_is_atomic_and_leaves_no_temp_file(tmp_path, monkeypatch):
    model = tiny_model()
    path = tmp_path / "ck.npz"
    model.save(path)
    good = path.read_bytes()

    def failing_savez(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        tiny_model(seed=1).save(path)
    assert path.read_bytes() == good                                # the old checkpoint is untouched
    assert os.listdir(tmp_path) == ["ck.npz"]                       # and no temporary file is left behind


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file_is_refused(tmp_path, fraction):
    model = tiny_model()
    opt, rng = trained_state(model)
    save_checkpoint(tmp_path, model, opt, step=3, rng=rng, train_config={})
    path = tmp_path / CHECKPOINT_FILE
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError):
        LM.load(path)


def test_corrupted_byte_is_refused(tmp_path):
    path = tmp_path / "ck.npz"
    tiny_model().save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF                                     # inside an array's data: CRC-32 fails
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_not_a_checkpoint(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(garbage)
    other = tmp_path / "other.npz"
    write_archive(other, {"x": np.zeros(3)})
    with pytest.raises(CheckpointError, match="format tag"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing")


def test_mismatched_config_is_refused(tmp_path):
    model = tiny_model("MA")
    model.save(tmp_path / CHECKPOINT_FILE)
    load_checkpoint(tmp_path, expected_config=model.cfg)            # the same config is accepted
    other = LMConfig(**dict(model.cfg.to_dict(), d_model=16))
    with pytest.raises(CheckpointError, match="d_model: 8 != 16"):
        load_checkpoint(tmp_path, expected_config=other)
    other = LMConfig(**dict(model.cfg.to_dict(), schedule="MM"))
    with pytest.raises(CheckpointError, match="schedule: 'MA' != 'MM'"):
        load_checkpoint(tmp_path, expected_config=other)


def tampered(tmp_path, change):
    """Write a model file, let change(arrays) edit its arrays, return the path of the result."""
    arrays = model_arrays(tiny_model("MA"))
    change(arrays)
    path = tmp_path / "tampered.npz"
    write_archive(path, arrays)
    return path


def test_parameters_must_match_the_config(tmp_path):
    name = "param/layers.0.mixer.in_proj.W"

    def wrong_shape(a):
        a[name] = np.zeros((3, 3), dtype=np.float32)

    def wrong_dtype(a):
        a[name] = a[name].astype(np.float64)

    def missing(a):
        del a[name]

    def extra(a):
        a["param/layers.9.mixer.extra.W"] = np.zeros(2, dtype=np.float32)

    def not_finite(a):
        a[name] = a[name].copy()
        a[name][0, 0] = np.nan

    def config_mismatch(a):                                          # the stored config says d_model 16
        cfg = json.loads(str(a["__config__"]))
        a["__config__"] = np.array(json.dumps(dict(cfg, d_model=16)))

    def bad_config(a):
        a["__config__"] = np.array(json.dumps({"schedule": "MQ"}))

    cases = [(wrong_shape, "has shape"), (wrong_dtype, "dtype float64"), (missing, "missing parameters"),
             (extra, "unexpected parameters"), (not_finite, "NaN or Inf"), (config_mismatch, "the config implies"),
             (bad_config, "invalid config")]
    for change, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load_model(tampered(tmp_path, change))


def test_optimizer_state_must_match_the_parameters(tmp_path):
    model = tiny_model("MA")
    opt, rng = trained_state(model)
    save_checkpoint(tmp_path, model, opt, step=3, rng=rng, train_config={})
    path = tmp_path / CHECKPOINT_FILE
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    name = "optim/m/layers.0.mixer.in_proj.W"
    bad = dict(arrays, **{name: arrays[name][:1]})
    write_archive(path, bad)
    with pytest.raises(CheckpointError, match="optimizer moment 'm'"):
        load_checkpoint(path)
    bad = {k: v for k, v in arrays.items() if k != name}
    write_archive(path, bad)
    with pytest.raises(CheckpointError, match="do not match the parameters"):
        load_checkpoint(path)
    meta = json.loads(str(arrays["__train__"]))
    bad = dict(arrays, __train__=np.array(json.dumps(dict(meta, step=-1))))
    write_archive(path, bad)
    with pytest.raises(CheckpointError, match="step must be"):
        load_checkpoint(path)
    bad = dict(arrays, __train__=np.array(json.dumps(dict(meta, rng={"bit_generator": "Nope"}))))
    write_archive(path, bad)
    with pytest.raises(CheckpointError, match="unknown bit generator"):
        load_checkpoint(path)
