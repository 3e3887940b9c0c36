"""Test-suite set-up.

The CUDA kernels' tests (tests/cuda) run under Numba's CUDA simulator unless the caller sets
NUMBA_ENABLE_CUDASIM=0 on a machine with a GPU. It must be set before numba is first imported.

Hypothesis profiles: "dev" (default) and "ci" (selected when the CI variable is set). deadline=None
everywhere: the first call of a Numba kernel compiles it, which would blow any deadline.
"""
import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
