"""bench/ncu_summary.py: the digest of an Nsight Compute raw page, on a page cut down by hand."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import ncu_summary  # noqa: E402

RAW = """[1011] python3.12@127.0.0.1
  _make_forward_kernel::forward_kernel[v2,cw51](Array<float, 3, C, mutable, aligned>) (192, 4, 1)x(128, 1, 1), Context 1
  Metric Name                                                         Metric Unit Metric Value
  ------------------------------------------------------------------- ----------- ------------
  gpu__time_duration.sum                                                       us       438.98
  l1tex__data_pipe_lsu_wavefronts_mem_shared.sum                                     38,707,485
  smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio           inst         0.41
  smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio  inst         1.68
  smsp__average_warps_issue_stalled_sleeping_per_issue_active.ratio          inst            0
  outer_kernel[v2,cw51](Array<float, 4, C, mutable, aligned>) (256, 1, 32)x(256, 1, 1), Context 1
  Metric Name                                                         Metric Unit Metric Value
  gpu__time_duration.sum                                                       us       239.20
"""


def test_each_kernel_gets_its_metrics_and_its_stalls_largest_first():
    found = ncu_summary.kernels(RAW)
    assert [name for name, _ in found] == ["forward_kernel", "outer_kernel"]
    forward = found[0][1]
    assert forward["gpu__time_duration.sum"] == "438.98"
    assert forward["l1tex__data_pipe_lsu_wavefronts_mem_shared.sum"] == "38,707,485"
    text = ncu_summary.summary(*found[0])
    assert "short_scoreboard 1.68, barrier 0.41" in text and "sleeping" not in text
    assert found[1][1] == {"gpu__time_duration.sum": "239.20"}
