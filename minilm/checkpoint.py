"""Checkpoints: weights + config (+ optimizer, step and RNG state) in one .npz file, written
atomically, validated on load.

File layout (a NumPy .npz archive, readable with np.load(path, allow_pickle=False)):

    "__format__"      0-d string, FORMAT ("minilm-model-v1")
    "__config__"      0-d string, the LMConfig as JSON
    "param/<name>"    one array per entry of model.params, e.g. "param/layers.0.mixer.in_proj.W"

A training checkpoint (save_checkpoint) adds, in the same file:

    "__train__"       0-d string, JSON: {"step": steps completed, "train_config": {...},
                      "rng": the data Generator's bit_generator.state, "optimizer": {"t": ...,
                      "hyperparameters": {...}}, "stats": {...}}
    "optim/m/<name>"  AdamW's first moment of each parameter
    "optim/v/<name>"  AdamW's second moment

so LM.load reads a training checkpoint as a model, and a resumed run restores everything the next
step depends on (weights, moments, step count, the data sampler's RNG) and continues bit for bit.
A path that is a directory means the file CHECKPOINT_FILE inside it.

Atomic write: the archive goes to a temporary file in the destination's directory, is flushed and
fsync'ed, then os.replace'd over the destination (an atomic rename on POSIX and Windows), and the
directory is fsync'ed. A crash at any point leaves either the old file or the new one, never a
partial file under the destination's name.

Loading checks, each failing with an error that says what is wrong: the file is a readable
archive (a truncated or corrupted file is refused), the format tag, the config (a valid LMConfig),
and every parameter: present, no unknown extras, the shape and dtype the config implies; for
training checkpoints also the optimizer moments (same names, shapes, dtypes) and the RNG state.
Every such failure raises CheckpointError, a ValueError.
"""
import json
import os
import zipfile

import numpy as np

FORMAT = "minilm-model-v1"
PARAM_PREFIX = "param/"
MOMENT_PREFIXES = {"m": "optim/m/", "v": "optim/v/"}
CHECKPOINT_FILE = "checkpoint.npz"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: truncated, corrupt, or not matching what it should hold."""


def resolve_path(path):
    """A directory means the file CHECKPOINT_FILE inside it; any other path is used as is."""
    path = os.fspath(path)
    return os.path.join(path, CHECKPOINT_FILE) if os.path.isdir(path) else path


def atomic_write(path, write):
    """Call write(file_object) on a temporary file next to `path`, fsync it, then rename it to `path`."""
    path = resolve_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:                                       # make the rename itself durable (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def model_arrays(model):
    """The dict of arrays save_model writes for a model."""
    arrays = {"__format__": np.array(FORMAT), "__config__": np.array(model.cfg.to_json())}
    for name, value in model.params.items():
        arrays[PARAM_PREFIX + name] = value
    return arrays


def save_model(path, model):
    """Write model.cfg and model.params to `path` (any name; no extension is added) atomically."""
    arrays = model_arrays(model)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read_archive(path):
    """All arrays of an .npz file as a dict; a missing file raises FileNotFoundError, a truncated or
    corrupt one CheckpointError."""
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err})") from None


def config_from_arrays(arrays, path):
    """The LMConfig stored in a checkpoint's arrays, after checking the format tag."""
    from minilm.model import LMConfig
    fmt = arrays.get("__format__")
    if fmt is None or str(fmt) != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file (format tag {None if fmt is None else str(fmt)!r})")
    if "__config__" not in arrays:
        raise CheckpointError(f"checkpoint {path} has no config")
    try:
        return LMConfig.from_dict(json.loads(str(arrays["__config__"])))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {err}") from None


def load_params_into(model, arrays, path):
    """Copy the "param/*" arrays into model.params after checking names, shapes and dtypes."""
    stored = {name[len(PARAM_PREFIX):]: value for name, value in arrays.items() if name.startswith(PARAM_PREFIX)}
    missing = sorted(set(model.params) - set(stored))
    extra = sorted(set(stored) - set(model.params))
    if missing or extra:
        raise CheckpointError(f"checkpoint {path} does not match its config: missing parameters {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected parameters {extra[:5]}"
                              f"{'...' if len(extra) > 5 else ''}")
    for name, expected in model.params.items():
        value = stored[name]
        if value.shape != expected.shape:
            raise CheckpointError(f"checkpoint {path}: parameter {name} has shape {value.shape}, "
                                  f"the config implies {expected.shape}")
        if value.dtype != expected.dtype:
            raise CheckpointError(f"checkpoint {path}: parameter {name} has dtype {value.dtype}, "
                                  f"the config says {expected.dtype}")
        if not np.all(np.isfinite(value)):
            raise CheckpointError(f"checkpoint {path}: parameter {name} contains NaN or Inf")
        model.params[name] = np.array(value, copy=True)
    return model


def load_model(path):
    """Read a checkpoint written by save_model and return the LM, bit-identical to the saved one."""
    from minilm.model import LM
    arrays = read_archive(path)
    cfg = config_from_arrays(arrays, path)
    model = LM(cfg, seed=0)
    return load_params_into(model, arrays, path)


# ----------------------------------------------------------------------------------------------
# training checkpoints: the model + everything a resumed run needs

class TrainingState:
    """What load_checkpoint returns: the model and the state of the run that wrote it.

    model: the LM; step: number of training steps completed; optimizer: an AdamW state_dict (or None
    for a model-only file); rng_state: the data Generator's bit_generator.state (or None);
    train_config: dict (or None); stats: dict of numbers recorded at save time (or {}).
    """

    def __init__(self, model, step, optimizer, rng_state, train_config, stats):
        self.model, self.step, self.optimizer = model, step, optimizer
        self.rng_state, self.train_config, self.stats = rng_state, train_config, stats

    def make_rng(self):
        """A numpy Generator in exactly the saved state."""
        return generator_from_state(self.rng_state)


def generator_from_state(state):
    """Rebuild np.random.Generator from bit_generator.state (a dict as JSON gives it back)."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    bit_generator_class = getattr(np.random, str(name), None)
    if not (isinstance(bit_generator_class, type) and issubclass(bit_generator_class, np.random.BitGenerator)):
        raise CheckpointError(f"RNG state names an unknown bit generator {name!r}")
    bit_generator = bit_generator_class()
    try:
        bit_generator.state = state
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"RNG state is invalid: {err}") from None
    return np.random.Generator(bit_generator)


def save_checkpoint(path, model, optimizer=None, step=0, rng=None, train_config=None, stats=None):
    """Write a training checkpoint atomically: model weights and config, the optimizer's moments and
    step count, the number of steps completed, the data Generator's state, the training config and a
    few stats (JSON numbers / strings).

    path: a file, or an existing directory (the file CHECKPOINT_FILE inside it).
    """
    arrays = model_arrays(model)
    train = {"step": int(step), "train_config": train_config, "stats": stats or {},
             "rng": None if rng is None else rng.bit_generator.state, "optimizer": None}
    if optimizer is not None:
        state = optimizer.state_dict()
        train["optimizer"] = {"t": state["t"], "hyperparameters": state["hyperparameters"]}
        for key, prefix in MOMENT_PREFIXES.items():
            for name, value in state[key].items():
                arrays[prefix + name] = value
    arrays["__train__"] = np.array(json.dumps(train, sort_keys=True))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def config_differences(a, b):
    """['field: a != b', ...] for two LMConfigs."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{key}: {da.get(key)!r} != {db.get(key)!r}" for key in sorted(set(da) | set(db))
            if da.get(key) != db.get(key)]


def load_optimizer_state(model, arrays, meta, path):
    """The AdamW state_dict stored in the arrays, checked against the model's parameters."""
    if not isinstance(meta, dict) or not isinstance(meta.get("hyperparameters"), dict):
        raise CheckpointError(f"checkpoint {path}: invalid optimizer record {meta!r}")
    state = {"t": meta.get("t"), "hyperparameters": meta["hyperparameters"]}
    if isinstance(state["t"], bool) or not isinstance(state["t"], int) or state["t"] < 0:
        raise CheckpointError(f"checkpoint {path}: optimizer step count must be an int >= 0, got {state['t']!r}")
    for key, prefix in MOMENT_PREFIXES.items():
        stored = {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)}
        if set(stored) != set(model.params):
            missing = sorted(set(model.params) - set(stored))
            extra = sorted(set(stored) - set(model.params))
            raise CheckpointError(f"checkpoint {path}: optimizer moments '{key}' do not match the parameters "
                                  f"(missing {missing[:5]}, unexpected {extra[:5]})")
        for name, value in stored.items():
            expected = model.params[name]
            if value.shape != expected.shape or value.dtype != expected.dtype:
                raise CheckpointError(f"checkpoint {path}: optimizer moment '{key}' of {name} has shape "
                                      f"{value.shape} and dtype {value.dtype}, expected {expected.shape} "
                                      f"{expected.dtype}")
            if not np.all(np.isfinite(value)):
                raise CheckpointError(f"checkpoint {path}: optimizer moment '{key}' of {name} contains NaN or Inf")
        state[key] = stored
    return state


def load_checkpoint(path, expected_config=None):
    """Read a checkpoint (training or model-only) and validate all of it; returns a TrainingState.

    expected_config: an LMConfig the stored one must equal (e.g. the model a resumed run asks for);
    a difference raises CheckpointError listing the fields that differ.
    """
    from minilm.model import LM
    path = resolve_path(path)
    arrays = read_archive(path)
    cfg = config_from_arrays(arrays, path)
    if expected_config is not None:
        differences = config_differences(cfg, expected_config)
        if differences:
            raise CheckpointError(f"checkpoint {path} holds a different model than requested "
                                  f"(stored != requested: {'; '.join(differences)})")
    model = load_params_into(LM(cfg, seed=0), arrays, path)
    if "__train__" not in arrays:
        return TrainingState(model, 0, None, None, None, {})
    try:
        meta = json.loads(str(arrays["__train__"]))
        step = meta["step"]
        optimizer_meta, rng_state = meta["optimizer"], meta["rng"]
        train_config, stats = meta["train_config"], meta["stats"]
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid training record: {err!r}") from None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {path}: step must be an int >= 0, got {step!r}")
    optimizer = None if optimizer_meta is None else load_optimizer_state(model, arrays, optimizer_meta, path)
    if rng_state is not None:
        generator_from_state(rng_state)                     # validate now rather than at first use
    return TrainingState(model, step, optimizer, rng_state, train_config, stats)
