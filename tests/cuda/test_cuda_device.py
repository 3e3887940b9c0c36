"""The device helpers the CUDA wrappers share: accumulators carved from one allocation, the cached
zeros that stand in for optional inputs (they must never be written by a kernel), and the memory pool.

Runs on a GPU or under the CUDA simulator (see conftest.py); the memory pool's checks run in a
process of their own without the simulator (_memory_pool_checks.py says why).
"""
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

_device = pytest.importorskip("minilm.kernels.cuda._device")
from minilm.kernels.cuda import linear_attention as cuda_la  # noqa: E402
from minilm.kernels.cuda import selective_scan as cuda_scan  # noqa: E402


def test_zeros_together_gives_separate_zeroed_views():
    shapes = [(2, 3), (4,), (1, 2, 2), (0,)]
    views = _device.zeros_together(shapes, np.float32)
    assert [tuple(view.shape) for view in views] == shapes
    assert all(np.all(view.copy_to_host() == 0) for view in views)
    _device.fill(views[1], 7.0)
    assert np.all(views[1].copy_to_host() == 7)
    assert np.all(views[0].copy_to_host() == 0) and np.all(views[2].copy_to_host() == 0)


def test_placeholders_are_cached_per_shape_and_dtype():
    first = _device.placeholder((1, 1, 1), np.float32)
    assert _device.placeholder((1, 1, 1), np.float32) is first
    assert _device.placeholder((1, 1, 1), np.float64) is not first
    assert _device.placeholder((3,), np.float32) is not first
    assert np.all(first.copy_to_host() == 0)


def test_kernels_leave_placeholders_untouched(monkeypatch):
    """Forward and backward of both ops with every optional input left out, twice: the zeros that
    stood in for those inputs are still zeros, and the second run agrees with the first."""
    rng = np.random.default_rng(0)
    B, T, D, N = 1, 5, 2, 3
    u, delta = rng.standard_normal((2, B, T, D)).astype(np.float32)
    A = -np.exp(rng.standard_normal((D, N))).astype(np.float32)
    Bm, Cm = rng.standard_normal((2, B, T, N)).astype(np.float32)
    q, k, v = rng.standard_normal((3, 1, 1, T, 3)).astype(np.float32)
    small = replace(cuda_scan.CONFIGS["float32"], channels=2, state_threads=2, states_per_thread=2,
                    fwd_segments=2, fwd_steps=2, bwd_segments=2, bwd_steps=2)
    monkeypatch.setitem(cuda_scan.CONFIGS, "float32", small)
    monkeypatch.setitem(cuda_la.TILES, "float32", 4)
    results = []
    for _ in range(2):
        out, cache = cuda_scan.forward(u, delta, A, Bm, Cm)
        scan_grads = cuda_scan.backward(np.ones_like(out), cache)
        la_out, la_cache = cuda_la.forward(q, k, v)
        la_grads = cuda_la.backward(np.ones_like(la_out), la_cache)
        results.append([out, la_out, *[g for g in scan_grads + la_grads if g is not None]])
    assert _device._PLACEHOLDERS
    for _, array in _device._PLACEHOLDERS.values():
        assert np.all(array.copy_to_host() == 0)
    for first, second in zip(*results):
        np.testing.assert_array_equal(first, second)


MEMORY_POOL_CHECKS = ["check_freed_buffer_is_reused", "check_buffer_in_use_is_not_lent",
                      "check_views_keep_the_buffer", "check_size_classes",
                      "check_release_drops_idle_buffers_only", "check_out_of_memory_releases_then_retries"]


@pytest.fixture(scope="module")
def memory_pool_report():
    """{check name: "ok" or "FAILED <why>"} from one run of _memory_pool_checks.py."""
    script = os.path.join(os.path.dirname(__file__), "_memory_pool_checks.py")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    report = {}
    for line in done.stdout.splitlines():
        name, _, verdict = line.partition(" ")
        report[name] = verdict
    assert done.returncode == 0 and report, f"the checks did not run: {done.stderr[-2000:]}"
    return report


@pytest.mark.parametrize("check", MEMORY_POOL_CHECKS)
def test_memory_pool(memory_pool_report, check):
    assert set(memory_pool_report) == set(MEMORY_POOL_CHECKS)
    assert memory_pool_report[check] == "ok", memory_pool_report[check]


def test_memory_pool_setting_is_ignored_by_the_simulator(monkeypatch):
    """use_memory_pool(): without a device (the simulator) arrays still come from Numba, and work."""
    if not _device.simulator_enabled():
        pytest.skip("a real device: the pool is in use there (bench/gpu_check.py checks it)")
    from minilm.kernels.cuda import use_memory_pool
    monkeypatch.setattr(_device, "MEMORY_POOL", False)
    assert use_memory_pool() is False and _device.MEMORY_POOL is True
    assert use_memory_pool(True) is True
    array = _device.to_device("x", np.arange(6, dtype=np.float32))
    out = _device.empty((2, 3), np.float32)
    _device.fill(out, 1.5)
    np.testing.assert_array_equal(array.copy_to_host(), np.arange(6))
    assert np.all(out.copy_to_host() == 1.5) and not _device._POOLS


def test_host_wrappers_run_in_one_context(monkeypatch):
    """in_one_context: on a device the wrapped host function runs inside one ensure_context block,
    entered once and left on return and on error (a stand-in runtime records it here); under the
    simulator it is a plain call. The kernels' forward and backward are wrapped."""
    import contextlib
    import importlib
    events = []

    class Runtime:
        @contextlib.contextmanager
        def ensure_context(self):
            events.append("enter")
            try:
                yield
            finally:
                events.append("exit")

    def work(x):
        events.append("work")
        if x < 0:
            raise ValueError("x")
        return 2 * x

    wrapped = _device.in_one_context(work)
    monkeypatch.setattr(_device, "simulator_enabled", lambda: True)
    assert wrapped(3) == 6 and events == ["work"]
    events.clear()
    monkeypatch.setattr(_device, "simulator_enabled", lambda: False)
    devices = importlib.import_module("numba.cuda.cudadrv.devices")
    monkeypatch.setattr(devices, "_runtime", Runtime(), raising=False)
    assert wrapped(3) == 6 and events == ["enter", "work", "exit"]
    events.clear()
    with pytest.raises(ValueError):
        wrapped(-1)
    assert events == ["enter", "work", "exit"]
    for module in (cuda_la, cuda_scan):
        assert module.forward.__wrapped__ and module.backward.__wrapped__
