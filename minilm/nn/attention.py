"""Softmax attention block (schedule letter A): multi-head causal self-attention with RoPE.

    x' = ShortConv(x)   (optional, LMConfig.short_conv > 0; identity otherwise)
    q = x' W_q,  k = x' W_k,  v = x' W_v       split into H heads of size Dh = D / H
    q, k <- RoPE(q, pos), RoPE(k, pos)          rotary positions (below)
    o = softmax(q k^T / sqrt(Dh) + causal mask) v         minilm.ops.attention
    y = merge_heads(o) W_o

Rotary position embedding (RoPE, Su et al. 2021; the "rotate half" layout of GPT-NeoX/LLaMA): the
head dimension is split into halves (x1, x2) of size Dh/2, and pair i is rotated by the angle
pos * theta_i with theta_i = base^(-2i/Dh):

    RoPE(x)  = [x1 cos - x2 sin,  x1 sin + x2 cos]                  rope_rotate
    backward = the rotation by -angle: [dy1 cos + dy2 sin, -dy1 sin + dy2 cos]   rope_rotate_backward

so q_m . k_n depends only on m - n. Chosen over learned positions because it needs no maximum
length and is parameter-free. Dh must be even.

Parameters: q_proj.W, k_proj.W, v_proj.W (D, D); out_proj.W (D, D); short_conv.w (D, K) if enabled.

Decoding state (the KV cache): the rotated keys and the values of every token so far,
k, v (B, H, t, Dh), plus the short convolution's last K-1 inputs. It GROWS by 2 D numbers per
token, and each step reads all of it: O(t D) time per token. The position of a new token is the
cache length, so no separate counter is kept.

Shapes legend: B batch, T time, H heads, Dh head dim, D = H Dh model width.
"""
import numpy as np

from minilm.nn.params import Layer, linear_weight, subtree, with_prefix
from minilm.nn.short_conv import ShortConv
from minilm.ops import attention, linear


# ----------------------------------------------------------------------------------------------
# head layout

def split_heads(x, n_heads):
    """(B, T, D) -> (B, H, T, Dh)."""
    B, T, D = x.shape
    return x.reshape(B, T, n_heads, D // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, T, Dh) -> (B, T, D)."""
    B, H, T, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * Dh)


# ----------------------------------------------------------------------------------------------
# RoPE

def rope_angles(positions, head_dim, base, dtype):
    """cos, sin of pos * theta_i, each (T, Dh/2), for integer positions (T,)."""
    inv_freq = base ** (-np.arange(0, head_dim // 2, dtype=np.float64) * 2.0 / head_dim)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope_rotate(x, cos, sin):
    """Rotate each pair (x1_i, x2_i) by its angle. x (B, H, T, Dh), cos/sin (T, Dh/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def rope_rotate_backward(dy, cos, sin):
    """A rotation is orthogonal: its gradient is the rotation by the opposite angle."""
    half = dy.shape[-1] // 2
    dy1, dy2 = dy[..., :half], dy[..., half:]
    return np.concatenate([dy1 * cos + dy2 * sin, -dy1 * sin + dy2 * cos], axis=-1)


# ----------------------------------------------------------------------------------------------
# the input path of every attention-like mixer (A here, L and G in minilm.nn.linear_attention)

def qkv_forward(mixer, p, x, initial_state, cache):
    """x' = ShortConv(x) when the mixer has one (else x' = x), then q, k, v = x' W_q, x' W_k, x' W_v.

    x (B, T, D) -> (x', q, k, v, conv_state): four (B, T, D) arrays, and the convolution's last
    K-1 inputs (None without a convolution). Fills cache["conv"] and cache["q_proj" / "k_proj" / "v_proj"].
    """
    x_in, conv_state = x, None
    if mixer.conv is not None:
        conv_state = None if initial_state is None else initial_state["conv"]
        (x_in, conv_state), cache["conv"] = mixer.conv.forward(
            subtree(p, "short_conv."), x, initial_state=conv_state, return_state=True)
    q, cache["q_proj"] = linear.forward(x_in, p["q_proj.W"])
    k, cache["k_proj"] = linear.forward(x_in, p["k_proj.W"])
    v, cache["v_proj"] = linear.forward(x_in, p["v_proj.W"])
    return x_in, q, k, v, conv_state


def qkv_backward(mixer, p, dq, dk, dv, cache, grads, dx_in=None):
    """Backward of qkv_forward. dq, dk, dv (B, T, D); dx_in: any other gradient that reaches x'
    (G's gate), or None. Puts the projections' (and convolution's) gradients into grads; returns dx."""
    dx_q, grads["q_proj.W"], _ = linear.backward(dq, cache["q_proj"])
    dx_k, grads["k_proj.W"], _ = linear.backward(dk, cache["k_proj"])
    dx_v, grads["v_proj.W"], _ = linear.backward(dv, cache["v_proj"])
    dx = dx_q + dx_k + dx_v
    if dx_in is not None:
        dx = dx + dx_in
    if mixer.conv is not None:
        dx, conv_grads = mixer.conv.backward(subtree(p, "short_conv."), dx, cache["conv"])
        grads.update(with_prefix(conv_grads, "short_conv."))
    return dx


# ----------------------------------------------------------------------------------------------
# the block's token mixer

class Attention(Layer):
    """Causal multi-head softmax attention with RoPE and a KV cache for decoding."""

    def __init__(self, cfg, out_gain=1.0):
        super().__init__(cfg)
        self.d_model = cfg.d_model
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rope_base = cfg.rope_base
        self.backend = cfg.backend
        self.out_gain = out_gain
        self.conv = ShortConv(cfg, cfg.short_conv) if cfg.short_conv else None

    def init_params(self, rng):
        D = self.d_model
        p = {
            "q_proj.W": linear_weight(rng, D, D, self.dtype),
            "k_proj.W": linear_weight(rng, D, D, self.dtype),
            "v_proj.W": linear_weight(rng, D, D, self.dtype),
            "out_proj.W": linear_weight(rng, D, D, self.dtype, gain=self.out_gain),
        }
        if self.conv is not None:
            p.update(with_prefix(self.conv.init_params(rng), "short_conv."))
        return p

    def init_state(self, batch_size):
        empty = np.zeros((batch_size, self.n_heads, 0, self.head_dim), dtype=self.dtype)
        state = {"k": empty, "v": empty.copy()}
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch_size)
        return state

    def state_bytes_per_token(self):
        return 2 * self.d_model * self.dtype.itemsize          # one key and one value per token

    def forward(self, p, x, initial_state=None, return_state=False):
        """x (B, T, D) -> y (B, T, D). With initial_state (a KV cache of t0 tokens) the T new tokens
        sit at positions t0 .. t0+T-1 and attend to the cache as well; return_state gives the
        extended cache."""
        past = 0 if initial_state is None else initial_state["k"].shape[2]
        cache = {"past": past}
        _, q_flat, k_flat, v_flat, conv_state = qkv_forward(self, p, x, initial_state, cache)
        T = x.shape[1]
        cos, sin = rope_angles(np.arange(past, past + T), self.head_dim, self.rope_base, self.dtype)
        cache["cos"], cache["sin"] = cos, sin
        q = rope_rotate(split_heads(q_flat, self.n_heads), cos, sin)
        k = rope_rotate(split_heads(k_flat, self.n_heads), cos, sin)
        v = split_heads(v_flat, self.n_heads)
        if initial_state is not None:
            k = np.concatenate([initial_state["k"], k], axis=2)
            v = np.concatenate([initial_state["v"], v], axis=2)

        o, cache["attention"] = attention.forward(q, k, v, causal=True, backend=self.backend)
        y, cache["out_proj"] = linear.forward(merge_heads(o), p["out_proj.W"])
        if not return_state:
            return y, cache
        state = {"k": k, "v": v}
        if self.conv is not None:
            state["conv"] = conv_state
        return (y, state), cache

    def backward(self, p, dy, cache):
        grads = {}
        do, grads["out_proj.W"], _ = linear.backward(dy, cache["out_proj"])
        dq, dk, dv = attention.backward(split_heads(do, self.n_heads), cache["attention"])
        past = cache["past"]
        dk, dv = dk[:, :, past:], dv[:, :, past:]            # no gradient into the cache
        dq = rope_rotate_backward(dq, cache["cos"], cache["sin"])
        dk = rope_rotate_backward(dk, cache["cos"], cache["sin"])
        dx = qkv_backward(self, p, merge_heads(dq), merge_heads(dk), merge_heads(dv), cache, grads)
        return dx, grads

    def step(self, p, x_t, state):
        """One token with the KV cache: x_t (B, D) -> y_t (B, D); the cache grows by one token.

        This is the forward above with T = 1 and the cache as initial state: the new query attends
        to all t cached keys plus its own, O(t D) time.
        """
        (y, state), _ = self.forward(p, x_t[:, None, :], initial_state=state, return_state=True)
        return y[:, 0, :], state
