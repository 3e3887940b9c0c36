"""What each numba.cuda kernel asks of a GPU multiprocessor, worked out without a GPU.

For every kernel and block shape that bench/gpu_check.py sweeps, numba-cuda compiles the kernel to
PTX (cuda.compile_ptx) and NVIDIA's assembler, ptxas -v, reports its registers per thread, spilled
bytes and shared memory per block. From those follow the blocks, and warps, that fit on one
multiprocessor: the occupancy, which decides how much memory and instruction latency the other
warps can hide. A kernel that walks a long sequence chunk by chunk, as the scan does, lives on it.

Where cuobjdump and nvdisasm are at hand, the machine code (SASS) is read too, for SASS_COUNTS:
compare-and-swap loops (ATOMS.CAST.SPIN: a float atomic add on shared memory compiles to one, and
it goes round once more for every lane of the warp that hits the same address), warp shuffles,
tensor-core HMMA and float32 FFMA instructions, and all instructions.

    pip install numba-cuda nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12    # the compilers, no driver needed
    pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm                   # optional: the SASS counts
    python bench/cuda_registers.py                    # compute capability 9.0 (H100, H200)
    python bench/cuda_registers.py --cc 8.0 --out results/cuda_registers

Prints a table and writes registers.csv, registers.json and registers.png (warps per
multiprocessor) into --out. Registers come from the ptxas these wheels ship; the ptxas of the CUDA
version on a GPU machine may count a few differently.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import gpu_check  # noqa: E402  (same folder: the block shapes it sweeps)
from _common import format_table, write_csv  # noqa: E402

# Per multiprocessor, compute capability 8.0 and 9.0 (CUDA programming guide, "compute capabilities")
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
SHARED_PER_SM = {(8, 0): 164 * 1024, (9, 0): 228 * 1024}


def shared_per_sm(cc):
    """Shared memory per multiprocessor in bytes (the 9.0 figure for a capability not listed)."""
    return SHARED_PER_SM.get(cc, SHARED_PER_SM[(9, 0)])
SHARED_RESERVED_PER_BLOCK = 1024


def find_tool(name):
    """An NVIDIA command-line tool from the nvidia-* pip wheels (their nvidia/<package>/bin folders),
    or from PATH; None if there is none."""
    folders = []
    try:
        import nvidia
        for base in nvidia.__path__:
            folders += sorted(glob.glob(os.path.join(base, "*", "bin")))
    except ImportError:
        pass
    for folder in folders + os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_ptxas():
    """ptxas from the nvidia-cuda-nvcc wheel, or from PATH."""
    ptxas = find_tool("ptxas")
    if ptxas is None:
        raise SystemExit("ptxas not found: pip install nvidia-cuda-nvcc-cu12 (or put a CUDA toolkit's bin on PATH)")
    return ptxas


def compile_resources(kernel, signature, cc, ptxas, launch_bounds=None):
    """{registers, spill_store_bytes, spill_load_bytes, stack_bytes, shared_bytes, error} of one
    kernel, and its machine code's SASS_COUNTS (None without cuobjdump)."""
    from numba import cuda
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc, launch_bounds=launch_bounds)
    with tempfile.TemporaryDirectory() as folder:
        source, binary = os.path.join(folder, "kernel.ptx"), os.path.join(folder, "kernel.cubin")
        with open(source, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-v", "--gpu-name", f"sm_{cc[0]}{cc[1]}", source, "-o", binary],
                              capture_output=True, text=True)
        counts = machine_code_counts(binary) if done.returncode == 0 else dict.fromkeys(SASS_COUNTS)
    report = done.stderr

    def number(pattern):
        found = re.findall(pattern, report)
        return int(found[-1]) if found else 0
    errors = [line.split(":", 1)[-1].strip()[-120:] for line in report.splitlines() if "error" in line]
    return {"registers": number(r"Used (\d+) registers"),
            "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads"),
            "stack_bytes": number(r"(\d+) bytes stack frame"),
            "shared_bytes": number(r"(\d+) bytes smem"),
            "error": errors[0] if done.returncode and errors else ("ptxas failed" if done.returncode else ""),
            **counts}


# What machine_code_counts counts in the SASS (static instructions, not executions)
SASS_COUNTS = {"cas_loops": r"ATOMS\.CAST\.SPIN",   # compare-and-swap loops: float atomic adds on shared memory
               "shuffles": r"\bSHFL\.",              # warp shuffles
               "tensor_mma": r"\bHMMA\.",            # tensor-core matrix multiply-adds
               "ffma": r"\bFFMA\b",                 # float32 fused multiply-adds
               "instructions": r"/\*[0-9a-f]{4,}\*/"}  # all of them (each line of code starts /*address*/)


def machine_code_counts(cubin):
    """The SASS_COUNTS of a cubin's machine code; None for each where cuobjdump, or the nvdisasm it
    runs, is missing."""
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        return dict.fromkeys(SASS_COUNTS)
    path = os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", "")
    done = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, env=dict(os.environ, PATH=path))
    if done.returncode != 0:
        return dict.fromkeys(SASS_COUNTS)
    return {name: len(re.findall(pattern, done.stdout)) for name, pattern in SASS_COUNTS.items()}


def occupancy(threads, registers, shared_bytes, cc):
    """Blocks and warps per multiprocessor, and what limits them."""
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256          # registers are given out per warp, 256 at a time
    limits = {"registers": REGISTERS_PER_SM // (warps * per_warp),
              "shared memory": shared_per_sm(cc) // (shared_bytes + SHARED_RESERVED_PER_BLOCK),
              "threads": THREADS_PER_SM // threads,
              "blocks": BLOCKS_PER_SM}
    blocks = min(limits.values())
    return blocks, blocks * warps, min(limits, key=limits.get)


def scan_signatures():
    from numba import float32, int64, types
    a = {n: types.Array(float32, n, "C") for n in (1, 2, 3, 4)}
    forward = (a[3], a[3], a[2], a[1], a[1], a[1], a[3], a[1], a[3], a[3], a[4], a[3], int64, int64, int64)
    backward = (a[3], a[3], a[3], a[2], a[1], a[1], a[1], a[3], a[1], a[4],
                a[3], a[3], a[3], a[2], a[3], a[3], a[1], a[1], int64, int64)
    return forward, backward


def la_signatures():
    from numba import boolean, float32, int64, types
    a3, a4 = types.Array(float32, 3, "C"), types.Array(float32, 4, "C")
    i, f = int64, float32
    return {"outer": (a4, a4, a3, a4, a3, i, i, i, i, i, boolean, f),
            "output": (a4, a4, a4, a3, a4, a4, i, i, i, i, i, f),
            "dq": (a4, a4, a4, a4, a3, a4, a4, a3, a4, i, i, i, i, i, f),
            "dk": (a4, a4, a4, a3, a4, a4, a4, a3, i, i, i, i, i, f),
            "dv": (a4, a4, a4, a3, a4, a4, i, i, i, i, i, f)}


def la_scan_signature():
    from numba import float32, int64, types
    a3, a4 = types.Array(float32, 3, "C"), types.Array(float32, 4, "C")
    return (a4, a3, a3, a3, int64, int64, int64)


def rows_for_scan(cc, ptxas, N=16):
    from minilm.kernels.cuda import selective_scan as scan
    forward_sig, backward_sig = scan_signatures()
    rows, seen = [], set()
    for changes in gpu_check.SWEEP:
        config = scan.ScanConfig(**changes).check()
        forward, forward_threads = scan._forward_kernel("float32", config, N)
        backward, backward_threads = scan._backward_kernel("float32", config, N)
        kernels = [("scan forward", forward, forward_threads, config.fwd_min_blocks, forward_sig),
                   ("scan backward", backward, backward_threads, config.bwd_min_blocks, backward_sig)]
        for name, kernel, threads, min_blocks, signature in kernels:
            if id(kernel) in seen:      # an entry of the sweep that changes only the other kernel
                continue
            seen.add(id(kernel))
            bounds = (threads, min_blocks) if min_blocks else None
            rows.append(dict(kernel=name, config=json.dumps(changes) if changes else "default", threads=threads,
                             launch_bounds=str(bounds) if bounds else "-",
                             **compile_resources(kernel, signature, cc, ptxas, bounds)))
    return rows


def rows_for_linear_attention(cc, ptxas):
    from numba import float32
    from minilm.kernels.cuda import linear_attention as la
    rows = []
    # the swept configurations, and the FMA variants an earlier sweep timed (docs/kernels.md)
    earlier = [(64, 8, 0, "off", 4), (32, 4, 0, "off", 4)]
    for tile, reg, min_blocks, tensor_cores, loads in gpu_check.LA_SWEEP + earlier:
        kernels = la._make_kernels(float32, tile, reg, min_blocks, la.LAYOUTS[tensor_cores], loads)
        bounds = (kernels["threads"], min_blocks) if min_blocks else None
        config = f"tile={tile} reg={reg}" if tensor_cores == "off" else f"tile={tile} {tensor_cores}"
        config += f" loads={loads}"
        for name, signature in la_signatures().items():
            rows.append(dict(kernel=f"linear attention {name}", config=config,
                             threads=kernels["threads"], launch_bounds=str(bounds) if bounds else "-",
                             **compile_resources(kernels[name], signature, cc, ptxas, bounds)))
    # the chunk scan: one thread per state entry, the same kernel in every configuration above
    rows.append(dict(kernel="linear attention chunk scan", config=f"unroll={la.SCAN_UNROLL}",
                     threads=la.SCAN_THREADS, launch_bounds="-",
                     **compile_resources(kernels["scan"], la_scan_signature(), cc, ptxas)))
    return rows


def plot(path, rows, cc):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{row['kernel']} | {row['config']}" for row in rows]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [row["warps_per_sm"] for row in rows],
            color=["tab:red" if row["spill_store_bytes"] or row["stack_bytes"] else "tab:blue" for row in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"resident warps per multiprocessor (of {THREADS_PER_SM // 32})\n"
                  "red: uses local memory (spilled registers or a stack frame)")
    ax.set_title(f"numba.cuda kernels, compute capability {cc[0]}.{cc[1]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _patch_device_compile(cc):
    """numba-cuda compiles a kernel's device functions for the *current device's* compute
    capability, which needs a driver; point it at `cc` instead, so that no GPU is needed."""
    import types
    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 or 8.0")
    parser.add_argument("--out", default=os.path.join("results", "cuda_registers"))
    args = parser.parse_args()
    cc = tuple(int(part) for part in args.cc.split("."))
    ptxas = find_ptxas()
    _patch_device_compile(cc)

    rows = rows_for_scan(cc, ptxas) + rows_for_linear_attention(cc, ptxas)
    for row in rows:
        row["blocks_per_sm"], row["warps_per_sm"], row["limited_by"] = occupancy(
            row["threads"], row["registers"], row["shared_bytes"], cc)
        if row["error"]:          # e.g. more than the 48 KiB of static shared memory a kernel may have
            row["blocks_per_sm"], row["warps_per_sm"], row["limited_by"] = 0, 0, "does not build"
    columns = ["kernel", "config", "threads", "launch bounds", "registers", "spill st/ld B", "stack B",
               "shared KiB", "blocks/SM", "warps/SM", "limited by", "CAS loops", "shuffles", "HMMA", "FFMA",
               "instructions"]
    table = [[row["kernel"], row["config"], row["threads"], row["launch_bounds"], row["registers"],
              f"{row['spill_store_bytes']}/{row['spill_load_bytes']}", row["stack_bytes"], row["shared_bytes"] / 1024,
              row["blocks_per_sm"], row["warps_per_sm"], row["limited_by"],
              *("-" if row[name] is None else row[name] for name in SASS_COUNTS)] for row in rows]
    print(format_table(f"numba.cuda kernels for sm_{cc[0]}{cc[1]} (ptxas {ptxas})", columns, table,
                       notes=[f"per multiprocessor: {REGISTERS_PER_SM} registers, {THREADS_PER_SM} threads, "
                              f"{shared_per_sm(cc) // 1024} KiB shared memory",
                              "CAS loops: float atomic adds on shared memory (ATOMS.CAST.SPIN in the SASS; "
                              "'-': no cuobjdump/nvdisasm); shuffles, HMMA (tensor cores), FFMA, instructions: "
                              "instructions in the machine code, not executions"]))
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "registers.csv"), rows)
    with open(os.path.join(args.out, "registers.json"), "w") as f:
        json.dump({"compute_capability": args.cc, "ptxas": ptxas, "rows": rows}, f, indent=1)
    if plot(os.path.join(args.out, "registers.png"), rows, cc):
        print(f"wrote {args.out}/registers.csv, registers.json, registers.png")


if __name__ == "__main__":
    main()
