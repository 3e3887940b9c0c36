"""Sampling text from a model: prefill the prompt in parallel, then one `step` per new token.

    logits, state = model.prefill(prompt)                 parallel (training) form, returns the state
    repeat max_new_tokens times:
        token  = sample(logits[:, -1] / temperature, top_k)
        logits, state = model.step(token, state)          KV cache (A) or fixed-size state (L G M R S)

Sampling (`sample_next`): divide the logits by the temperature, keep the top_k largest (the rest
get probability 0), softmax with the max subtracted, draw with a numpy Generator seeded by `seed`
(so a seed gives the same text every time). temperature = 0 means greedy (argmax).

Cost per new token: A layers read their whole KV cache, O(t D) per layer at position t; the other
families touch only their state, O(1) in t.

Shapes legend: B batch, T time, V vocabulary size.
"""
import numbers

import numpy as np


def _check_options(max_new_tokens, temperature, top_k, vocab_size):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= top_k:
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        top_k = min(int(top_k), vocab_size)
    return int(max_new_tokens), float(temperature), top_k


def sample_next(logits, rng, temperature=1.0, top_k=None):
    """One token per row from logits (B, V): returns int64 (B,).

    temperature 0 -> argmax; otherwise softmax(logits / temperature) restricted to the top_k largest
    logits (ties at the k-th value are kept), sampled by inverse CDF with rng.random.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -top_k, axis=-1)[:, -top_k][:, None]      # k-th largest per row
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random((logits.shape[0], 1)) * cdf[:, -1:]
    choice = np.sum(cdf <= u, axis=-1)                     # first index whose cdf exceeds u
    # a zero-probability token can never be returned, even at a rounding edge of the cdf
    return np.minimum(choice, logits.shape[-1] - 1).astype(np.int64)


def generate(model, prompt_tokens, max_new_tokens, temperature=1.0, top_k=None, seed=None):
    """Continue prompt_tokens by max_new_tokens sampled tokens.

    prompt_tokens: int array (T,) or (B, T) with T >= 1.
    temperature: >= 0 (0 = greedy); top_k: None or an int >= 1; seed: int for a reproducible
    draw, None for fresh OS entropy.
    Returns the prompt followed by the new tokens, int64, (T + max_new_tokens,) or (B, T + max_new_tokens).
    """
    prompt = np.asarray(prompt_tokens)
    if not np.issubdtype(prompt.dtype, np.integer):
        raise TypeError(f"prompt_tokens must be integers, got dtype {prompt.dtype}")
    if prompt.ndim not in (1, 2) or prompt.shape[-1] == 0:
        raise ValueError(f"prompt_tokens must have shape (T,) or (B, T) with T >= 1, got {prompt.shape}")
    max_new_tokens, temperature, top_k = _check_options(max_new_tokens, temperature, top_k,
                                                        model.cfg.vocab_size)
    batched = prompt.reshape(-1, prompt.shape[-1]).astype(np.int64)
    rng = np.random.default_rng(seed)

    new_tokens = []
    if max_new_tokens > 0:
        logits, state = model.prefill(batched)
        next_logits = logits[:, -1]
        for i in range(max_new_tokens):
            token = sample_next(next_logits, rng, temperature, top_k)
            new_tokens.append(token)
            if i + 1 < max_new_tokens:                     # the last token needs no step
                next_logits, state = model.step(token, state)

    out = np.concatenate([batched] + [t[:, None] for t in new_tokens], axis=1)
    return out[0] if prompt.ndim == 1 else out
