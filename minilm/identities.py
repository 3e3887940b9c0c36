"""The identities the O(N^2)-vs-O(N) debate rests on, checked numerically on random inputs.

Each check returns (claim, max abs difference, tolerance). `minilm check` prints them; the test
suite proves the same identities more thoroughly with hypothesis. The checks run the NumPy
reference (backend="numpy"), the code the equations in docs/ point to.
"""
import numpy as np

from minilm.ops import attention, linear_attention, selective_scan


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def associativity(rng, T=256, d=32):
    """Non-causal linear attention: (Q Kᵀ) V — a T×T matrix, O(T²d) — equals Q (Kᵀ V) — a d×d matrix, O(Td²)."""
    q, k, v = (rng.standard_normal((1, 1, T, d)) for _ in range(3))
    quadratic = (q[0, 0] @ k[0, 0].T) @ v[0, 0]
    out, _ = linear_attention.forward(q, k, v, causal=False, backend="numpy")
    return "(QKᵀ)V == Q(KᵀV)", _max_diff(quadratic, out[0, 0]), 1e-9


def linear_attention_modes(rng, T=100, d=8):
    """Causal linear attention: masked parallel (O(T²)) == recurrent d×d state (O(T)) == chunked."""
    q, k, v = (rng.standard_normal((2, 2, T, d)) for _ in range(3))
    log_decay = -rng.uniform(0.0, 0.5, size=(2, 2, T))
    outs = [linear_attention.forward(q, k, v, mode=m, chunk_size=16, feature_map="elu1",
                                     normalize=True, log_decay=log_decay, backend="numpy")[0]
            for m in ("parallel", "recurrent", "chunked")]
    return "linear attention: parallel == recurrent == chunked (decay, normalized)", \
        max(_max_diff(outs[0], o) for o in outs[1:]), 1e-9


def scan_modes(rng, T=100, D=6, N=4):
    """Selective scan: sequential recurrence == associative (parallel) scan == chunked scan."""
    u, delta = rng.standard_normal((2, T, D)), rng.standard_normal((2, T, D))
    A = -np.exp(rng.standard_normal((D, N)))
    Bm, Cm = rng.standard_normal((2, T, N)), rng.standard_normal((2, T, N))
    outs = [selective_scan.forward(u, delta, A, Bm, Cm, delta_softplus=True, mode=m, chunk_size=16,
                                     backend="numpy")[0]
            for m in ("recurrent", "parallel", "chunked")]
    return "selective scan: recurrent == parallel == chunked", max(_max_diff(outs[0], o) for o in outs[1:]), 1e-9


def carried_state(rng, T=90, split=37, d=8):
    """Processing a prompt in one pass equals processing it in two pieces and carrying the fixed-size state."""
    q, k, v = (rng.standard_normal((1, 2, T, d)) for _ in range(3))
    full, _ = linear_attention.forward(q, k, v, mode="recurrent", backend="numpy")
    (first, state), _ = linear_attention.forward(q[:, :, :split], k[:, :, :split], v[:, :, :split],
                                                 mode="chunked", return_state=True, backend="numpy")
    second, _ = linear_attention.forward(q[:, :, split:], k[:, :, split:], v[:, :, split:],
                                         mode="recurrent", initial_state=state, backend="numpy")
    return "state carried across a split == one pass", _max_diff(full, np.concatenate([first, second], axis=2)), 1e-9


def attention_causality(rng, T=64, d=16):
    """Causal softmax attention: the output for a prefix does not depend on later tokens."""
    q, k, v = (rng.standard_normal((1, 2, T, d)) for _ in range(3))
    full, _ = attention.forward(q, k, v, backend="numpy")
    prefix, _ = attention.forward(q[:, :, :T // 2], k[:, :, :T // 2], v[:, :, :T // 2], backend="numpy")
    return "softmax attention is causal (prefix output unchanged)", _max_diff(full[:, :, :T // 2], prefix), 1e-12


CHECKS = (associativity, linear_attention_modes, scan_modes, carried_state, attention_causality)


def run_all(seed=0):
    rng = np.random.default_rng(seed)
    return [check(rng) for check in CHECKS]
