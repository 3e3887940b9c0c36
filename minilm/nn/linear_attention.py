"""Linear attention blocks: L (plain) and G (gated: a data-dependent decay per head and token).

Both share one layout; G only adds the decay gate:

    x' = ShortConv(x)   (optional, LMConfig.short_conv > 0; identity otherwise)
    q = x' W_q,  k = x' W_k,  v = x' W_v                     H heads of size Dh = D / H
    g_t = log sigmoid(x'_t W_g + b_g)     (G only)           (B, H, T), per head and token, g <= 0
    S_t = exp(g_t) S_{t-1} + phi(k_t)^T v_t                  phi = elu + 1; g = 0 for L
    o_t = phi(q_t) S_t                                       minilm.ops.linear_attention
    o_t <- RMSNorm(o_t) over Dh, per head                    weight out_norm.weight (Dh,)
    y = merge_heads(o) W_o

Choices, and why:
- Feature map elu+1 (Katharopoulos et al. 2020): positive, so phi(q).phi(k) > 0, and it keeps a
  gradient for negative inputs (unlike relu).
- No denominator; an output RMSNorm instead (TransNormer's NormAttention, and the default of fla's
  LinearAttention layer). The unnormalized output grows with t (S sums t outer products), and the
  normalized form sum_s phi(q)phi(k_s) v_s / sum_s phi(q)phi(k_s) has gradients that blow up where the
  denominator is small; a norm on the output fixes the scale without either problem. Because the
  norm divides out any overall scale, scale = 1 is used.
- G's gate: log sigmoid keeps every decay exp(g) in (0, 1); one scalar per head and token (the
  "simple GLA" / Mamba-2 granularity), so the op's state stays (B, H, Dh, Dh). The gate bias is
  initialized RetNet-style, sigmoid(b_g[h]) = 1 - 2^(-5-h) (memory horizons 32, 64, 128, ... tokens),
  and W_g like any projection, so decays start near 1 and can move with the input.
- L and G use the same feature map and output norm so that they differ only by the decay.

The output normalization is a choice, LMConfig.linear_norm (to compare them; the default is the
first):
    "rmsnorm"       o_t <- RMSNorm(o_t) per head, as above
    "denominator"   o_t <- o_t / (phi(q_t) . z_t + EPS),  z_t = exp(g_t) z_{t-1} + phi(k_t)
                    (Katharopoulos et al.; the op's normalize=True, EPS = minilm.ops.linear_attention.EPS)
    "both"          the denominator, then the RMSNorm
    "none"          o_t as is: it grows with t, which is what makes the unnormalized form hard to train
Without "rmsnorm" there is no out_norm.weight; with the denominator the state also holds z (B, H, Dh).

Parameters: q_proj.W, k_proj.W, v_proj.W, out_proj.W (D, D); out_norm.weight (Dh,) (rmsnorm, both);
G also gate_proj.W (D, H), gate_proj.b (H,); short_conv.w (D, K) if enabled.

Decoding state: S (B, H, Dh, Dh) (plus the short convolution's K-1 inputs): a FIXED size, D * Dh
numbers per sequence whatever the length; each step is O(D Dh), independent of t (`step` below
never touches past tokens).

Shapes legend: B batch, T time, H heads, Dh head dim, D = H Dh model width.
"""
import numpy as np

from minilm.nn.attention import merge_heads, qkv_backward, qkv_forward, split_heads
from minilm.nn.params import Layer, linear_weight, ones, subtree, with_prefix
from minilm.nn.short_conv import ShortConv
from minilm.ops import linear, rmsnorm
from minilm.ops import linear_attention as la_op
from minilm.ops.silu import sigmoid

FEATURE_MAP = "elu1"
LINEAR_NORMS = ("rmsnorm", "denominator", "both", "none")     # LMConfig.linear_norm, default first


def log_sigmoid(z):
    """log sigmoid(z) = min(z, 0) - log(1 + e^{-|z|}), without overflow; always <= 0."""
    return np.minimum(z, 0) - np.log1p(np.exp(-np.abs(z)))


def log_sigmoid_backward(dg, z):
    """d/dz log sigmoid(z) = 1 - sigmoid(z) = sigmoid(-z)."""
    return dg * sigmoid(-z)


class LinearAttention(Layer):
    """Schedule letter L (gated=False) and, through GatedLinearAttention, G (gated=True)."""

    gated = False

    def __init__(self, cfg, out_gain=1.0):
        super().__init__(cfg)
        self.d_model = cfg.d_model
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.chunk_size = cfg.chunk_size
        self.norm_eps = cfg.norm_eps
        self.backend = cfg.backend
        self.out_gain = out_gain
        self.conv = ShortConv(cfg, cfg.short_conv) if cfg.short_conv else None
        linear_norm = getattr(cfg, "linear_norm", LINEAR_NORMS[0])
        self.use_out_norm = linear_norm in ("rmsnorm", "both")
        self.use_denominator = linear_norm in ("denominator", "both")

    def init_params(self, rng):
        D, H = self.d_model, self.n_heads
        p = {
            "q_proj.W": linear_weight(rng, D, D, self.dtype),
            "k_proj.W": linear_weight(rng, D, D, self.dtype),
            "v_proj.W": linear_weight(rng, D, D, self.dtype),
            "out_proj.W": linear_weight(rng, D, D, self.dtype, gain=self.out_gain),
        }
        if self.use_out_norm:
            p["out_norm.weight"] = ones((self.head_dim,), self.dtype)
        if self.gated:
            p["gate_proj.W"] = linear_weight(rng, D, H, self.dtype)
            decay = 1.0 - 2.0 ** (-5.0 - np.arange(H))                # RetNet's per-head decays
            p["gate_proj.b"] = np.log(decay / (1.0 - decay)).astype(self.dtype)   # logit(decay)
        if self.conv is not None:
            p.update(with_prefix(self.conv.init_params(rng), "short_conv."))
        return p

    def init_state(self, batch_size):
        state = {"S": np.zeros((batch_size, self.n_heads, self.head_dim, self.head_dim), dtype=self.dtype)}
        if self.use_denominator:
            state["z"] = np.zeros((batch_size, self.n_heads, self.head_dim), dtype=self.dtype)
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch_size)
        return state

    # -- the gate (G only) ------------------------------------------------------------------------

    def gate_forward(self, p, x_in):
        """g = log sigmoid(x' W_g + b_g): (B, T, D) -> (B, H, T), and the cache for the backward."""
        z, proj_cache = linear.forward(x_in, p["gate_proj.W"], p["gate_proj.b"])
        return log_sigmoid(z).transpose(0, 2, 1), {"proj": proj_cache, "z": z}

    def gate_backward(self, dg, cache):
        dz = log_sigmoid_backward(dg.transpose(0, 2, 1), cache["z"])
        dx_in, dW, db = linear.backward(dz, cache["proj"])
        return dx_in, dW, db

    # -- parallel (training / prefill) form ----------------------------------------------------------

    def forward(self, p, x, initial_state=None, return_state=False):
        """x (B, T, D) -> y (B, T, D), using the op's chunked form; with return_state also the
        state after the last token."""
        cache = {}
        x_in, q_flat, k_flat, v_flat, conv_state = qkv_forward(self, p, x, initial_state, cache)
        log_decay = None
        if self.gated:
            log_decay, cache["gate"] = self.gate_forward(p, x_in)

        op_state = None
        if initial_state is not None:
            op_state = (initial_state["S"], initial_state["z"]) if self.use_denominator else initial_state["S"]
        out, cache["la"] = la_op.forward(
            split_heads(q_flat, self.n_heads), split_heads(k_flat, self.n_heads), split_heads(v_flat, self.n_heads),
            causal=True, mode="chunked", chunk_size=self.chunk_size, feature_map=FEATURE_MAP,
            normalize=self.use_denominator, log_decay=log_decay, initial_state=op_state,
            return_state=return_state, backend=self.backend)
        if return_state:
            out, op_state = out
        o_norm = out
        if self.use_out_norm:
            o_norm, cache["out_norm"] = rmsnorm.forward(out, p["out_norm.weight"], self.norm_eps)
        y, cache["out_proj"] = linear.forward(merge_heads(o_norm), p["out_proj.W"])
        if not return_state:
            return y, cache
        state = {"S": op_state[0], "z": op_state[1]} if self.use_denominator else {"S": op_state}
        if self.conv is not None:
            state["conv"] = conv_state
        return (y, state), cache

    def backward(self, p, dy, cache):
        grads = {}
        do_norm, grads["out_proj.W"], _ = linear.backward(dy, cache["out_proj"])
        dout = split_heads(do_norm, self.n_heads)
        if self.use_out_norm:
            dout, grads["out_norm.weight"] = rmsnorm.backward(dout, cache["out_norm"])
        la_grads = la_op.backward(dout, cache["la"])
        dq, dk, dv = la_grads[:3]
        dx_gate = None
        if self.gated:
            dx_gate, grads["gate_proj.W"], grads["gate_proj.b"] = self.gate_backward(la_grads[3], cache["gate"])
        dx = qkv_backward(self, p, merge_heads(dq), merge_heads(dk), merge_heads(dv), cache, grads, dx_in=dx_gate)
        return dx, grads

    # -- recurrent (decoding) form -------------------------------------------------------------------

    def step(self, p, x_t, state):
        """One token: x_t (B, D) -> y_t (B, D). Reads and writes only the fixed-size state.

            S <- exp(g_t) S + phi(k_t)^T v_t,    o_t = phi(q_t) S,    y_t = RMSNorm(o_t) W_o

        (with the denominator also z <- exp(g_t) z + phi(k_t) and o_t <- o_t / (phi(q_t).z + EPS);
        without the RMSNorm y_t = o_t W_o)
        """
        B = x_t.shape[0]
        H, Dh = self.n_heads, self.head_dim
        new_state = {}
        x_in = x_t
        if self.conv is not None:
            x_in, new_state["conv"] = self.conv.step(subtree(p, "short_conv."), x_t, state["conv"])

        q = (x_in @ p["q_proj.W"]).reshape(B, H, Dh)
        k = (x_in @ p["k_proj.W"]).reshape(B, H, Dh)
        v = (x_in @ p["v_proj.W"]).reshape(B, H, Dh)
        phi_q = la_op.apply_feature_map(q, FEATURE_MAP)
        phi_k = la_op.apply_feature_map(k, FEATURE_MAP)

        S = state["S"]
        z = state.get("z")
        if self.gated:
            decay = np.exp(log_sigmoid(x_in @ p["gate_proj.W"] + p["gate_proj.b"]))       # (B, H)
            S = decay[:, :, None, None] * S
            if z is not None:
                z = decay[:, :, None] * z
        S = S + phi_k[:, :, :, None] * v[:, :, None, :]              # rank-1 update phi(k)^T v
        o = np.einsum("bhf,bhfd->bhd", phi_q, S)
        if self.use_denominator:
            z = z + phi_k
            o = o / (np.einsum("bhf,bhf->bh", phi_q, z)[:, :, None] + la_op.EPS)
            new_state["z"] = z
        if self.use_out_norm:
            o, _ = rmsnorm.forward(o, p["out_norm.weight"], self.norm_eps)
        y_t = o.reshape(B, H * Dh) @ p["out_proj.W"]
        new_state["S"] = S
        return y_t, new_state


class GatedLinearAttention(LinearAttention):
    """Schedule letter G: LinearAttention with the data-dependent decay gate switched on."""

    gated = True
