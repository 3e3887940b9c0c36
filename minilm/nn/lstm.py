"""LSTM block (schedule letter S): an LSTM as the token mixer of a pre-norm residual block.

    z_t = x_t W_x + h_{t-1} W_h + b                        gates i, f, g, o   (minilm.ops.lstm)
    c_t = f * c_{t-1} + i * g,    h_t = o * tanh(c_t)      hidden size = D
    y_t = h_t W_out

Choice: the S block is laid out like the A block — norm -> LSTM -> out_proj -> residual, then
norm -> MLP -> residual — so that "S" versus "A" changes only the token mixer. out_proj lets the
branch's output scale be learned (h_t is confined to (-1, 1)) and carries the residual-branch init
scaling of every other block.

Parameters: lstm.Wx (D, 4D), lstm.Wh (D, 4D), lstm.b (4D,), out_proj.W (D, D).
Initialization: Wx, Wh ~ U(+-1/sqrt(D)) (PyTorch's nn.LSTM default); b = 0 except the forget gate
block, which is 1 so the cell remembers by default at the start of training.

Decoding state: (h, c), each (B, D): FIXED in size; a step is O(D^2) whatever the position.
Training is sequential over time (no parallel form exists: the map h_{t-1} -> h_t is not
associative), which is the wall the other recurrent families remove.

Shapes legend: B batch, T time, D model width (also the LSTM hidden size).
"""
import numpy as np

from minilm.nn.params import Layer, linear_weight, uniform, zeros
from minilm.ops import linear
from minilm.ops import lstm as lstm_op


class LSTM(Layer):
    """Single-layer LSTM mixer with an output projection."""

    def __init__(self, cfg, out_gain=1.0):
        super().__init__(cfg)
        self.d_model = cfg.d_model
        self.out_gain = out_gain

    def init_params(self, rng):
        D = self.d_model
        bias = zeros((4 * D,), self.dtype)
        bias[D:2 * D] = 1.0                                    # forget gate block (order i, f, g, o)
        return {
            "lstm.Wx": uniform(rng, (D, 4 * D), 1.0 / np.sqrt(D), self.dtype),
            "lstm.Wh": uniform(rng, (D, 4 * D), 1.0 / np.sqrt(D), self.dtype),
            "lstm.b": bias,
            "out_proj.W": linear_weight(rng, D, D, self.dtype, gain=self.out_gain),
        }

    def init_state(self, batch_size):
        return {"h": np.zeros((batch_size, self.d_model), dtype=self.dtype),
                "c": np.zeros((batch_size, self.d_model), dtype=self.dtype)}

    def forward(self, p, x, initial_state=None, return_state=False):
        """x (B, T, D) -> y (B, T, D); with return_state also (h, c) after the last token."""
        cache = {}
        state_in = None if initial_state is None else (initial_state["h"], initial_state["c"])
        h, cache["lstm"] = lstm_op.forward(x, p["lstm.Wx"], p["lstm.Wh"], p["lstm.b"],
                                           initial_state=state_in, return_state=return_state)
        if return_state:
            h, (h_last, c_last) = h
        y, cache["out_proj"] = linear.forward(h, p["out_proj.W"])
        if return_state:
            return (y, {"h": h_last, "c": c_last}), cache
        return y, cache

    def backward(self, p, dy, cache):
        grads = {}
        dh, grads["out_proj.W"], _ = linear.backward(dy, cache["out_proj"])
        dx, grads["lstm.Wx"], grads["lstm.Wh"], grads["lstm.b"] = lstm_op.backward(dh, cache["lstm"])
        return dx, grads

    def step(self, p, x_t, state):
        """One token: x_t (B, D) -> y_t (B, D) from the fixed-size state (h, c)."""
        h, (h, c) = lstm_op.step(x_t, (state["h"], state["c"]), p["lstm.Wx"], p["lstm.Wh"], p["lstm.b"])
        return h @ p["out_proj.W"], {"h": h, "c": c}
