"""How layers hold parameters, gradients and state (one small convention for every block).

A layer object holds only its hyper-parameters (sizes, options). Its parameters live in ONE flat
dict owned by the model, `model.params`, with dotted names such as "layers.0.mixer.in_proj.W".
Every layer method receives its own slice of that dict, `p`, whose keys are the *local* names
("in_proj.W"); gradients come back as a dict with the same local names. So

    p = subtree(model.params, "layers.0.mixer.")        # {"in_proj.W": array, ...}
    (y, cache) = layer.forward(p, x)
    dx, grads  = layer.backward(p, dy, cache)            # grads: {"in_proj.W": array, ...}

and there is no hidden ownership: replacing or updating an array in `model.params` (in place or
not) is seen by the next call. Names end in the kind of tensor: `W` a projection matrix stored
(Din, Dout) so that y = x @ W, `b` a bias, `w` the taps of a depthwise convolution, `weight` a
norm's gain; family-specific tensors keep their reference names (A_log, D, time_decay, ...).

Every layer (a token mixer, an MLP, an RWKV channel mix) follows the `Layer` interface below;
stateful decoding threads a per-layer `state` (a dict of arrays) through `step`. A layer whose
state grows with the sequence (softmax attention's KV cache) reports the bytes it adds per token.

Shapes legend: B batch, T time, D model width (d_model).
"""
import math

import numpy as np


class Layer:
    """The interface every layer implements (subclassing is for documentation and defaults).

    init_params(rng) -> {local name: array}        fresh parameters in the model dtype
    forward(p, x, initial_state=None, return_state=False)
        x (B, T, D) -> (y (B, T, D), cache), or ((y, final_state), cache) with return_state
    backward(p, dy, cache) -> (dx, {local name: gradient})
    init_state(batch_size) -> state                 the empty decoding state (dict of arrays)
    step(p, x_t, state) -> (y_t, new_state)         one token: x_t (B, D) -> y_t (B, D)
    state_bytes_per_token() -> int                  bytes the state grows by per token and sequence

    Gradients never flow into initial_state nor out of the returned state (as in the ops).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.dtype = np.dtype(cfg.dtype)

    def init_params(self, rng):
        raise NotImplementedError

    def forward(self, p, x, initial_state=None, return_state=False):
        raise NotImplementedError

    def backward(self, p, dy, cache):
        raise NotImplementedError

    def init_state(self, batch_size):
        return {}

    def step(self, p, x_t, state):
        raise NotImplementedError

    def state_bytes_per_token(self):
        return 0


# ----------------------------------------------------------------------------------------------
# name handling

def subtree(params, prefix):
    """{local name: array} for every name that starts with `prefix` (which ends with a dot)."""
    return {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}


def with_prefix(params, prefix):
    """The inverse of subtree: prepend `prefix` to every key."""
    return {prefix + name: value for name, value in params.items()}


def nbytes(tree):
    """Total bytes of every ndarray in a nested dict / list / tuple (other leaves count 0)."""
    if isinstance(tree, np.ndarray):
        return tree.nbytes
    if isinstance(tree, dict):
        return sum(nbytes(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(nbytes(value) for value in tree)
    return 0


# ----------------------------------------------------------------------------------------------
# initializers (all draw from one numpy Generator so a seed fixes the whole model)

def uniform(rng, shape, bound, dtype):
    """U(-bound, bound) in the given dtype."""
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def linear_weight(rng, fan_in, fan_out, dtype, gain=1.0):
    """W (fan_in, fan_out) ~ U(-gain/sqrt(fan_in), gain/sqrt(fan_in)): PyTorch's nn.Linear default
    (kaiming_uniform with a = sqrt(5)), the initialization the Mamba reference starts from."""
    return uniform(rng, (fan_in, fan_out), gain / math.sqrt(fan_in), dtype)


def normal(rng, shape, std, dtype):
    """N(0, std^2) in the given dtype."""
    return (std * rng.standard_normal(size=shape)).astype(dtype)


def ones(shape, dtype):
    return np.ones(shape, dtype=dtype)


def zeros(shape, dtype):
    return np.zeros(shape, dtype=dtype)
