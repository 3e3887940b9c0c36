"""How the cost of each token mixer grows with the sequence length L, on a GPU and on the CPU.

For each op and L = 1K, 2K, ..., 64K (forward; forward + backward where cheap enough):

    selective scan    B=4 D=1536 N=16      NumPy reference (small L), Numba CPU, numba.cuda, mambapy pscan
    linear attention  B=2 H=16 d=64        NumPy reference (small L), Numba CPU, numba.cuda, fla chunk / recurrent
    softmax attention B=2 H=16 d=64        PyTorch SDPA, causal, fp32: the O(L²) baseline

The numba.cuda kernels get PyTorch tensors, as the peers do, where PyTorch has CUDA.

Run on the GPU machine (shared/gpu/README.md) after installing the carried wheels:

    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    python3 bench/gpu_scaling.py --out $OUT/scaling

Prints a table as it goes, then writes scaling.csv, scaling.json and scaling.png (log-log, one
panel per op, the device name and versions in the title) into --out. Every measurement is guarded:
a backend that is missing, runs out of memory or exceeds its time budget is reported and skipped,
and the results so far are written after every row. --max-L, --cpu-max-L and --numpy-max-L bound
the sweep; --smoke runs tiny shapes (also under NUMBA_ENABLE_CUDASIM=1). The peers take minutes
(one process per length); --no-peers skips them, and --peer-results adds the ones that
bench/gpu_check.py timed in the same run (at L = 1K, 4K, 16K) from its results.json instead.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import gpu_check  # noqa: E402  (same folder: inputs, timing and version helpers)

log = gpu_check.log


def wall_ms(fn, warmup=1, repeats=3, budget_s=20.0):
    """Median wall time in ms of fn() on the CPU (warm-up first; fewer repeats for slow calls)."""
    for _ in range(warmup):
        fn()
    times = []
    spent = 0.0
    while len(times) < repeats and (not times or spent < budget_s):
        started = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - started))
        spent += times[-1] / 1e3
    return float(np.median(times))


class Table:
    def __init__(self, folder, title):
        self.folder = folder
        self.title = title
        self.rows = []
        os.makedirs(folder, exist_ok=True)

    def add(self, op, backend, L, fwd_ms=None, fwdbwd_ms=None, note=""):
        row = {"op": op, "backend": backend, "L": L, "fwd_ms": fwd_ms, "fwdbwd_ms": fwdbwd_ms, "note": note}
        self.rows.append(row)

        def cell(x):
            return f"{x:11.3f}" if isinstance(x, float) else f"{'-':>11}"
        log(f"{op:<18}{backend:<22}{L:>7}{cell(fwd_ms)}{cell(fwdbwd_ms)}  {note}")
        self.write()

    def write(self):
        with open(os.path.join(self.folder, "scaling.json"), "w") as f:
            json.dump({"title": self.title, "rows": self.rows}, f, indent=1)
        with open(os.path.join(self.folder, "scaling.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["op", "backend", "L", "fwd_ms", "fwdbwd_ms", "note"])
            writer.writeheader()
            writer.writerows(self.rows)


def to_gpu(x):
    """x on the GPU as the peers get it, a PyTorch tensor (the kernels' outputs then come from
    PyTorch's caching allocator too), or a Numba device array where PyTorch has no CUDA."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.as_tensor(x, device="cuda")
    except ImportError:
        pass
    from numba import cuda
    return cuda.to_device(x)


def guarded(table, op, backend, L, measure):
    """Run measure() -> (fwd_ms, fwdbwd_ms); on any failure record why and carry on."""
    try:
        fwd, both = measure()
        table.add(op, backend, L, fwd, both)
    except Exception as error:
        table.add(op, backend, L, note=f"failed: {error!r}"[:160])
        if not isinstance(error, MemoryError):
            traceback.print_exc(limit=2)
        sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# selective scan

def scan_rows(table, Ls, args):
    B, D, N = (1, 16, 4) if args.smoke else (4, 1536, 16)
    op = "selective_scan"
    for L in Ls:
        arrays, options, dout = gpu_check.scan_inputs(B, L, D, N, np.float32, L, gate=False)
        arrays, options = gpu_check.peer_workload(arrays, options)     # the peers' work: Δ given, y = C·h + u
        if L <= args.numpy_max_L:
            from minilm.ops import selective_scan as ref

            def numpy_measure():
                forward = lambda: ref.forward(*arrays.values(), mode="chunked", chunk_size=64, **options)  # noqa: E731
                return wall_ms(forward, 0, 1), wall_ms(lambda: ref.backward(dout, forward()[1]), 0, 1)
            guarded(table, op, "numpy", L, numpy_measure)
        if L <= args.cpu_max_L:
            def cpu_measure():
                from minilm.kernels.cpu import selective_scan as cpu
                forward = lambda: cpu.forward(*arrays.values(), **options)      # noqa: E731
                return wall_ms(forward), wall_ms(lambda: cpu.backward(dout, forward()[1]), 1, 2)
            guarded(table, op, "numba-cpu", L, cpu_measure)

        def gpu_measure():
            from minilm.kernels.cuda import selective_scan as gpu
            device = {key: to_gpu(value) for key, value in arrays.items()}
            device_options = {key: to_gpu(value) for key, value in options.items()}
            dout_d = to_gpu(dout)
            forward = lambda: gpu.forward(*device.values(), **device_options)   # noqa: E731
            fwd = gpu_check.time_gpu(forward, 2, 5 if not args.smoke else 1)["ms"]
            both = gpu_check.time_gpu(lambda: gpu.backward(dout_d, forward()[1]), 1, 3 if not args.smoke else 1)["ms"]
            return fwd, both
        guarded(table, op, "numba-cuda", L, gpu_measure)
        del arrays, dout


# ----------------------------------------------------------------------------------------------
# linear attention

def la_rows(table, Ls, args):
    B, H, d = (1, 2, 8) if args.smoke else (2, 16, 64)
    op = "linear_attention"
    for L in Ls:
        (q, k, v), _, do = gpu_check.la_inputs(B, H, L, d, d, np.float32, L)
        if L <= args.numpy_max_L:
            from minilm.ops import linear_attention as ref

            def numpy_measure():
                forward = lambda: ref.forward(q, k, v, mode="chunked", chunk_size=64)  # noqa: E731
                return wall_ms(forward, 0, 1), wall_ms(lambda: ref.backward(do, forward()[1]), 0, 1)
            guarded(table, op, "numpy", L, numpy_measure)
        if L <= args.cpu_max_L:
            def cpu_measure():
                from minilm.kernels.cpu import linear_attention as cpu
                forward = lambda: cpu.forward(q, k, v)                           # noqa: E731
                return wall_ms(forward), wall_ms(lambda: cpu.backward(do, forward()[1]), 1, 2)
            guarded(table, op, "numba-cpu", L, cpu_measure)

        def gpu_measure():
            from minilm.kernels.cuda import linear_attention as gpu
            qd, kd, vd, dod = (to_gpu(x) for x in (q, k, v, do))
            forward = lambda: gpu.forward(qd, kd, vd)                           # noqa: E731
            fwd = gpu_check.time_gpu(forward, 2, 5 if not args.smoke else 1)["ms"]
            both = gpu_check.time_gpu(lambda: gpu.backward(dod, forward()[1]), 1, 3 if not args.smoke else 1)["ms"]
            return fwd, both
        guarded(table, op, "numba-cuda", L, gpu_measure)
        del q, k, v, do


# ----------------------------------------------------------------------------------------------
# peers (PyTorch): one subprocess per group, so that a crash or an out-of-memory cannot take the
# rest of the sweep with it

RECORDED = "(timed by gpu_check.py)"      # the note on the rows of peers taken from gpu_check's results


def add_peer_record(table, record, note=""):
    """One JSON record of .whl/peers.py as rows of the table (records of other kinds are skipped)."""
    peer = record.get("peer")
    L = record.get("L")
    if peer == "mambapy_pscan":
        table.add("selective_scan", "mambapy-pscan", L, record["fwd_ms"], None,
                  f"peak {record.get('peak_GiB', 0):.1f} GiB {note}".strip())
    elif peer == "fla_chunk_linear_attn":
        table.add("linear_attention", "fla-chunk", L, record["fwd_ms"], record["fwdbwd_ms"], note)
        table.add("linear_attention", "fla-recurrent", L, record["recurrent_fwd_ms"], None, note)
    elif peer == "sdpa_causal":
        table.add("softmax_attention", f"sdpa-{record['dtype'].replace('torch.', '')}", L,
                  record["fwd_ms"], record["fwdbwd_ms"], note)


def add_recorded_peers(table, results_path):
    """The peers in bench/gpu_check.py's results.json (results_path) as rows of the table."""
    if not os.path.exists(results_path):
        log(f"(no peer results: {results_path} not found)")
        return
    with open(results_path) as f:
        records = json.load(f).get("peers", [])
    for record in records:
        add_peer_record(table, record, RECORDED)


def peer_rows(table, Ls, args):
    if args.peer_results:      # the peers bench/gpu_check.py timed in the same run, at its lengths
        add_recorded_peers(table, args.peer_results)
    script = os.path.join(ROOT, ".whl", "peers.py")
    if args.smoke or args.no_peers or not os.path.exists(script):
        log(f"(peers skipped: {'smoke run' if args.smoke else '--no-peers' if args.no_peers else script + ' not found'})")
        return
    groups = [("fla", [L for L in Ls]), ("mambapy", [L for L in Ls if L <= 8192]),
              ("sdpa", [L for L in Ls if L <= args.sdpa_max_L])]
    for what, lengths in groups:
        for L in lengths:           # one length per call: a failure at 64K keeps the shorter ones
            command = [sys.executable, script, "--what", what, "--L", str(L)]
            try:
                completed = subprocess.run(command, capture_output=True, text=True, timeout=args.peer_timeout)
                lines = completed.stdout.splitlines()
            except subprocess.TimeoutExpired:
                table.add(what, "peer", L, note=f"timed out after {args.peer_timeout} s")
                continue
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if "error" in record:
                    table.add(what, "peer", L, note=f"failed: {record['error']}"[:160])
                else:
                    add_peer_record(table, record)


# ----------------------------------------------------------------------------------------------
# plot

def plot(table, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as error:
        log(f"(no plot: matplotlib unavailable: {error!r})")
        return
    ops = [op for op in ("selective_scan", "linear_attention", "softmax_attention")
           if any(r["op"] == op and r["fwd_ms"] for r in table.rows)]
    if not ops:
        return
    figure, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.8), squeeze=False)
    for axis, op in zip(axes[0], ops):
        backends = sorted({r["backend"] for r in table.rows if r["op"] == op and r["fwd_ms"]})
        for index, backend in enumerate(backends):
            color = f"C{index}"      # one colour per backend: forward solid, forward+backward dashed
            points = sorted((r["L"], r["fwd_ms"]) for r in table.rows
                            if r["op"] == op and r["backend"] == backend and r["fwd_ms"])
            axis.loglog([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=f"{backend} fwd")
            both = sorted((r["L"], r["fwdbwd_ms"]) for r in table.rows
                          if r["op"] == op and r["backend"] == backend and r["fwdbwd_ms"])
            if both:
                axis.loglog([p[0] for p in both], [p[1] for p in both], "x--", color=color, alpha=0.6,
                            label=f"{backend} fwd+bwd")
        axis.set_title(op)
        axis.set_xlabel("sequence length L")
        axis.set_ylabel("time (ms)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(table.title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    log(f"plot: {path}")


def replot(args):
    """Rebuild scaling.csv, .json and .png in args.out from its scaling.json, adding recorded peers."""
    with open(os.path.join(args.out, "scaling.json")) as f:
        saved = json.load(f)
    table = Table(args.out, saved["title"])
    table.rows = [row for row in saved["rows"] if not row["note"].endswith(RECORDED)]
    if args.peer_results:
        add_recorded_peers(table, args.peer_results)
    table.write()
    plot(table, os.path.join(args.out, "scaling.png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("results", "gpu_scaling"))
    parser.add_argument("--max-L", type=int, default=65536)
    parser.add_argument("--cpu-max-L", type=int, default=16384, help="longest L for the Numba CPU kernels")
    parser.add_argument("--numpy-max-L", type=int, default=2048, help="longest L for the NumPy reference")
    parser.add_argument("--sdpa-max-L", type=int, default=32768)
    parser.add_argument("--peer-timeout", type=int, default=240)
    parser.add_argument("--no-peers", action="store_true", help="do not time the PyTorch peers")
    parser.add_argument("--peer-results", help="bench/gpu_check.py's results.json: add the peers it timed "
                        "(in the same run) to the table and the plot")
    parser.add_argument("--replot", action="store_true", help="measure nothing: redraw the table and the "
                        "plot from --out's scaling.json (with --peer-results' peers added)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.replot:
        replot(args)
        return
    if args.smoke:
        gpu_check.QUICK = True
        from minilm.kernels.cuda import linear_attention as la
        from minilm.kernels.cuda import selective_scan as scan
        scan.set_config("float32", channels=2, state_threads=2, states_per_thread=2, fwd_segments=2, fwd_steps=4,
                        bwd_segments=2, bwd_steps=4)
        la.set_tile("float32", 8)
        args.max_L, args.numpy_max_L, args.cpu_max_L = 32, 16, 32
    Ls = [L for L in (2 ** p for p in range(4 if args.smoke else 10, 17)) if L <= args.max_L]

    from minilm.kernels.cuda import _device
    versions = gpu_check.versions()
    device = _device.device_name()
    title = f"{device} | " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    log(title)
    table = Table(args.out, title)
    log(f"{'op':<18}{'backend':<22}{'L':>7}{'fwd ms':>11}{'fwd+bwd ms':>11}")
    for name, rows in (("selective scan", scan_rows), ("linear attention", la_rows), ("peers", peer_rows)):
        try:
            rows(table, Ls, args)
        except Exception as error:
            log(f"!!! {name} failed: {error!r}")
            traceback.print_exc()
    table.write()
    plot(table, os.path.join(args.out, "scaling.png"))


if __name__ == "__main__":
    main()
