"""One layer of the model: pre-norm residual branches around a token mixer (and an MLP).

    x = x + Mixer(RMSNorm(x))            "norm1", "mixer"
    x = x + FFN(RMSNorm(x))              "norm2", "mlp" or "channel_mix" (absent for M)

The schedule letter picks the mixer and the feed-forward part:

    letter  family                    mixer (module:class)                          feed-forward
    A       softmax attention         minilm.nn.attention:Attention                 MLP
    L       linear attention          minilm.nn.linear_attention:LinearAttention    MLP
    G       gated linear attention    minilm.nn.linear_attention:GatedLinearAttention  MLP
    M       Mamba                     minilm.nn.mamba:Mamba                         none (as in the reference)
    R       RWKV-4                    minilm.nn.rwkv:TimeMix                        RWKV channel mix
    S       LSTM                      minilm.nn.lstm:LSTM                           MLP

RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight (minilm.ops.rmsnorm), weight initialized to 1.

Backward runs the branches in reverse; the residual adds the branch's input gradient to the
gradient flowing through the skip path. Decoding threads one state per branch:
state = {"mixer": ..., "mlp" | "channel_mix": ...}.

Shapes legend: B batch, T time, D model width.
"""
from minilm.nn.attention import Attention
from minilm.nn.linear_attention import GatedLinearAttention, LinearAttention
from minilm.nn.lstm import LSTM
from minilm.nn.mamba import Mamba
from minilm.nn.mlp import MLP
from minilm.nn.params import ones, subtree, with_prefix
from minilm.nn.rwkv import ChannelMix, TimeMix
from minilm.ops import rmsnorm

FAMILIES = {
    "A": "softmax attention",
    "L": "linear attention",
    "G": "gated linear attention",
    "M": "Mamba",
    "R": "RWKV-4",
    "S": "LSTM",
}


def residual_branches(letter):
    """How many residual branches a layer of this family has (M: 1, the others: 2)."""
    return 1 if letter == "M" else 2


def make_branches(letter, cfg, layer_index, out_gain):
    """[(norm name, branch name, layer), ...] for one schedule letter."""
    if letter == "A":
        return [("norm1", "mixer", Attention(cfg, out_gain)), ("norm2", "mlp", MLP(cfg, out_gain))]
    if letter == "L":
        return [("norm1", "mixer", LinearAttention(cfg, out_gain)), ("norm2", "mlp", MLP(cfg, out_gain))]
    if letter == "G":
        return [("norm1", "mixer", GatedLinearAttention(cfg, out_gain)), ("norm2", "mlp", MLP(cfg, out_gain))]
    if letter == "M":
        return [("norm1", "mixer", Mamba(cfg, out_gain))]
    if letter == "R":
        return [("norm1", "mixer", TimeMix(cfg, layer_index, out_gain)),
                ("norm2", "channel_mix", ChannelMix(cfg, layer_index, out_gain))]
    if letter == "S":
        return [("norm1", "mixer", LSTM(cfg, out_gain)), ("norm2", "mlp", MLP(cfg, out_gain))]
    raise ValueError(f"schedule letter must be one of {sorted(FAMILIES)}, got {letter!r}")


class ResidualBlock:
    """A schedule letter turned into pre-norm residual branches. Parameters: see the module docstring."""

    def __init__(self, letter, cfg, layer_index, out_gain=1.0):
        self.letter = letter
        self.family = FAMILIES[letter]
        self.d_model = cfg.d_model
        self.norm_eps = cfg.norm_eps
        self.dtype = cfg.dtype
        self.branches = make_branches(letter, cfg, layer_index, out_gain)

    def init_params(self, rng):
        p = {}
        for norm_name, name, layer in self.branches:
            p[f"{norm_name}.weight"] = ones((self.d_model,), self.dtype)
            p.update(with_prefix(layer.init_params(rng), name + "."))
        return p

    def init_state(self, batch_size):
        return {name: layer.init_state(batch_size) for _, name, layer in self.branches}

    def state_bytes_per_token(self):
        return sum(layer.state_bytes_per_token() for _, _, layer in self.branches)

    def forward(self, p, x, initial_state=None, return_state=False):
        """x (B, T, D) -> (B, T, D); with return_state also the state after the last token."""
        caches, states = [], {}
        for norm_name, name, layer in self.branches:
            normed, norm_cache = rmsnorm.forward(x, p[f"{norm_name}.weight"], self.norm_eps)
            branch_state = None if initial_state is None else initial_state[name]
            out, layer_cache = layer.forward(subtree(p, name + "."), normed,
                                             initial_state=branch_state, return_state=return_state)
            if return_state:
                out, states[name] = out
            x = x + out
            caches.append((norm_cache, layer_cache))
        return ((x, states) if return_state else x), caches

    def backward(self, p, dx, caches):
        """dx = dL/d(output) (B, T, D) -> (dL/d(input), {local name: gradient})."""
        grads = {}
        for (norm_name, name, layer), (norm_cache, layer_cache) in zip(reversed(self.branches), reversed(caches)):
            dnormed, layer_grads = layer.backward(subtree(p, name + "."), dx, layer_cache)
            grads.update(with_prefix(layer_grads, name + "."))
            dx_norm, grads[f"{norm_name}.weight"] = rmsnorm.backward(dnormed, norm_cache)
            dx = dx + dx_norm                                  # skip path + branch path
        return dx, grads

    def step(self, p, x_t, state):
        """One token: x_t (B, D) -> (B, D), new state."""
        new_state = {}
        for norm_name, name, layer in self.branches:
            normed, _ = rmsnorm.forward(x_t, p[f"{norm_name}.weight"], self.norm_eps)
            out, new_state[name] = layer.step(subtree(p, name + "."), normed, state[name])
            x_t = x_t + out
        return x_t, new_state
