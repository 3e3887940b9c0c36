"""The CUDA kernel tests run where numba.cuda can run kernels: on a GPU, or on the CPU under Numba's
CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set before numba is first imported). Elsewhere every test in
this folder is skipped, with the reason.

Under the simulator each CUDA thread is a Python thread, so the tests shrink the kernels' block
shapes (the `small_blocks` fixtures in the test files) and use tiny inputs.
"""
import pytest


def _cuda_status():
    try:
        from minilm.kernels.cuda import _device
    except Exception as error:  # pragma: no cover - import problems show up as the skip reason
        return False, f"minilm.kernels.cuda cannot be imported: {error!r}"
    try:
        from numba import cuda
        if not cuda.is_available():
            return False, "numba.cuda is not available (no GPU; set NUMBA_ENABLE_CUDASIM=1 for the simulator)"
    except Exception as error:
        return False, f"numba.cuda is not available: {error!r}"
    return _device.available()


def pytest_collection_modifyitems(config, items):
    ok, reason = _cuda_status()
    if ok:
        return
    here = __file__.rsplit("/", 1)[0]
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Fill every output buffer with NaN before the kernels run: an element a kernel forgets to
    write then fails the comparison with the reference instead of passing on leftover memory."""
    from minilm.kernels.cuda import _device
    monkeypatch.setattr(_device, "POISON_OUTPUTS", True)
