"""The language model: embedding -> one residual block per schedule letter -> RMSNorm -> head.

    x_0     = E[tokens]                                    embed.weight E (V, D)
    x_{l+1} = Block_l(x_l)                                 letter l of the schedule (minilm.nn.block)
    logits  = RMSNorm(x_L) E^T   (tied)  or  RMSNorm(x_L) W_head (untied, head.W (D, V))

Schedule letters: A softmax attention, L linear attention, G gated linear attention, M Mamba,
R RWKV-4, S LSTM. "AAAA" is a Transformer, "MMMM" a Mamba, "MMMA" a Jamba-style hybrid.

Parameters and gradients are two flat dicts with the same keys, `model.params` and `model.grads`,
named like "layers.0.mixer.in_proj.W". `backward` OVERWRITES model.grads (each array is set to the
gradient of this call, in place; nothing accumulates across calls), so one forward + backward gives
exactly the gradient of that batch.

Three ways to run the model:
    forward(tokens) -> (logits, cache); backward(dlogits, cache)       training (parallel form)
    prefill(tokens, state=None) -> (logits, state)                     parallel form that returns the state
    step(tokens_t, state) -> (logits_t, state)                         one token with the cache / state

A layers keep a KV cache that grows by 2 D numbers per token; L, G, M, R, S layers keep a state
whose size does not depend on the length. `state_bytes(state)` reports bytes per layer.

Shapes legend: B batch, T time, D d_model, V vocab_size.
"""
import dataclasses
import json
import math

import numpy as np

from minilm.nn.block import FAMILIES, ResidualBlock, residual_branches
from minilm.nn.linear_attention import LINEAR_NORMS
from minilm.nn.params import linear_weight, nbytes, normal, ones, subtree, with_prefix
from minilm.ops import embedding, linear, rmsnorm
from minilm.ops._backend import BACKENDS
from minilm.ops._validate import as_int_array

DTYPES = ("float32", "float64")


@dataclasses.dataclass
class LMConfig:
    """Every hyper-parameter of a model. The defaults make a small byte-level model."""

    # -- the stack -------------------------------------------------------------------------------
    vocab_size: int = 256              # V; 256 = byte-level tokens
    d_model: int = 128                 # D, the residual stream width
    schedule: str = "AAAA"             # one letter per layer: A L G M R S (see the module docstring)
    n_layers: int = None               # defaults to len(schedule); if given it must equal it
    dtype: str = "float32"             # "float32" or "float64" (gradient checks), end to end
    backend: str = "auto"              # kernels for attention / linear attention / scan: auto|numpy|numba|cuda
    tie_embeddings: bool = True        # head = E^T (as Mamba's and GPT-2's LMs); False adds head.W (D, V)
    norm_eps: float = 1e-5             # RMSNorm epsilon (blocks and the final norm)
    embed_std: float = 0.02            # embedding init N(0, embed_std^2)
    mlp_ratio: int = 4                 # MLP / RWKV channel-mix hidden width = mlp_ratio * D

    # -- attention-like blocks (A, L, G) --------------------------------------------------------------
    n_heads: int = 4                   # H; head dim D / H (must be even for A's RoPE)
    rope_base: float = 10000.0         # RoPE base frequency (A)
    short_conv: int = 0                # K > 0: depthwise causal conv of K taps on the A/L/G mixer input
    chunk_size: int = 64               # chunk length of the chunked linear-attention and scan forms (L, G, M)
    linear_norm: str = "rmsnorm"       # L/G output: "rmsnorm" (per-head RMSNorm), "denominator" (divide by
                                       # phi(q).z), "both", or "none" (raw phi(q) S); see minilm.nn.linear_attention

    # -- Mamba (M), the reference's defaults ------------------------------------------------------------
    d_state: int = 16                  # N
    d_conv: int = 4                    # K of the causal conv
    expand: int = 2                    # E = expand * D inner channels
    dt_rank: object = "auto"           # R; "auto" = ceil(D / 16)
    dt_min: float = 0.001              # dt init: log-uniform in [dt_min, dt_max] ...
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4        # ... clamped below at dt_init_floor
    dt_scale: float = 1.0              # dt_proj.W ~ U(+-dt_scale / sqrt(R))

    def __post_init__(self):
        if self.n_layers is None and isinstance(self.schedule, str):
            self.n_layers = len(self.schedule)
        self.validate()

    def validate(self):
        """Raise ValueError naming the field for any inconsistent setting."""
        if not isinstance(self.schedule, str) or not self.schedule:
            raise ValueError(f"schedule must be a non-empty string of letters from {''.join(FAMILIES)}, "
                             f"got {self.schedule!r}")
        bad = sorted({c for c in self.schedule if c not in FAMILIES})
        if bad:
            raise ValueError(f"schedule has unknown letter(s) {', '.join(map(repr, bad))} in {self.schedule!r}; "
                             f"use " + ", ".join(f"{k} ({v})" for k, v in FAMILIES.items()))
        _check_int("n_layers", self.n_layers, 1)
        if self.n_layers != len(self.schedule):
            raise ValueError(f"n_layers must equal len(schedule) = {len(self.schedule)} for schedule "
                             f"{self.schedule!r}, got n_layers = {self.n_layers}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        for name in ("vocab_size", "d_model", "mlp_ratio", "n_heads", "chunk_size", "d_state", "d_conv",
                     "expand"):
            _check_int(name, getattr(self, name), 1)
        _check_int("short_conv", self.short_conv, 0)
        if self.linear_norm not in LINEAR_NORMS:
            raise ValueError(f"linear_norm must be one of {list(LINEAR_NORMS)}, got {self.linear_norm!r}")
        for name in ("norm_eps", "embed_std", "rope_base", "dt_min", "dt_max", "dt_init_floor", "dt_scale"):
            _check_positive_float(name, getattr(self, name))
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min must be <= dt_max, got dt_min = {self.dt_min}, dt_max = {self.dt_max}")
        if self.dt_rank != "auto":
            _check_int("dt_rank", self.dt_rank, 1)
        if set(self.schedule) & set("ALG") and self.d_model % self.n_heads:
            raise ValueError(f"n_heads must divide d_model = {self.d_model} (head dim = d_model / n_heads), "
                             f"got n_heads = {self.n_heads}")
        if "A" in self.schedule and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"n_heads must leave an even head dim for RoPE in A layers: d_model / n_heads = "
                             f"{self.d_model} / {self.n_heads} = {self.d_model // self.n_heads} is odd")

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d):
        """Build a config from a dict (e.g. read from a checkpoint); unknown keys are an error."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config has unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def _check_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def state_bytes(state):
    """Bytes held by a decoding state, one number per layer (sum it for the whole model)."""
    return [nbytes(layer_state) for layer_state in state["layers"]]


class LM:
    """A language model built from an LMConfig; see the module docstring."""

    def __init__(self, cfg, seed=0):
        if not isinstance(cfg, LMConfig):
            raise TypeError(f"cfg must be an LMConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.cfg = cfg
        self.dtype = np.dtype(cfg.dtype)
        branches = sum(residual_branches(letter) for letter in cfg.schedule)
        out_gain = 1.0 / math.sqrt(branches)          # prenorm residual rescaling of output projections
        self.layers = [ResidualBlock(letter, cfg, i, out_gain) for i, letter in enumerate(cfg.schedule)]

        rng = np.random.default_rng(seed)
        params = {"embed.weight": normal(rng, (cfg.vocab_size, cfg.d_model), cfg.embed_std, self.dtype)}
        for i, layer in enumerate(self.layers):
            params.update(with_prefix(layer.init_params(rng), f"layers.{i}."))
        params["norm_f.weight"] = ones((cfg.d_model,), self.dtype)
        if not cfg.tie_embeddings:
            params["head.W"] = linear_weight(rng, cfg.d_model, cfg.vocab_size, self.dtype)
        self.params = params
        self.grads = {name: np.zeros_like(value) for name, value in params.items()}

    # -- helpers ----------------------------------------------------------------------------------

    def layer_params(self, i):
        return subtree(self.params, f"layers.{i}.")

    def head_weight(self):
        """The (D, V) output matrix: E^T when tied, head.W otherwise."""
        return self.params["embed.weight"].T if self.cfg.tie_embeddings else self.params["head.W"]

    def _check_tokens(self, tokens, ndim, name):
        tokens = as_int_array(name, tokens, ndim)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            raise ValueError(f"{name} must lie in [0, vocab_size = {self.cfg.vocab_size}), "
                             f"got values from {tokens.min()} to {tokens.max()}")
        if ndim == 2 and tokens.shape[1] == 0:
            raise ValueError(f"{name} must have at least one time step, got shape {tokens.shape}")
        if tokens.shape[0] == 0:
            raise ValueError(f"{name} must have a batch size >= 1, got shape {tokens.shape}")
        return tokens

    def _head(self, x):
        """Final norm and output projection: x (..., D) -> logits (..., V), and the caches."""
        h, norm_cache = rmsnorm.forward(x, self.params["norm_f.weight"], self.cfg.norm_eps)
        logits, head_cache = linear.forward(h, self.head_weight())
        return logits, norm_cache, head_cache

    # -- training ---------------------------------------------------------------------------------

    def forward(self, tokens):
        """tokens (B, T) int in [0, V) -> (logits (B, T, V), cache for backward)."""
        logits, cache, _ = self._run(tokens, initial_state=None, return_state=False)
        return logits, cache

    def _run(self, tokens, initial_state, return_state):
        tokens = self._check_tokens(tokens, 2, "tokens")
        x, embed_cache = embedding.forward(tokens, self.params["embed.weight"])
        layer_caches, layer_states = [], []
        for i, layer in enumerate(self.layers):
            layer_state = None if initial_state is None else initial_state["layers"][i]
            x, layer_cache = layer.forward(self.layer_params(i), x, initial_state=layer_state,
                                           return_state=return_state)
            if return_state:
                x, layer_state = x
                layer_states.append(layer_state)
            layer_caches.append(layer_cache)
        logits, norm_cache, head_cache = self._head(x)
        cache = {"embed": embed_cache, "layers": layer_caches, "norm_f": norm_cache, "head": head_cache}
        state = None
        if return_state:
            start = 0 if initial_state is None else initial_state["position"]
            state = {"position": start + tokens.shape[1], "layers": layer_states}
        return logits, cache, state

    def backward(self, dlogits, cache):
        """dlogits = dL/dlogits (B, T, V) -> fills model.grads (OVERWRITES, in place) and returns it."""
        expected = cache["head"]["x"].shape[:-1] + (self.cfg.vocab_size,)
        if not isinstance(dlogits, np.ndarray) or dlogits.shape != expected:
            got = dlogits.shape if isinstance(dlogits, np.ndarray) else type(dlogits).__name__
            raise ValueError(f"dlogits must be an ndarray of shape {expected}, got {got}")
        if dlogits.dtype != self.dtype:
            raise TypeError(f"dlogits must have the model dtype {self.dtype}, got {dlogits.dtype}")

        grads = {}
        dh, dW_head, _ = linear.backward(dlogits, cache["head"])
        dx, grads["norm_f.weight"] = rmsnorm.backward(dh, cache["norm_f"])
        for i in reversed(range(len(self.layers))):
            dx, layer_grads = self.layers[i].backward(self.layer_params(i), dx, cache["layers"][i])
            grads.update(with_prefix(layer_grads, f"layers.{i}."))
        _, grads["embed.weight"] = embedding.backward(dx, cache["embed"])
        if self.cfg.tie_embeddings:
            grads["embed.weight"] = grads["embed.weight"] + dW_head.T     # E is used twice
        else:
            grads["head.W"] = dW_head

        missing = sorted(set(self.grads) - set(grads))
        if missing:
            raise RuntimeError(f"no gradient was computed for {missing}")
        for name, g in grads.items():
            np.copyto(self.grads[name], g, casting="same_kind")
        return self.grads

    # -- decoding ---------------------------------------------------------------------------------

    def init_state(self, batch_size):
        """The empty decoding state for batch_size sequences: {"position": 0, "layers": [...]}."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return {"position": 0, "layers": [layer.init_state(int(batch_size)) for layer in self.layers]}

    def prefill(self, tokens, state=None):
        """Run a prompt through the parallel (training) form and return the state after it.

        tokens (B, T) -> (logits (B, T, V), state). With `state`, the tokens continue that state
        (A layers attend to its KV cache, the others start from their carried state).
        """
        logits, _, state = self._run(tokens, initial_state=state, return_state=True)
        return logits, state

    def step(self, tokens_t, state):
        """One token per sequence: tokens_t (B,) -> (logits_t (B, V), new state).

        The input state is not modified. A layers append to their KV cache (cost grows with the
        position); every other layer updates its fixed-size state (cost independent of position).
        """
        tokens_t = self._check_tokens(tokens_t, 1, "tokens_t")
        if len(state["layers"]) != len(self.layers):
            raise ValueError(f"state has {len(state['layers'])} layers, the model {len(self.layers)}")
        x, _ = embedding.forward(tokens_t, self.params["embed.weight"])
        new_layers = []
        for i, layer in enumerate(self.layers):
            x, layer_state = layer.step(self.layer_params(i), x, state["layers"][i])
            new_layers.append(layer_state)
        logits, _, _ = self._head(x)
        return logits, {"position": state["position"] + 1, "layers": new_layers}

    def generate(self, prompt_tokens, max_new_tokens, temperature=1.0, top_k=None, seed=None):
        """Sample a continuation; see minilm.generate.generate."""
        from minilm.generate import generate
        return generate(self, prompt_tokens, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)

    def state_bytes(self, state):
        """Bytes of a decoding state per layer (a list); see the module function state_bytes."""
        return state_bytes(state)

    # -- reporting --------------------------------------------------------------------------------

    def param_counts(self):
        """Number of parameters per part: {"embed": n, "layers.0": n, ..., "norm_f": n[, "head": n]}."""
        counts = {}
        for name, value in self.params.items():
            part = ".".join(name.split(".")[:2]) if name.startswith("layers.") else name.split(".")[0]
            counts[part] = counts.get(part, 0) + value.size
        return counts

    def num_params(self):
        return sum(value.size for value in self.params.values())

    def layer_info(self):
        """One row per layer for reports: schedule letter, family, parameters, and decoding-state
        bytes for ONE sequence, split into a fixed part and a part per token of context.

        [{"layer": i, "letter": "M", "family": "Mamba", "params": n,
          "state_bytes_per_sequence": fixed, "state_bytes_per_token": grows}, ...]
        """
        counts = self.param_counts()
        rows = []
        for i, layer in enumerate(self.layers):
            rows.append({"layer": i, "letter": layer.letter, "family": layer.family,
                         "params": counts.get(f"layers.{i}", 0),
                         "state_bytes_per_sequence": nbytes(layer.init_state(1)),
                         "state_bytes_per_token": layer.state_bytes_per_token()})
        return rows

    def decay_mask(self):
        """{name: True if weight decay should apply}: projection matrices only (names ending in .W,
        and the LSTM's .Wx / .Wh, an untied head.W included); not norm gains, biases, A_log, D,
        RWKV's time_* vectors, convolution taps or the embedding."""
        return {name: name.rsplit(".", 1)[-1] in ("W", "Wx", "Wh") for name in self.params}

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, path):
        """Write weights and config to `path` atomically (minilm.checkpoint.save_model)."""
        from minilm.checkpoint import save_model
        save_model(path, self)

    @classmethod
    def load(cls, path):
        """Read a model written by save (minilm.checkpoint.load_model); validates everything."""
        from minilm.checkpoint import load_model
        return load_model(path)
