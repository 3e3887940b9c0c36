"""backend="numpy" | "numba" | "cuda" | "auto": the ops dispatch to their kernels and back.

The kernels' own tests compare them with the reference in depth; these check the wiring: the op
with a kernel backend returns the reference's values, its backward runs the kernel's backward, and
"auto" picks the Numba kernel only where it applies.
"""
import numpy as np
import pytest

from minilm.ops import attention, linear_attention, selective_scan
from minilm.ops._backend import BackendUnavailable, select_kernel


def close(a, b, tol=1e-10):
    return np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b)))


def scan_inputs(rng, B=2, T=9, D=3, N=2):
    return dict(u=rng.standard_normal((B, T, D)), delta=rng.standard_normal((B, T, D)),
                A=-np.exp(rng.standard_normal((D, N))), Bm=rng.standard_normal((B, T, N)),
                Cm=rng.standard_normal((B, T, N)), D=rng.standard_normal(D), z=rng.standard_normal((B, T, D)),
                delta_bias=rng.standard_normal(D), delta_softplus=True, chunk_size=4)


def qkv(rng, B=1, H=2, T=9, d=3):
    return [rng.standard_normal((B, H, T, d)) for _ in range(3)]


def both_backends(forward, backward, inputs, kernel_backend, **options):
    """(values, grads) of the reference and of the kernel backend for the same inputs."""
    results = []
    for backend in ("numpy", kernel_backend):
        out, cache = forward(*inputs, backend=backend, **options)
        assert ("backend" in cache) == (backend != "numpy")
        results.append((out, backward(np.ones_like(out), cache)))
    return results


@pytest.mark.parametrize("backend", ["numba", "cuda"])
def test_linear_attention_kernel_backends_match_the_reference(backend):
    q, k, v = qkv(np.random.default_rng(0))
    log_decay = -np.abs(np.random.default_rng(1).standard_normal((1, 2, 9)))
    (ref, ref_grads), (fast, fast_grads) = both_backends(
        linear_attention.forward, linear_attention.backward, (q, k, v), backend,
        feature_map="elu1", log_decay=log_decay, chunk_size=4)
    assert close(fast, ref)
    assert len(fast_grads) == len(ref_grads) == 4
    assert all(close(f, r) for f, r in zip(fast_grads, ref_grads))


@pytest.mark.parametrize("backend", ["numba", "cuda"])
def test_selective_scan_kernel_backends_match_the_reference(backend):
    inputs = scan_inputs(np.random.default_rng(2))
    results = []
    for name in ("numpy", backend):
        out, cache = selective_scan.forward(**inputs, backend=name)
        results.append((out, selective_scan.backward(np.ones_like(out), cache)))
    (ref, ref_grads), (fast, fast_grads) = results
    assert close(fast, ref)
    assert all(close(f, r) for f, r in zip(fast_grads, ref_grads))


def test_attention_numba_backend_matches_the_reference():
    q, k, v = qkv(np.random.default_rng(3), T=11)
    (ref, ref_grads), (fast, fast_grads) = both_backends(attention.forward, attention.backward, (q, k, v), "numba")
    assert close(fast, ref)
    assert all(close(f, r) for f, r in zip(fast_grads, ref_grads))


def test_auto_picks_numba_where_a_kernel_applies():
    assert select_kernel("auto", "attention").__name__ == "minilm.kernels.cpu.attention"
    assert select_kernel("auto", "selective_scan", mode="chunked").__name__ == "minilm.kernels.cpu.selective_scan"
    assert select_kernel("auto", "selective_scan", mode="recurrent") is None
    assert select_kernel("auto", "linear_attention", mode="chunked", causal=False, feature_map="identity",
                         normalize=False) is None
    assert select_kernel("auto", "linear_attention", mode="chunked", causal=True, feature_map="taylor2",
                         normalize=False) is None
    assert select_kernel("numpy", "attention") is None


def test_auto_falls_back_to_the_reference_silently():
    q, k, v = qkv(np.random.default_rng(4))
    out, cache = linear_attention.forward(q, k, v, feature_map="taylor2")
    assert "backend" not in cache
    assert close(out, linear_attention.forward(q, k, v, feature_map="taylor2", backend="numpy")[0])


def test_named_backend_that_cannot_run_says_why():
    q, k, v = qkv(np.random.default_rng(5))
    with pytest.raises(BackendUnavailable, match="no cuda kernel for attention"):
        attention.forward(q, k, v, backend="cuda")
    with pytest.raises(BackendUnavailable, match="mode='recurrent'"):
        linear_attention.forward(q, k, v, mode="recurrent", backend="numba")
    with pytest.raises(TypeError, match="backend must be a str"):
        attention.forward(q, k, v, backend=None)
