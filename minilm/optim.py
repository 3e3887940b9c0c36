"""AdamW with decoupled weight decay, global-norm gradient clipping, and a warmup + cosine schedule.

AdamW (Loshchilov & Hutter), as PyTorch's torch.optim.AdamW computes it. For every parameter p
with gradient g, at step t = 1, 2, ... and learning rate lr:

    p   <- p - lr * wd * p                         decoupled weight decay (only where decay applies)
    m   <- b1 * m + (1 - b1) * g                   first moment
    v   <- b2 * v + (1 - b2) * g^2                 second moment
    m^  =  m / (1 - b1^t)                          bias corrections
    v^  =  v / (1 - b2^t)
    p   <- p - lr * m^ / (sqrt(v^) + eps)

Which tensors decay (`decays`): projection matrices only. Norm gains, biases, Mamba's A_log and D,
RWKV's time_* vectors, convolution taps and the token embedding do not; the embedding does when
`decay_embeddings=True`.

Global-norm clipping: with ||g|| = sqrt(sum over every tensor of sum g^2), every gradient is scaled
by min(1, max_norm / ||g||), so the update keeps its direction.

Schedule (`lr_at`, steps counted from 0): a linear warmup to the peak over `warmup_steps` steps, then
a half cosine from the peak down to `min_lr` at `total_steps`, and `min_lr` after that.

The optimizer keeps its moments in dicts keyed by the parameter names of `model.params`, so its state
is saved and restored with the weights (`state_dict` / `load_state_dict`) and a resumed run continues
bit for bit.
"""
import math

import numpy as np

# Names end in the kind of tensor (minilm.nn.params): "W" a projection matrix, LSTM's "Wx" / "Wh".
DECAYED_LEAVES = ("W", "Wx", "Wh")
EMBEDDING_MARKERS = ("embed",)


def is_embedding(name):
    """True for the token embedding table (and any other table whose name says "embed")."""
    return any(marker in name.split(".")[0] for marker in EMBEDDING_MARKERS)


def decays(name, decay_embeddings=False):
    """Whether AdamW applies weight decay to the tensor called `name`.

    Decayed: projection matrices (names ending in .W, and the LSTM's .Wx / .Wh), and the embedding
    table when `decay_embeddings`. Not decayed: norm gains, biases, Mamba's A_log and D, RWKV's
    time_* vectors, convolution taps, and by default the embedding (which is tied to the output
    head). This is the same rule as LM.decay_mask.
    """
    if is_embedding(name):
        return bool(decay_embeddings)
    return name.rsplit(".", 1)[-1] in DECAYED_LEAVES


# ----------------------------------------------------------------------------------------------
# gradient clipping

def global_norm(grads):
    """sqrt(sum of squares of every gradient), accumulated in float64 in sorted name order
    (a fixed order keeps the result bit-identical from run to run)."""
    total = 0.0
    for name in sorted(grads):
        g = grads[name]
        total += float(np.sum(np.square(g, dtype=np.float64)))
    return math.sqrt(total)


def clip_grad_norm(grads, max_norm):
    """Scale every gradient in place by min(1, max_norm / ||g||). Returns ||g|| before clipping.

    max_norm None or <= 0 disables clipping (the norm is still returned, for logging).
    A non-finite norm is returned as is and nothing is scaled: the caller decides what to do.
    """
    norm = global_norm(grads)
    if max_norm is not None and max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= g.dtype.type(scale)
    return norm


# ----------------------------------------------------------------------------------------------
# learning-rate schedule

def lr_at(step, max_lr, warmup_steps, total_steps, min_lr=0.0):
    """Learning rate of step `step` (0-based).

        step < warmup_steps:      max_lr * (step + 1) / warmup_steps                 (linear warmup)
        warmup <= step < total:   min_lr + (max_lr - min_lr) * (1 + cos(pi * r)) / 2,
                                  r = (step - warmup_steps) / (total_steps - warmup_steps)
        step >= total_steps:      min_lr
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


# ----------------------------------------------------------------------------------------------
# AdamW

class AdamW:
    """AdamW over a dict of named parameters (see the module docstring for the update).

    params: {name: ndarray} (model.params); only the names and shapes are read here, `step` updates
    the arrays IN PLACE. The moments have each parameter's dtype (float32 or float64).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                 decay_embeddings=False):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.lr = float(lr)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.decay_embeddings = bool(decay_embeddings)
        self.names = sorted(params)
        self.decayed = {name: decays(name, decay_embeddings) for name in self.names}
        self.m = {name: np.zeros_like(params[name]) for name in self.names}
        self.v = {name: np.zeros_like(params[name]) for name in self.names}
        self.t = 0                                           # number of steps taken

    def step(self, params, grads, lr=None):
        """One AdamW update of every parameter, in place. lr overrides the constructor's lr."""
        lr = self.lr if lr is None else float(lr)
        missing = [name for name in self.names if name not in grads]
        if missing or set(params) != set(self.names):
            raise ValueError(f"AdamW.step: params/grads do not match the optimizer's names "
                             f"(missing gradients: {missing[:5]})")
        self.t += 1
        correction1 = 1.0 - self.beta1 ** self.t
        correction2 = 1.0 - self.beta2 ** self.t
        for name in self.names:
            p, g, m, v = params[name], grads[name], self.m[name], self.v[name]
            cast = p.dtype.type
            if self.decayed[name] and self.weight_decay:
                p *= cast(1.0 - lr * self.weight_decay)
            m *= cast(self.beta1)
            m += cast(1.0 - self.beta1) * g
            v *= cast(self.beta2)
            v += cast(1.0 - self.beta2) * np.square(g)
            denominator = np.sqrt(v / cast(correction2)) + cast(self.eps)
            p -= cast(lr / correction1) * m / denominator

    # the optimizer's state travels with checkpoints ----------------------------------------------
    def hyperparameters(self):
        return {"lr": self.lr, "betas": [self.beta1, self.beta2], "eps": self.eps,
                "weight_decay": self.weight_decay, "decay_embeddings": self.decay_embeddings}

    def state_dict(self):
        """{"t": int, "hyperparameters": dict, "m": {name: array}, "v": {name: array}} (arrays copied)."""
        return {"t": self.t, "hyperparameters": self.hyperparameters(),
                "m": {name: self.m[name].copy() for name in self.names},
                "v": {name: self.v[name].copy() for name in self.names}}

    def load_state_dict(self, state):
        """Restore moments and step count; names, shapes and dtypes must match the parameters."""
        for key in ("m", "v"):
            got = set(state[key])
            if got != set(self.names):
                extra, lacking = sorted(got - set(self.names)), sorted(set(self.names) - got)
                raise ValueError(f"optimizer state '{key}' does not match the parameters "
                                 f"(unexpected: {extra[:5]}, missing: {lacking[:5]})")
            for name in self.names:
                have, want = state[key][name], self.m[name]
                if have.shape != want.shape or have.dtype != want.dtype:
                    raise ValueError(f"optimizer state '{key}' of {name} must have shape {want.shape} "
                                     f"and dtype {want.dtype}, got {have.shape} {have.dtype}")
        self.t = int(state["t"])
        self.m = {name: np.array(state["m"][name], copy=True) for name in self.names}
        self.v = {name: np.array(state["v"][name], copy=True) for name in self.names}
