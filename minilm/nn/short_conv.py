"""Optional short causal convolution on a mixer's input ("token shift"), for A, L and G blocks.

    x'[t, d] = sum_{j=0}^{K-1} w[d, j] * x[t - K + 1 + j, d]        x (B, T, D), w (D, K)

Each channel mixes its own last K inputs, so every token sees a little of its predecessors before
the token mixer runs; this is the short convolution recurrent models get in the "Based recipe" and
in Mamba, and it helps associative recall. It is off by default (LMConfig.short_conv = 0).

Parameters: w (D, K), no bias. Initialization: the last tap (the current token) is 1 and the
others 0, so switching the convolution on does not change a freshly initialized model; the
earlier taps receive gradients from the first step on.

State for decoding: the last K-1 inputs, (B, K-1, D): a fixed size that does not grow.
Implemented by minilm.ops.conv1d (forward / step / backward).
"""
import numpy as np

from minilm.nn.params import Layer
from minilm.ops import conv1d


class ShortConv(Layer):
    """Depthwise causal convolution with K taps over the model width D."""

    def __init__(self, cfg, kernel_size):
        super().__init__(cfg)
        self.channels = cfg.d_model
        self.kernel_size = kernel_size

    def init_params(self, rng):
        w = np.zeros((self.channels, self.kernel_size), dtype=self.dtype)
        w[:, -1] = 1.0                               # identity at init
        return {"w": w}

    def init_state(self, batch_size):
        return np.zeros((batch_size, self.kernel_size - 1, self.channels), dtype=self.dtype)

    def forward(self, p, x, initial_state=None, return_state=False):
        """x (B, T, D) -> x' (B, T, D) [, state (B, K-1, D)]."""
        return conv1d.forward(x, p["w"], None, initial_state=initial_state, return_state=return_state)

    def backward(self, p, dy, cache):
        dx, dw, _ = conv1d.backward(dy, cache)
        return dx, {"w": dw}

    def step(self, p, x_t, state):
        """x_t (B, D) -> (x'_t (B, D), new state (B, K-1, D))."""
        return conv1d.step(x_t, state, p["w"])
