"""The position-wise MLP of a pre-norm block (GPT-2 style, without biases).

    h = GELU(x W_fc1)          x (B, T, D), W_fc1 (D, F)      F = mlp_ratio * D
    y = h W_fc2                W_fc2 (F, D)

Parameters: fc1.W (D, F), fc2.W (F, D). No state: a token never looks at another token here, so
`step` is the same computation on one row and the decoding state is empty.

Shapes legend: B batch, T time, D model width, F hidden width.
"""
from minilm.nn.params import Layer, linear_weight
from minilm.ops import gelu, linear


class MLP(Layer):
    """fc1 -> GELU (tanh form) -> fc2."""

    def __init__(self, cfg, out_gain=1.0):
        super().__init__(cfg)
        self.d_model = cfg.d_model
        self.d_hidden = cfg.mlp_ratio * cfg.d_model
        self.out_gain = out_gain          # scales fc2's init (residual-branch rescaling)

    def init_params(self, rng):
        return {
            "fc1.W": linear_weight(rng, self.d_model, self.d_hidden, self.dtype),
            "fc2.W": linear_weight(rng, self.d_hidden, self.d_model, self.dtype, gain=self.out_gain),
        }

    def forward(self, p, x, initial_state=None, return_state=False):
        """x (..., D) -> y (..., D). The state, if asked for, is the empty dict."""
        pre, fc1_cache = linear.forward(x, p["fc1.W"])
        hidden, gelu_cache = gelu.forward(pre)
        y, fc2_cache = linear.forward(hidden, p["fc2.W"])
        cache = {"fc1": fc1_cache, "gelu": gelu_cache, "fc2": fc2_cache}
        return ((y, {}) if return_state else y), cache

    def backward(self, p, dy, cache):
        dhidden, dW2, _ = linear.backward(dy, cache["fc2"])
        (dpre,) = gelu.backward(dhidden, cache["gelu"])
        dx, dW1, _ = linear.backward(dpre, cache["fc1"])
        return dx, {"fc1.W": dW1, "fc2.W": dW2}

    def step(self, p, x_t, state):
        """x_t (B, D) -> y_t (B, D); the state stays empty."""
        (y_t, _), _ = self.forward(p, x_t, return_state=True)
        return y_t, state
