"""Mamba block (schedule letter M), as in the reference `mamba_simple.Mamba` (Mamba-1).

With E = expand * D inner channels, N = d_state, R = dt_rank, K = d_conv:

    [x, z]      = u W_in                                   in_proj.W (D, 2E)
    x           = SiLU(causal_conv(x) + b_conv)            conv1d.w (E, K), conv1d.b (E,)
    [dt, B, C]  = x W_x                                    x_proj.W (E, R + 2N), no bias
    delta       = dt W_dt                                  dt_proj.W (R, E); its bias is added in the scan
    A           = -exp(A_log)                              A_log (E, N)
    Δ_t         = softplus(delta_t + b_dt)                 dt_proj.b (E,)   (delta_bias, delta_softplus)
    h_t         = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t         ZOH for A, Euler for B, h (B, E, N)
    y_t         = C_t . h_t + D x_t                        D (E,)
    y_t         = y_t * SiLU(z_t)                          the gate
    out         = y W_out                                  out_proj.W (E, D)

The scan with its skip, gate, bias and softplus is minilm.ops.selective_scan; the convolution is
minilm.ops.conv1d. A Mamba layer has no MLP: the block is norm -> Mamba -> residual.

Initialization (the reference's):
- A_log[e, n] = log(n + 1): S4D-real, A = -(1, 2, ..., N) for every channel.
- D = 1.
- dt_proj.b = softplus^{-1}(dt) with dt = exp(U[log dt_min, log dt_max]) clamped to >= dt_init_floor;
  the inverse softplus is dt + log(-expm1(-dt)).
- dt_proj.W ~ U(-s, s), s = dt_scale / sqrt(R).
- in_proj, x_proj, out_proj, conv1d (weights and bias): PyTorch's defaults, U(+-1/sqrt(fan_in)),
  with fan_in = K for the depthwise convolution; out_proj is then scaled by 1/sqrt(number of residual
  branches), as the reference language model does for prenorm residual outputs.

Decoding state: conv (B, K-1, E), the last K-1 pre-convolution inputs (the reference keeps K and
rolls; the conv1d op keeps K-1), and ssm (B, E, N). Both are FIXED in size; a step costs
O(E (N + K + D)) whatever the position (`step` below never touches past tokens).

Shapes legend: B batch, T time, D model width, E inner channels, N state size, R dt rank, K taps.
"""
import math

import numpy as np

from minilm.nn.params import Layer, linear_weight, ones, uniform
from minilm.ops import conv1d, linear, selective_scan, silu


def inverse_softplus(y):
    """x with softplus(x) = y, for y > 0: x = y + log(1 - e^{-y})."""
    return y + np.log(-np.expm1(-y))


class Mamba(Layer):
    """The selective-SSM token mixer: in_proj, causal conv, SiLU, x_proj, dt_proj, scan, gate, out_proj."""

    def __init__(self, cfg, out_gain=1.0):
        super().__init__(cfg)
        self.d_model = cfg.d_model
        self.d_inner = cfg.expand * cfg.d_model
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.dt_rank = math.ceil(cfg.d_model / 16) if cfg.dt_rank == "auto" else cfg.dt_rank
        self.dt_min, self.dt_max = cfg.dt_min, cfg.dt_max
        self.dt_init_floor, self.dt_scale = cfg.dt_init_floor, cfg.dt_scale
        self.chunk_size = cfg.chunk_size
        self.backend = cfg.backend
        self.out_gain = out_gain

    def init_params(self, rng):
        D, E, N, R, K = self.d_model, self.d_inner, self.d_state, self.dt_rank, self.d_conv
        dt = np.exp(rng.uniform(math.log(self.dt_min), math.log(self.dt_max), size=E))
        dt = np.maximum(dt, self.dt_init_floor)
        return {
            "in_proj.W": linear_weight(rng, D, 2 * E, self.dtype),
            "conv1d.w": uniform(rng, (E, K), 1.0 / math.sqrt(K), self.dtype),
            "conv1d.b": uniform(rng, (E,), 1.0 / math.sqrt(K), self.dtype),
            "x_proj.W": linear_weight(rng, E, R + 2 * N, self.dtype),
            "dt_proj.W": uniform(rng, (R, E), self.dt_scale / math.sqrt(R), self.dtype),
            "dt_proj.b": inverse_softplus(dt).astype(self.dtype),
            "A_log": np.log(np.tile(np.arange(1, N + 1, dtype=np.float64), (E, 1))).astype(self.dtype),
            "D": ones((E,), self.dtype),
            "out_proj.W": linear_weight(rng, E, D, self.dtype, gain=self.out_gain),
        }

    def init_state(self, batch_size):
        return {"conv": np.zeros((batch_size, self.d_conv - 1, self.d_inner), dtype=self.dtype),
                "ssm": np.zeros((batch_size, self.d_inner, self.d_state), dtype=self.dtype)}

    def split_x_proj(self, dbc):
        """(..., R + 2N) -> dt (..., R), B (..., N), C (..., N)."""
        R, N = self.dt_rank, self.d_state
        return dbc[..., :R], dbc[..., R:R + N], dbc[..., R + N:]

    # -- parallel (training / prefill) form ----------------------------------------------------------

    def forward(self, p, u, initial_state=None, return_state=False):
        """u (B, T, D) -> out (B, T, D); with return_state also the conv and ssm states."""
        E = self.d_inner
        cache = {}
        xz, cache["in_proj"] = linear.forward(u, p["in_proj.W"])
        x, z = xz[..., :E], xz[..., E:]

        conv_state = None if initial_state is None else initial_state["conv"]
        (x_conv, conv_state), cache["conv1d"] = conv1d.forward(
            x, p["conv1d.w"], p["conv1d.b"], initial_state=conv_state, return_state=True)
        x_act, cache["silu"] = silu.forward(x_conv)

        dbc, cache["x_proj"] = linear.forward(x_act, p["x_proj.W"])
        dt, Bm, Cm = self.split_x_proj(dbc)
        delta, cache["dt_proj"] = linear.forward(dt, p["dt_proj.W"])     # the bias goes into the scan
        A = -np.exp(p["A_log"])
        cache["A"] = A

        scan_out, cache["scan"] = selective_scan.forward(
            x_act, delta, A, Bm, Cm, D=p["D"], z=z, delta_bias=p["dt_proj.b"], delta_softplus=True,
            mode="chunked", chunk_size=self.chunk_size,
            initial_state=None if initial_state is None else initial_state["ssm"],
            return_state=return_state, backend=self.backend)
        if return_state:
            y, ssm_state = scan_out
        else:
            y = scan_out
        out, cache["out_proj"] = linear.forward(y, p["out_proj.W"])
        if return_state:
            return (out, {"conv": conv_state, "ssm": ssm_state}), cache
        return out, cache

    def backward(self, p, dout, cache):
        grads = {}
        dy, grads["out_proj.W"], _ = linear.backward(dout, cache["out_proj"])
        (dx_scan, ddelta, dA, dBm, dCm, dD, dz, ddelta_bias) = selective_scan.backward(dy, cache["scan"])
        grads["D"], grads["dt_proj.b"] = dD, ddelta_bias
        grads["A_log"] = dA * cache["A"]                    # A = -exp(A_log)  =>  dA/dA_log = A

        ddt, grads["dt_proj.W"], _ = linear.backward(ddelta, cache["dt_proj"])
        ddbc = np.concatenate([ddt, dBm, dCm], axis=-1)
        dx_proj_in, grads["x_proj.W"], _ = linear.backward(ddbc, cache["x_proj"])
        dx_act = dx_scan + dx_proj_in                        # x_act feeds both the scan and x_proj

        (dx_conv,) = silu.backward(dx_act, cache["silu"])
        dx, grads["conv1d.w"], grads["conv1d.b"] = conv1d.backward(dx_conv, cache["conv1d"])
        du, grads["in_proj.W"], _ = linear.backward(np.concatenate([dx, dz], axis=-1), cache["in_proj"])
        return du, grads

    # -- recurrent (decoding) form -------------------------------------------------------------------

    def step(self, p, u_t, state):
        """One token, the reference's `step`: u_t (B, D) -> out_t (B, D), fixed-size state.

            x, z = split(u_t W_in);  x = SiLU(conv_step(x));  dt, B, C = split(x W_x)
            Δ = softplus(dt W_dt + b_dt);  h = exp(Δ A) h + Δ B x;  y = C.h + D x;  y *= SiLU(z)
        """
        E = self.d_inner
        xz = u_t @ p["in_proj.W"]
        x, z = xz[:, :E], xz[:, E:]
        x_conv, conv_state = conv1d.step(x, state["conv"], p["conv1d.w"], p["conv1d.b"])
        x_act = x_conv * silu.sigmoid(x_conv)

        dt, Bm, Cm = self.split_x_proj(x_act @ p["x_proj.W"])
        delta = selective_scan.softplus(dt @ p["dt_proj.W"] + p["dt_proj.b"])      # (B, E)
        A = -np.exp(p["A_log"])                                                    # (E, N)

        decay = np.exp(delta[:, :, None] * A)                                      # (B, E, N)
        h = decay * state["ssm"] + (delta * x_act)[:, :, None] * Bm[:, None, :]
        y = np.einsum("ben,bn->be", h, Cm) + p["D"] * x_act
        y = y * (z * silu.sigmoid(z))
        return y @ p["out_proj.W"], {"conv": conv_state, "ssm": h.astype(self.dtype, copy=False)}
