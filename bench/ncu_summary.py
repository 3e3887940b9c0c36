"""The few Nsight Compute metrics that say what holds a kernel, from a report's raw page.

    ncu --import report.ncu-rep --page raw > raw.log      (bench/gpu_run.sh writes ncu_<op>_raw.log)
    python bench/ncu_summary.py raw.log [more raw logs]

For each kernel of the report, one block: its duration, the warps' issue rate and occupancy, how
busy each pipe is (xu: exp2 and the other special functions; lsu: loads, stores, shuffles; fma,
alu), the L1 / shared-memory and DRAM throughput, the shared-memory wavefronts and bank
conflicts, the local-memory (spilled registers) instructions, and the stall reasons, largest
first, in warps per issued instruction: what the warps wait on (long_scoreboard: global or local
memory; short_scoreboard: shared memory, shuffles, special functions; mio_throttle: the
shared-memory pipe's queue; barrier: __syncthreads).
"""
import re
import sys

FIELDS = [  # (label, metric)
    ("duration (ms or us, as ncu prints)", "gpu__time_duration.sum"),
    ("issued per cycle and scheduler (of 1)", "smsp__issue_active.avg.per_cycle_active"),
    ("warps per scheduler: active", "smsp__warps_active.avg.per_cycle_active"),
    ("warps per scheduler: eligible", "smsp__warps_eligible.avg.per_cycle_active"),
    ("xu pipe %", "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active"),
    ("lsu pipe %", "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active"),
    ("fma pipe %", "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active"),
    ("alu pipe %", "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active"),
    ("L1 / shared throughput %", "l1tex__throughput.avg.pct_of_peak_sustained_active"),
    ("DRAM throughput %", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("shared wavefronts", "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum"),
    ("shared bank conflicts, loads", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum"),
    ("shared bank conflicts, stores", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"),
    ("local loads (instructions)", "smsp__sass_inst_executed_op_local_ld.sum"),
    ("local stores (instructions)", "smsp__sass_inst_executed_op_local_st.sum"),
    ("instructions", "smsp__inst_executed.sum"),
]
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")


def kernels(text):
    """[(kernel name, {metric: value string})] of one raw page."""
    found = []
    for line in text.splitlines():
        header = re.match(r"  (?:\w+::)?(\w+)\[", line)
        if header:
            found.append((header.group(1), {}))
            continue
        row = re.match(r"\s+(\S+)\s+(?:\S+\s+)?([\d,.]+|n/a)$", line)
        if row and found:
            found[-1][1][row.group(1)] = row.group(2)
    return found


def summary(name, metrics):
    lines = [name]
    for label, metric in FIELDS:
        lines.append(f"  {label:<40} {metrics.get(metric, '-')}")
    stalls = sorted(((STALL.match(key).group(1), float(value.replace(",", "")))
                     for key, value in metrics.items() if STALL.match(key)), key=lambda item: -item[1])
    lines.append("  stalls (warps per issue)                 " +
                 ", ".join(f"{reason} {value:.2f}" for reason, value in stalls[:8] if value >= 0.05))
    return "\n".join(lines)


def main():
    for path in sys.argv[1:]:
        with open(path) as f:
            for name, metrics in kernels(f.read()):
                print(summary(name, metrics))


if __name__ == "__main__":
    main()
