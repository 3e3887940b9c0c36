"""Softmax cross-entropy of logits against integer targets, averaged over the kept tokens.

For each token position n (any leading shape, flattened here to n) with logits z_n (V,) and
target y_n:

    m_n    = max_v z_nv                                                 (row max)
    s_n    = log(sum_v exp(z_nv - m_n))                                 (log-sum-exp of the shifted row)
    nll_n  = (m_n - z_{n, y_n}) + s_n                                   (= -log softmax(z_n)[y_n])
    keep_n = [y_n != ignore_index],   K = sum_n keep_n
    loss   = sum_n keep_n * nll_n / K

Backward (p_n = softmax(z_n) = exp((z_n - m_n) - s_n), e_y the one-hot row of the target):

    dz_n = dloss * keep_n * (p_n - e_{y_n}) / K

Subtracting the row max keeps every exponent <= 0, so logits of +-1e4 give a finite loss. m_n and
s_n are kept apart rather than added into one log-normalizer: at |z| ~ 1e4 a float32 sum m_n + s_n
would round s_n to ~1e-3 and spoil the probabilities. The loss is summed in float64 and returned as
a 0-d array of the logits dtype.

All-ignored batch: when no target is kept (K = 0, or there are no tokens at all) the loss is
defined as 0 and the gradient as 0 (PyTorch returns NaN for the mean over zero tokens instead).

The cache holds logits, m_n and s_n (one number each per token), the targets (ignored ones
replaced by 0) and the keep mask; softmax is recomputed in the backward from them.

Shapes legend: B batch, T time, V vocabulary size; "..." is any leading shape, typically (B, T).
"""
import numbers

import numpy as np

from minilm.ops._validate import as_float_array, as_int_array, check_shape


def shifted_logsumexp(logits):
    """Row max m and s = log(sum(exp(logits - m))) over the last axis, each (..., 1).

    logsumexp(logits) = m + s; log_softmax(logits) = (logits - m) - s.
    """
    row_max = np.max(logits, axis=-1, keepdims=True)
    with np.errstate(under="ignore"):   # exp of very negative shifted logits is 0 by design
        sum_exp = np.sum(np.exp(logits - row_max), axis=-1, keepdims=True)
    return row_max, np.log(sum_exp)


def check_targets(targets, vocab_size, ignore_index):
    """Every target must be ignore_index or a class index in [0, V). Returns the keep mask."""
    keep = targets != ignore_index
    bad = keep & ((targets < 0) | (targets >= vocab_size))
    if np.any(bad):
        examples = np.unique(targets[bad])[:5].tolist()
        raise ValueError(f"targets must be in [0, {vocab_size}) (V = {vocab_size}) or equal "
                         f"ignore_index = {ignore_index}, got {int(bad.sum())} invalid value(s), e.g. {examples}")
    return keep


def forward(logits, targets, ignore_index=-100):
    """Mean softmax cross-entropy over the targets that are not ignore_index.

    logits: (..., V) float32/float64, V >= 1.
    targets: (...) integers, each in [0, V) or equal to ignore_index.
    ignore_index: int; positions holding it add nothing to the loss nor to the count.
    Returns (loss, cache): loss is a 0-d array of logits' dtype (0 when every target is ignored);
    cache = {"logits", "row_max", "log_norm", "targets", "keep", "n_kept"}.
    """
    logits = as_float_array("logits", logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got shape {logits.shape}")
    targets = as_int_array("targets", targets)
    check_shape("targets", targets, logits.shape[:-1])
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    keep = check_targets(targets, logits.shape[-1], int(ignore_index))

    row_max, log_norm = shifted_logsumexp(logits)                  # (..., 1) each
    # Ignored positions may hold any value (e.g. -100); point them at class 0 so that
    # indexing is valid, the keep mask removes their contribution.
    safe_targets = np.where(keep, targets, 0)
    target_logit = np.take_along_axis(logits, safe_targets[..., None], axis=-1)
    nll = ((row_max - target_logit) + log_norm)[..., 0]            # (...)
    n_kept = int(np.count_nonzero(keep))
    total = np.sum(nll[keep], dtype=np.float64)
    loss = total / n_kept if n_kept > 0 else 0.0
    cache = {"logits": logits, "row_max": row_max, "log_norm": log_norm,
             "targets": safe_targets, "keep": keep, "n_kept": n_kept}
    return np.asarray(loss, dtype=logits.dtype), cache


def _as_scalar_grad(dloss, dtype):
    """dloss: a real number or a 0-d float array of the logits dtype."""
    if isinstance(dloss, np.ndarray):
        dloss = as_float_array("dloss", dloss, 0)
        if dloss.dtype != dtype:
            raise TypeError(f"dloss must have the same dtype as logits ({dtype}), got {dloss.dtype}")
        return float(dloss)
    if isinstance(dloss, bool) or not isinstance(dloss, numbers.Real):
        raise TypeError(f"dloss must be a real number or a 0-d array, got {type(dloss).__name__}")
    if not np.isfinite(dloss):
        raise ValueError(f"dloss must be finite, got {dloss}")
    return float(dloss)


def backward(dloss, cache):
    """Gradient given dloss = dL/dloss (a scalar). Returns (dlogits (..., V), None for targets)."""
    logits = cache["logits"]
    dloss = _as_scalar_grad(dloss, logits.dtype)
    n_kept = cache["n_kept"]
    if n_kept == 0:
        return np.zeros_like(logits), None

    with np.errstate(under="ignore"):
        dlogits = np.exp((logits - cache["row_max"]) - cache["log_norm"])   # softmax probabilities
    # p - onehot(target): subtract 1 at each row's target column.
    target_col = cache["targets"][..., None]
    np.put_along_axis(dlogits, target_col, np.take_along_axis(dlogits, target_col, axis=-1) - 1.0, axis=-1)
    dlogits *= dloss / n_kept
    dlogits[~cache["keep"]] = 0.0                                 # ignored rows get no gradient
    return dlogits, None
