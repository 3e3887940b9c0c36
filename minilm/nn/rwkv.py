"""RWKV-4 block (schedule letter R): time mixing (WKV) and channel mixing, both with token shift.

Token shift: every sublayer mixes each input with the previous token's input, per channel,

    shift(x)_t = x_{t-1}   (x_{-1} = the carried state, zeros at the start)         token_shift
    mix(x, mu) = mu * x + (1 - mu) * shift(x)

Time mixing (replaces attention):

    k = mix(x, mu_k) W_k,   v = mix(x, mu_v) W_v,   r = mix(x, mu_r) W_r           (B, T, D)
    wkv_t = ( sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t )
          / ( sum_{i<t} e^{(t-1-i) w + k_i}     + e^{u + k_t}     )                 minilm.ops.wkv
    w = -exp(time_decay)  (so the decay e^w is in (0, 1)),   u = time_first (bonus of the current token)
    y = (sigmoid(r) * wkv) W_o

Channel mixing (replaces the MLP), with F = mlp_ratio * D:

    k = relu(mix(x, mu_k) W_k)^2      (B, T, F)
    y = sigmoid(mix(x, mu_r) W_r) * (k W_v)

Parameters. time mixing: time_decay, time_first, time_mix_k, time_mix_v, time_mix_r (D,);
key.W, value.W, receptance.W, output.W (D, D). channel mixing: time_mix_k, time_mix_r (D,);
key.W (D, F), value.W (F, D), receptance.W (D, D).

Initialization (RWKV-4's), for layer l of L and channel i of D, with r0 = l / (L - 1) and
r1 = 1 - l / L: time_decay_i = -5 + 8 (i / (D-1))^(0.7 + 1.3 r0); time_first_i = log 0.3 +
0.5 ((i+1) mod 3 - 1); time_mix_k = (i/D)^r1, time_mix_v = (i/D)^r1 + 0.3 r0,
time_mix_r = (i/D)^(r1/2); channel mixing time_mix_k = time_mix_r = (i/D)^r1. Projections use the
uniform default of every block, and output.W / the channel mix's value.W are scaled by
1/sqrt(number of residual branches). Differences from RWKV-4, shared by all families here: RMSNorm
instead of LayerNorm, and no extra norm after the embedding.

Decoding state: time mixing keeps the previous input x_prev (B, D) and the WKV state
(a, b, p) (B, D) each (the running-max form of numerator, denominator and exponent); channel mixing
keeps its own x_prev (B, D). All FIXED in size; a step is O(D^2) whatever the position.

Shapes legend: B batch, T time, D model width, F channel-mix hidden width.
"""
import numpy as np

from minilm.nn.params import Layer, linear_weight
from minilm.ops import linear, wkv
from minilm.ops.silu import sigmoid


def token_shift(x, x_last):
    """shift(x)_t = x_{t-1}: (B, T, D), with x_last (B, D) (or None for zeros) in front."""
    first = np.zeros_like(x[:, :1]) if x_last is None else x_last[:, None, :]
    return np.concatenate([first, x[:, :-1]], axis=1)


def token_shift_backward(dshifted):
    """Gradient of token_shift w.r.t. x: dx_t = dshift_{t+1}; the first row went to the state."""
    dx = np.zeros_like(dshifted)
    dx[:, :-1] = dshifted[:, 1:]
    return dx


def mix(x, shifted, mu):
    """mu * x + (1 - mu) * shifted."""
    return mu * x + (1.0 - mu) * shifted


def mix_backward(dmixed, x, shifted, mu):
    """Returns (dx, dshifted, dmu) for mix(x, shifted, mu)."""
    dmu = np.sum(dmixed * (x - shifted), axis=tuple(range(dmixed.ndim - 1)))
    return dmixed * mu, dmixed * (1.0 - mu), dmu


def _layer_ratios(layer_index, n_layers):
    """RWKV-4's r0 = l/(L-1) (0 -> 1) and r1 = 1 - l/L (1 -> almost 0)."""
    r0 = layer_index / (n_layers - 1) if n_layers > 1 else 0.0
    r1 = 1.0 - layer_index / n_layers
    return r0, r1


class TimeMix(Layer):
    """RWKV-4 time mixing: token shift, k/v/r projections, WKV, receptance gate, output."""

    def __init__(self, cfg, layer_index, out_gain=1.0):
        super().__init__(cfg)
        self.d_model = cfg.d_model
        self.layer_index, self.n_layers = layer_index, cfg.n_layers
        self.out_gain = out_gain

    def init_params(self, rng):
        D = self.d_model
        r0, r1 = _layer_ratios(self.layer_index, self.n_layers)
        i = np.arange(D, dtype=np.float64)
        frac = i / D
        decay_speed = -5.0 + 8.0 * (i / max(D - 1, 1)) ** (0.7 + 1.3 * r0)
        zigzag = 0.5 * (((i + 1) % 3) - 1)
        return {
            "time_decay": decay_speed.astype(self.dtype),
            "time_first": (np.log(0.3) + zigzag).astype(self.dtype),
            "time_mix_k": (frac ** r1).astype(self.dtype),
            "time_mix_v": (frac ** r1 + 0.3 * r0).astype(self.dtype),
            "time_mix_r": (frac ** (0.5 * r1)).astype(self.dtype),
            "key.W": linear_weight(rng, D, D, self.dtype),
            "value.W": linear_weight(rng, D, D, self.dtype),
            "receptance.W": linear_weight(rng, D, D, self.dtype),
            "output.W": linear_weight(rng, D, D, self.dtype, gain=self.out_gain),
        }

    def init_state(self, batch_size):
        zeros = np.zeros((batch_size, self.d_model), dtype=self.dtype)
        # a = b = 0 marks an empty WKV state (the op then ignores p)
        return {"x_prev": zeros, "a": zeros.copy(), "b": zeros.copy(), "p": zeros.copy()}

    def forward(self, p, x, initial_state=None, return_state=False):
        """x (B, T, D) -> y (B, T, D); with return_state also x_prev and the WKV state."""
        cache = {"x": x}
        shifted = token_shift(x, None if initial_state is None else initial_state["x_prev"])
        cache["shifted"] = shifted
        k, cache["key"] = linear.forward(mix(x, shifted, p["time_mix_k"]), p["key.W"])
        v, cache["value"] = linear.forward(mix(x, shifted, p["time_mix_v"]), p["value.W"])
        r, cache["receptance"] = linear.forward(mix(x, shifted, p["time_mix_r"]), p["receptance.W"])

        w = -np.exp(p["time_decay"])
        cache["w"] = w
        wkv_state = None if initial_state is None else (initial_state["a"], initial_state["b"], initial_state["p"])
        out, cache["wkv"] = wkv.forward(w, p["time_first"], k, v, initial_state=wkv_state,
                                        return_state=return_state)
        if return_state:
            out, (a, b, pp) = out
        gate = sigmoid(r)
        cache["gate"], cache["wkv_out"] = gate, out
        y, cache["output"] = linear.forward(gate * out, p["output.W"])
        if return_state:
            return (y, {"x_prev": x[:, -1].copy(), "a": a, "b": b, "p": pp}), cache
        return y, cache

    def backward(self, p, dy, cache):
        grads = {}
        x, shifted, gate, out = cache["x"], cache["shifted"], cache["gate"], cache["wkv_out"]
        dgated, grads["output.W"], _ = linear.backward(dy, cache["output"])
        dout = dgated * gate
        dr = dgated * out * gate * (1.0 - gate)                  # sigmoid' = s (1 - s)

        dw, grads["time_first"], dk, dv = wkv.backward(dout, cache["wkv"])
        grads["time_decay"] = dw * cache["w"]                    # w = -exp(time_decay)  =>  dw/dtd = w

        dx = np.zeros_like(x)
        dshifted = np.zeros_like(x)
        for name, d_proj in (("key", dk), ("value", dv), ("receptance", dr)):
            dmixed, grads[f"{name}.W"], _ = linear.backward(d_proj, cache[name])
            mu_name = "time_mix_" + name[0]
            dx_part, dshift_part, grads[mu_name] = mix_backward(dmixed, x, shifted, p[mu_name])
            dx += dx_part
            dshifted += dshift_part
        return dx + token_shift_backward(dshifted), grads

    def step(self, p, x_t, state):
        """One token: x_t (B, D) -> y_t (B, D) from the fixed-size state (x_prev, a, b, p)."""
        x_prev = state["x_prev"]
        k = mix(x_t, x_prev, p["time_mix_k"]) @ p["key.W"]
        v = mix(x_t, x_prev, p["time_mix_v"]) @ p["value.W"]
        r = mix(x_t, x_prev, p["time_mix_r"]) @ p["receptance.W"]
        out, (a, b, pp) = wkv.step(-np.exp(p["time_decay"]), p["time_first"], k, v,
                                   (state["a"], state["b"], state["p"]))
        y_t = (sigmoid(r) * out) @ p["output.W"]
        return y_t, {"x_prev": x_t, "a": a, "b": b, "p": pp}


class ChannelMix(Layer):
    """RWKV-4 channel mixing: token shift, squared-ReLU key, value, receptance gate."""

    def __init__(self, cfg, layer_index, out_gain=1.0):
        super().__init__(cfg)
        self.d_model = cfg.d_model
        self.d_hidden = cfg.mlp_ratio * cfg.d_model
        self.layer_index, self.n_layers = layer_index, cfg.n_layers
        self.out_gain = out_gain

    def init_params(self, rng):
        D, F = self.d_model, self.d_hidden
        _, r1 = _layer_ratios(self.layer_index, self.n_layers)
        frac = np.arange(D, dtype=np.float64) / D
        return {
            "time_mix_k": (frac ** r1).astype(self.dtype),
            "time_mix_r": (frac ** r1).astype(self.dtype),
            "key.W": linear_weight(rng, D, F, self.dtype),
            "value.W": linear_weight(rng, F, D, self.dtype, gain=self.out_gain),
            "receptance.W": linear_weight(rng, D, D, self.dtype),
        }

    def init_state(self, batch_size):
        return {"x_prev": np.zeros((batch_size, self.d_model), dtype=self.dtype)}

    def forward(self, p, x, initial_state=None, return_state=False):
        cache = {"x": x}
        shifted = token_shift(x, None if initial_state is None else initial_state["x_prev"])
        cache["shifted"] = shifted
        k_pre, cache["key"] = linear.forward(mix(x, shifted, p["time_mix_k"]), p["key.W"])
        k = np.maximum(k_pre, 0) ** 2
        kv, cache["value"] = linear.forward(k, p["value.W"])
        r, cache["receptance"] = linear.forward(mix(x, shifted, p["time_mix_r"]), p["receptance.W"])
        gate = sigmoid(r)
        cache.update(k_pre=k_pre, kv=kv, gate=gate)
        y = gate * kv
        if return_state:
            return (y, {"x_prev": x[:, -1].copy()}), cache
        return y, cache

    def backward(self, p, dy, cache):
        grads = {}
        x, shifted, gate, kv, k_pre = cache["x"], cache["shifted"], cache["gate"], cache["kv"], cache["k_pre"]
        dkv = dy * gate
        dr = dy * kv * gate * (1.0 - gate)
        dk, grads["value.W"], _ = linear.backward(dkv, cache["value"])
        dk_pre = dk * 2.0 * np.maximum(k_pre, 0)                  # d relu(x)^2 / dx = 2 relu(x)

        dx = np.zeros_like(x)
        dshifted = np.zeros_like(x)
        for name, d_proj, mu_name in (("key", dk_pre, "time_mix_k"), ("receptance", dr, "time_mix_r")):
            dmixed, grads[f"{name}.W"], _ = linear.backward(d_proj, cache[name])
            dx_part, dshift_part, grads[mu_name] = mix_backward(dmixed, x, shifted, p[mu_name])
            dx += dx_part
            dshifted += dshift_part
        return dx + token_shift_backward(dshifted), grads

    def step(self, p, x_t, state):
        x_prev = state["x_prev"]
        k = np.maximum(mix(x_t, x_prev, p["time_mix_k"]) @ p["key.W"], 0) ** 2
        r = mix(x_t, x_prev, p["time_mix_r"]) @ p["receptance.W"]
        return sigmoid(r) * (k @ p["value.W"]), {"x_prev": x_t}
