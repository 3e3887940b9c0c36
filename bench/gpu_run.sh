#!/usr/bin/env bash
# Everything a GPU lease is for, in one command from the project root (8-10 minutes on an H200):
#
#     bash bench/gpu_run.sh OUT_DIR
#
# Installs the carried wheels (.whl/*.whl, see shared/gpu/README.md) into /tmp/site when they are
# there (not with SMOKE=1: they are built for the GPU machine's Python), then runs, each under a
# time limit so that the next always gets its turn:
#   bench/tensor_core_probe.py  a TF32 mma from numba.cuda through inline PTX, checked against NumPy
#   bench/gpu_check.py          correctness at full size, timings, host-time profile, peers, sweeps
#   bench/gpu_scaling.py        Numba CPU vs numba.cuda for L = 1K ... 64K, with the peers gpu_check
#                               timed (fla, mambapy pscan, PyTorch's SDPA)
#   ncu on bench/gpu_profile.py  where Nsight Compute is installed: the scan kernels and the
#                               linear-attention tile kernels, each with its warps' stall reasons,
#                               pipe utilization, memory tables (shared-memory wavefronts, bank
#                               conflicts, L1 sectors per request) and costliest instructions
# and prints the end of gpu_check's log (its summary table). The logs land in OUT_DIR as files, the
# rest (gpu/ and scaling/: JSON, CSV, the plot; the raw profiles) in OUT_DIR/results.tar, added as
# each step ends: a lease brings back at most 8 files. SMOKE=1 runs the check and the scaling on tiny
# shapes (with NUMBA_ENABLE_CUDASIM=1, without a GPU; the probe cannot run under the simulator).
set -uo pipefail
out=${1:?usage: bash bench/gpu_run.sh OUT_DIR}
smoke=()
check_limit=350 scaling_limit=120 profile_limit=55   # seconds: with the install, under the 600 s of one call
if [[ -n "${SMOKE:-}" ]]; then smoke=(--smoke); check_limit=1800; scaling_limit=900; fi   # the simulator is slow

if [[ -z "${SMOKE:-}" ]] && compgen -G ".whl/*.whl" > /dev/null; then   # the simulator needs no wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0
mkdir -p "$out"
pack() {   # move finished results (paths relative to OUT_DIR) into OUT_DIR/results.tar
    local path
    for path in "$@"; do
        [[ -e "$out/$path" ]] && tar -rf "$out/results.tar" -C "$out" "$path" && rm -rf "${out:?}/$path"
    done
}

if [[ -z "${SMOKE:-}" ]]; then
    timeout 30 python3 bench/tensor_core_probe.py > "$out/tensor_core_probe.log" 2>&1
    echo "tensor_core_probe: exit status $?"
fi
timeout $check_limit python3 bench/gpu_check.py "${smoke[@]}" --out "$out/gpu" --peers-timeout 140 --sweep-until 265 \
    > "$out/gpu_check.log" 2>&1
echo "gpu_check: exit status $?"
rm -f /tmp/gpu_check_results.json     # gpu_check's peers go into the scaling plot
cp "$out/gpu/results.json" /tmp/gpu_check_results.json 2>/dev/null
pack gpu
timeout $scaling_limit python3 bench/gpu_scaling.py "${smoke[@]}" --out "$out/scaling" --no-peers --numpy-max-L 0 \
    --cpu-max-L 4096 --peer-results /tmp/gpu_check_results.json > "$out/scaling.log" 2>&1
echo "gpu_scaling: exit status $?"
pack scaling
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
profile() {   # op, kernel-name regex, kernels per forward + backward call, time limit in seconds
    # skip the first call's kernels (they run while Numba compiles), profile the second call's, at
    # the clocks the card runs at (ncu would lock them otherwise: the card's settings are not ours);
    # the report's details page goes to ncu_OP.log, then bench/ncu_summary.py's digest of it, every
    # metric it holds (the stall reasons, the pipes' utilization, ...) to ncu_OP_raw.log
    timeout "$4" "$ncu" --clock-control none --kernel-name regex:"$2" --launch-skip "$3" --launch-count "$3" \
        --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section SourceCounters \
        -f -o "/tmp/ncu_$1" python3 bench/gpu_profile.py "$1" > "$out/ncu_$1.log" 2>&1
    echo "ncu ($1): exit status $?"
    "$ncu" --import "/tmp/ncu_$1.ncu-rep" --page details >> "$out/ncu_$1.log" 2>&1
    "$ncu" --import "/tmp/ncu_$1.ncu-rep" --page raw > "$out/ncu_$1_raw.log" 2>&1
    python3 bench/ncu_summary.py "$out/ncu_$1_raw.log" >> "$out/ncu_$1.log" 2>&1   # what holds each kernel
    pack "ncu_$1_raw.log"
}
if [[ -z "${SMOKE:-}" && -n "$ncu" ]]; then
    profile scan 'forward_kernel|backward_kernel' 2 $profile_limit
    profile linear_attention 'outer_kernel|output_kernel|dq_kernel|dk_kernel|dv_kernel' 6 $profile_limit
fi
cat "$out/tensor_core_probe.log" 2>/dev/null
grep -v "Warning\|warn(" "$out/gpu_check.log" | tail -n 60
