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
#   bench/gpu_scaling.py        Numba CPU vs numba.cuda for L = 1K ... 64K
#   ncu on bench/gpu_profile.py  where Nsight Compute is installed: the scan kernels' memory
#                               tables (shared-memory wavefronts, bank conflicts, L1 sectors per
#                               request) and their costliest instructions
# and prints the end of gpu_check's log (its summary table). Results and logs land in OUT_DIR
# (9 or 10 files). SMOKE=1 runs the last two on tiny shapes (with NUMBA_ENABLE_CUDASIM=1, without a GPU;
# the probe cannot run under the simulator).
set -uo pipefail
out=${1:?usage: bash bench/gpu_run.sh OUT_DIR}
smoke=()
check_limit=350 scaling_limit=130 profile_limit=70   # seconds: with the install, under the 600 s of one call
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

if [[ -z "${SMOKE:-}" ]]; then
    timeout 30 python3 bench/tensor_core_probe.py > "$out/tensor_core_probe.log" 2>&1
    echo "tensor_core_probe: exit status $?"
fi
timeout $check_limit python3 bench/gpu_check.py "${smoke[@]}" --out "$out/gpu" --peers-timeout 120 --sweep-until 280 \
    > "$out/gpu_check.log" 2>&1
echo "gpu_check: exit status $?"
timeout $scaling_limit python3 bench/gpu_scaling.py "${smoke[@]}" --out "$out/scaling" --no-peers --numpy-max-L 0 \
    --cpu-max-L 4096 > "$out/scaling.log" 2>&1
echo "gpu_scaling: exit status $?"
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
if [[ -z "${SMOKE:-}" && -n "$ncu" ]]; then
    timeout $profile_limit "$ncu" --kernel-name regex:'forward_kernel|backward_kernel' --launch-skip 2 \
        --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis_Tables \
        --section SourceCounters python3 bench/gpu_profile.py scan > "$out/ncu_scan.log" 2>&1
    echo "ncu (scan kernels): exit status $?"
fi
cat "$out/tensor_core_probe.log" 2>/dev/null
grep -v "Warning\|warn(" "$out/gpu_check.log" | tail -n 60
