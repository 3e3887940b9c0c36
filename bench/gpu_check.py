"""One command for a real GPU: check the numba.cuda kernels at full size, time them, compare with peers.

On the GPU machine (see shared/gpu/README.md), from the project root:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    python3 bench/gpu_check.py --out $OUT/gpu

(bench/gpu_run.sh does all of that, then bench/gpu_scaling.py, in one command.)

Sections, each guarded so that a failure is reported and the next section still runs; results are
written after every section (results.json, timings.csv, summary.csv in --out):

  1. correctness on fresh random inputs at the target shapes, with every output buffer filled with
     NaN before the kernels run (an element a kernel forgets to write shows up), against the NumPy
     reference in chunked mode; plus odd shapes (nothing a multiple of a block) and float64 at small sizes;
  2. timings with CUDA events, median of repeats after a warm-up, at the target shapes
     (selective scan B=4 D=1536 N=16 L=1K/4K; linear attention B=2 H=16 d=64 L=1K/4K/16K);
     (host_ms: the time the host spends inside the call; the rest of ms is the GPU's);
  3. the same with PyTorch tensors in and out, as for the peers (outputs then come from PyTorch's
     caching allocator); with them and with CuPy arrays (where CuPy imports), both ops' forward and
     backward checked against the Numba-array path: results of the caller's kind, inputs not copied;
  4. minilm's memory pool (minilm.kernels.cuda.use_memory_pool, on by default): its bookkeeping on
     the device, pooled results against unpooled ones, timings without it;
  5. where the host time of a call goes (cProfile, the costliest functions per call);
  6. the GPU time of each kernel of a call (CUDA events around every launch), next to the call's;
  7. the peers (.whl/peers.py: copy bandwidth, fla chunk_linear_attn, mambapy pscan, and PyTorch's
     causal SDPA for bench/gpu_scaling.py's plot) in a subprocess;
  8. while time allows (--sweep-until), a sweep of the linear-attention tiles (float FMAs or tensor
     cores) and of the scan's block shapes (--sweeps), each entry's output and gradients checked
     against the default's, its whole calls timed and the GPU time of each of its kernels;
  9. one table, printed last, of our figures, the peers' and the ratios against the targets (time
     growth with L included), with the fastest entries of the sweeps.

--smoke runs the same code on tiny shapes (it works under NUMBA_ENABLE_CUDASIM=1, for testing this
script without a GPU). The full run took 330 s on an H200 (peers and both sweeps included);
--no-peers --skip correctness,torch,pool,host leaves the timings and the sweeps (170 s).
"""
import argparse
import contextlib
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

START = time.time()

# Speed targets (figures of the peers measured on an H100 of the same kind of machine).
TARGETS = {
    "scan_speedup_vs_mambapy": 10.0,      # forward, B=4 D=1536 N=16 L=4096: ≥ 10x faster than pscan
    "scan_fraction_of_copy": 0.30,        # forward effective bandwidth ≥ 30 % of device copy bandwidth
    "scan_fwdbwd_over_fwd": 3.0,          # forward + backward ≤ 3x forward
    "la_fwd_over_fla": 2.0,               # linear attention forward ≤ 2x fla chunk_linear_attn (fp32)
    "la_fwdbwd_over_fla": 2.0,            # forward + backward ≤ 2x fla
    "growth_over_L": 1.3,                 # time(L2) / time(L1) ≤ 1.3 x L2 / L1 (no hidden quadratic term)
}
SCAN_GRADS = ("du", "ddelta", "dA", "dBm", "dCm", "dD", "dz", "ddelta_bias")   # selective_scan.backward's order
LA_GRADS = ("dq", "dk", "dv", "dlog_decay")                                     # linear_attention.backward's
FALLBACK_PEERS = {  # measured on an H100 80GB HBM3 (shared/gpu/README.md), used when peers cannot run
    "copy_TBps": 2.97,
    ("mambapy", 1024): 4.9, ("mambapy", 4096): 18.9,
    ("fla_fwd", 1024): 0.36, ("fla_fwd", 4096): 0.46, ("fla_fwd", 16384): 0.60,
    ("fla_fwdbwd", 1024): 1.56, ("fla_fwdbwd", 4096): 1.16, ("fla_fwdbwd", 16384): 1.79,
}


def log(*parts):
    print(*parts, flush=True)


def elapsed():
    return time.time() - START


# ----------------------------------------------------------------------------------------------
# results, written as they come

class Results:
    def __init__(self, folder):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.data = {"device": None, "versions": {}, "correctness": [], "timings": [], "sweep": [],
                     "peers": [], "host_profile": {}, "kernel_times": [], "summary": [], "errors": []}

    def section(self, name, fn, *args, **kwargs):
        """Run one section; report and keep going on failure; write everything afterwards."""
        log(f"\n=== {name}  (t = {elapsed():.0f} s)")
        try:
            return fn(self, *args, **kwargs)
        except Exception as error:  # a broken section must not lose the others
            log(f"!!! {name} failed: {error!r}")
            traceback.print_exc()
            sys.stdout.flush()
            self.data["errors"].append({"section": name, "error": repr(error)[:500]})
        finally:
            self.write()

    def write(self):
        with open(os.path.join(self.folder, "results.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=_jsonable)
        _write_csv(os.path.join(self.folder, "timings.csv"), self.data["timings"] + self.data["sweep"])
        _write_csv(os.path.join(self.folder, "summary.csv"), self.data["summary"])


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _write_csv(path, rows):
    if not rows:
        return
    columns = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _jsonable(value) if not isinstance(value, (int, float, str)) else value
                             for key, value in row.items()})


# ----------------------------------------------------------------------------------------------
# environment

def versions():
    found = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("numba", "numba_cuda", "torch", "triton", "fla", "mambapy"):
        try:
            import importlib.metadata as metadata
            found[name] = metadata.version({"numba_cuda": "numba-cuda", "fla": "fla-core"}.get(name, name))
        except Exception:
            found[name] = None
    return found


def section_environment(results):
    from numba import cuda
    from minilm.kernels.cuda import _device
    ok, reason = _device.available()
    results.data["device"] = reason
    results.data["versions"] = versions()
    try:
        results.data["versions"]["cuda_driver"] = str(cuda.cudadrv.driver.driver.get_version())
        results.data["versions"]["cuda_runtime"] = str(cuda.runtime.get_version())
    except Exception:
        pass
    log("device:", reason)
    log("versions:", json.dumps(results.data["versions"]))
    if not ok:
        raise RuntimeError(f"numba.cuda cannot run: {reason}")


# ----------------------------------------------------------------------------------------------
# inputs

def scan_inputs(B, T, D, N, dtype, seed, gate=True):
    """Mamba-like inputs: S4D-real A = -(1..N), Δ = softplus(delta + bias) with dt in [1e-3, 1e-1]."""
    rng = np.random.default_rng(seed)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), D))
    arrays = {
        "u": rng.standard_normal((B, T, D)).astype(dtype),
        "delta": (0.5 * rng.standard_normal((B, T, D))).astype(dtype),
        "A": (-np.tile(np.arange(1, N + 1, dtype=np.float64), (D, 1)) * rng.uniform(0.5, 1.5, (D, N))).astype(dtype),
        "Bm": rng.standard_normal((B, T, N)).astype(dtype),
        "Cm": rng.standard_normal((B, T, N)).astype(dtype),
    }
    options = {
        "D": rng.standard_normal(D).astype(dtype),
        "z": rng.standard_normal((B, T, D)).astype(dtype) if gate else None,
        "delta_bias": (dt + np.log(-np.expm1(-dt))).astype(dtype),      # inverse softplus of dt
        "delta_softplus": True,
        "initial_state": (0.1 * rng.standard_normal((B, D, N))).astype(dtype),
    }
    dout = rng.standard_normal((B, T, D)).astype(dtype)
    return arrays, options, dout


def peer_workload(arrays, options):
    """The peer's (mambapy pscan's) work from scan_inputs' arrays: Δ given, so positive (softplus of
    delta + bias, taken on the host: a raw negative Δ would make a_t = exp(Δ A) > 1 and the states
    overflow), y = C·h + u (D = 1), no gate. Returns (arrays, options)."""
    step = np.logaddexp(0, arrays["delta"] + options["delta_bias"]).astype(arrays["delta"].dtype)
    return dict(arrays, delta=step), {"D": np.ones(arrays["A"].shape[0], arrays["A"].dtype)}


def la_inputs(B, H, T, Dk, Dv, dtype, seed, decay=None, state=False):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((B, H, T, Dk)) / np.sqrt(Dk)).astype(dtype)
    k = (rng.standard_normal((B, H, T, Dk)) / np.sqrt(Dk)).astype(dtype)
    v = rng.standard_normal((B, H, T, Dv)).astype(dtype)
    options = {"log_decay": None, "initial_state": None}
    if decay == "step":
        options["log_decay"] = np.log(rng.uniform(0.9, 1.0, (B, H, T))).astype(dtype)
    elif decay == "head":
        options["log_decay"] = np.log(rng.uniform(0.95, 1.0, H)).astype(dtype)
    if state:
        options["initial_state"] = rng.standard_normal((B, H, Dk, Dv)).astype(dtype)
    do = rng.standard_normal((B, H, T, Dv)).astype(dtype)
    return (q, k, v), options, do


def on_device(values):
    """{name: value} with every NumPy array copied to the device (None and flags stay as they are)."""
    from numba import cuda
    return {key: cuda.to_device(value) if isinstance(value, np.ndarray) else value for key, value in values.items()}


def relative_error(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    if not np.all(np.isfinite(actual)):
        return float("nan")
    return float(np.max(np.abs(actual - expected), initial=0.0) / max(np.max(np.abs(expected), initial=0.0), 1e-30))


# ----------------------------------------------------------------------------------------------
# 1. correctness

def _scan_reference():
    """The NumPy reference (chunked mode): independent of every fast kernel, so a disagreement is the GPU's."""
    from minilm.ops import selective_scan as ref
    return "numpy", lambda *a, **k: ref.forward(*a, mode="chunked", chunk_size=256, **k), ref.backward


def _la_reference():
    from minilm.ops import linear_attention as ref
    return "numpy", lambda *a, **k: ref.forward(*a, mode="chunked", chunk_size=64, **k), ref.backward


def _record_check(results, op, shape, dtype, reference, errors, tolerance, seconds):
    worst = max(errors.values())
    passed = bool(np.isfinite(worst) and worst <= tolerance)
    row = {"op": op, "shape": shape, "dtype": dtype, "reference": reference, "tolerance": tolerance,
           "max_rel_error": worst, "passed": passed, "seconds": round(seconds, 1), "errors": errors}
    results.data["correctness"].append(row)
    log(f"{'PASS' if passed else 'FAIL'}  {op} {shape} {dtype} vs {reference}: max rel. error {worst:.2e} "
        f"(tolerance {tolerance:g})  " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    return passed


def check_scan(results, B, T, D, N, dtype, tolerance, seed, reference=None, gate=True):
    from numba import cuda
    from minilm.kernels.cuda import _device
    from minilm.kernels.cuda import selective_scan as gpu
    started = time.time()
    arrays, options, dout = scan_inputs(B, T, D, N, dtype, seed, gate)
    name, ref_forward, ref_backward = reference or _scan_reference()
    _device.POISON_OUTPUTS = True
    try:
        device, device_options = on_device(arrays), on_device(options)
        (out, final), cache = gpu.forward(*device.values(), return_state=True, **device_options)
        grads = gpu.backward(cuda.to_device(dout), cache)
        out, final = out.copy_to_host(), final.copy_to_host()
        grads = [None if g is None else g.copy_to_host() for g in grads]
    finally:
        _device.POISON_OUTPUTS = False
    (out_ref, final_ref), cache_ref = ref_forward(*arrays.values(), return_state=True, **options)
    grads_ref = ref_backward(dout, cache_ref)
    errors = {"out": relative_error(out, out_ref), "final_state": relative_error(final, final_ref)}
    for label, grad, grad_ref in zip(SCAN_GRADS, grads, grads_ref):
        if grad is not None or grad_ref is not None:
            errors[label] = relative_error(grad, grad_ref) if grad is not None and grad_ref is not None else float("inf")
    return _record_check(results, "selective_scan", f"B={B} T={T} D={D} N={N}", np.dtype(dtype).name, name,
                         errors, tolerance, time.time() - started)


def check_la(results, B, H, T, Dk, Dv, dtype, tolerance, seed, feature_map="identity", decay=None, state=False,
             scale=None, reference=None):
    from numba import cuda
    from minilm.kernels.cuda import _device
    from minilm.kernels.cuda import linear_attention as gpu
    started = time.time()
    (q, k, v), options, do = la_inputs(B, H, T, Dk, Dv, dtype, seed, decay, state)
    name, ref_forward, ref_backward = reference or _la_reference()
    kwargs = dict(feature_map=feature_map, scale=scale, return_state=True)
    _device.POISON_OUTPUTS = True
    try:
        device_options = on_device(options)
        (out, final), cache = gpu.forward(*(cuda.to_device(x) for x in (q, k, v)), **kwargs, **device_options)
        grads = [g.copy_to_host() for g in gpu.backward(cuda.to_device(do), cache)]
        out, final = out.copy_to_host(), final.copy_to_host()
    finally:
        _device.POISON_OUTPUTS = False
    (out_ref, final_ref), cache_ref = ref_forward(q, k, v, **kwargs, **options)
    grads_ref = ref_backward(do, cache_ref)
    errors = {"out": relative_error(out, out_ref), "final_state": relative_error(final, final_ref)}
    for label, grad, grad_ref in zip(LA_GRADS, grads, grads_ref):
        errors[label] = relative_error(grad, grad_ref)
    if len(grads) != len(grads_ref):
        errors["n_grads"] = float("inf")
    shape = f"B={B} H={H} T={T} Dk={Dk} Dv={Dv} {feature_map}" + (f" decay={decay}" if decay else "") + \
        (" h0" if state else "")
    return _record_check(results, "linear_attention", shape, np.dtype(dtype).name, name, errors, tolerance,
                         time.time() - started)


def section_correctness(results, smoke):
    from minilm.ops import linear_attention as la_ref
    from minilm.ops import selective_scan as scan_ref
    numpy_scan = ("numpy", lambda *a, **k: scan_ref.forward(*a, mode="chunked", chunk_size=16, **k), scan_ref.backward)
    numpy_la = ("numpy", lambda *a, **k: la_ref.forward(*a, mode="chunked", chunk_size=16, **k), la_ref.backward)
    if smoke:
        check_scan(results, 1, 9, 3, 3, np.float32, 1e-4, 1)
        check_la(results, 1, 2, 11, 5, 6, np.float32, 1e-4, 2, decay="step", state=True)
        check_scan(results, 1, 5, 2, 2, np.float64, 1e-10, 3, reference=numpy_scan)
        check_la(results, 1, 1, 9, 3, 4, np.float64, 1e-10, 4, feature_map="elu1", decay="head", reference=numpy_la)
        return
    # the target shapes (float32; long sequences accumulate rounding, hence 1e-4)
    check_scan(results, 4, 4096, 1536, 16, np.float32, 1e-4, 10)
    check_la(results, 2, 16, 16384, 64, 64, np.float32, 1e-4, 11)
    # odd shapes: nothing a multiple of a block, several state groups, several value tiles
    check_scan(results, 2, 1000, 100, 37, np.float32, 1e-4, 12)
    check_la(results, 1, 3, 2000, 40, 72, np.float32, 1e-4, 13, feature_map="elu1", decay="step", state=True,
             scale=0.125)
    check_la(results, 2, 2, 700, 64, 64, np.float32, 1e-4, 14, feature_map="relu", decay="head")
    # float64 against the NumPy reference at small sizes
    check_scan(results, 2, 150, 20, 5, np.float64, 1e-10, 15, reference=numpy_scan)
    check_la(results, 1, 2, 150, 16, 24, np.float64, 1e-10, 16, feature_map="elu1", decay="step", state=True,
             reference=numpy_la)


# ----------------------------------------------------------------------------------------------
# 2. timings

QUICK = False   # --smoke: one warm-up and one repeat (the simulator is slow)


def time_gpu(fn, warmup=2, repeats=10):
    """Median, 20th and 80th percentile in ms of fn() measured with CUDA events (after warm-up).

    host_ms is the median time the host spends inside fn() before it returns. Kernel launches are
    asynchronous, so that is the Python cost of the call (argument checks, allocations, launches);
    when it is close to ms, the GPU spent the call mostly waiting for the host.
    """
    from numba import cuda
    if QUICK:
        warmup, repeats = 1, 1
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    times, host = [], []
    for _ in range(repeats):
        start, end = cuda.event(), cuda.event()
        wall = time.perf_counter()
        start.record()
        fn()
        host.append(1e3 * (time.perf_counter() - wall))
        end.record()
        end.synchronize()
        wall = 1e3 * (time.perf_counter() - wall)
        times.append(_event_ms(start, end, wall))
    times.sort()
    return {"ms": statistics.median(times), "p20_ms": times[int(0.2 * (len(times) - 1))],
            "p80_ms": times[int(0.8 * (len(times) - 1))], "host_ms": statistics.median(host),
            "repeats": len(times)}


def _event_ms(start, end, fallback):
    """Milliseconds between two recorded CUDA events (the wall time where events cannot tell)."""
    from numba import cuda
    for elapsed_time in (lambda: start.elapsed_time(end), lambda: cuda.event_elapsed_time(start, end)):
        try:
            value = float(elapsed_time())
            if value > 0:
                return value
        except Exception:
            continue
    return fallback


def _record_timing(results, table, **row):
    results.data[table].append(row)
    extras = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                       if k not in ("op", "shape", "ms"))
    log(f"{row['op']:<28} {row['shape']:<28} {row['ms']:9.3f} ms   {extras}")


def scan_device_inputs(B, T, D, N, seed):
    """The two timed workloads on the device, each (arrays, options): "plain", the peer's
    (peer_workload), and "full" (Δ = softplus(delta + bias) inside the kernel, D skip, z gate);
    and dout."""
    from numba import cuda
    arrays, options, dout = scan_inputs(B, T, D, N, np.float32, seed)
    plain = tuple(on_device(part) for part in peer_workload(arrays, options))
    del options["initial_state"]
    return plain, (on_device(arrays), on_device(options)), cuda.to_device(dout)


def scan_bytes(B, T, D, N, gated):
    """Bytes the forward must move at least: u, delta, out (and z) in float32, plus Bm and Cm."""
    return 4 * (B * T * D * (4 if gated else 3) + 2 * B * T * N)


def time_pair(results, op, shape, L, forward, backward, label="", forward_fields=None):
    """Time forward() and then forward() + backward(its cache), as training runs them; record the rows
    "<op> fwd<label>" and "<op> fwd+bwd<label>". forward_fields(ms): extra fields of the forward row."""
    t_fwd = time_gpu(forward)
    _record_timing(results, "timings", op=f"{op} fwd{label}", shape=shape, L=L, **t_fwd,
                   **(forward_fields(t_fwd["ms"]) if forward_fields else {}))
    t_both = time_gpu(lambda: backward(forward()[1]), warmup=1, repeats=5)
    _record_timing(results, "timings", op=f"{op} fwd+bwd{label}", shape=shape, L=L, **t_both,
                   ratio_to_fwd=t_both["ms"] / t_fwd["ms"])


def section_timings(results, smoke):
    from numba import cuda
    from minilm.kernels.cuda import linear_attention as la
    from minilm.kernels.cuda import selective_scan as scan
    shapes = [(1, 64, 16, 4)] if smoke else [(4, 1024, 1536, 16), (4, 4096, 1536, 16)]
    for B, T, D, N in shapes:
        plain, full, dout = scan_device_inputs(B, T, D, N, 20)
        for label, (arrays, options) in (("", plain), (" +z,bias,softplus", full)):
            gb = scan_bytes(B, T, D, N, "z" in options) / 1e9
            time_pair(results, "scan", f"B={B} T={T} D={D} N={N}", T,
                      lambda: scan.forward(*arrays.values(), **options),
                      lambda cache: scan.backward(dout, cache), label,
                      forward_fields=lambda ms: {"GBps": gb / (ms / 1e3)})
        del plain, full, dout
    for T in ([64] if smoke else [1024, 4096, 16384]):
        B, H, Dk = (1, 2, 8) if smoke else (2, 16, 64)
        (q, k, v), _, do = la_inputs(B, H, T, Dk, Dk, np.float32, 21)
        q, k, v, do = (cuda.to_device(x) for x in (q, k, v, do))
        flops = 2 * B * H * (T // 64 + 1) * (4 * 64 ** 3)     # QKᵀ, AV, QS, KᵀV per 64-chunk (no causal skip)
        time_pair(results, "linear_attn", f"B={B} H={H} T={T} d={Dk}", T,
                  lambda: la.forward(q, k, v), lambda cache: la.backward(do, cache),
                  forward_fields=lambda ms: {"TFLOPs": flops / (ms / 1e3) / 1e12})


def check_arrays_in_and_out(results, library, convert, is_theirs, to_host, address, smoke):
    """The scan and linear attention, forward and backward, called with another library's device
    arrays (convert: NumPy array -> one of them): the results must come back as that library's
    arrays (is_theirs), match the Numba-array path, and the inputs must be used where they lie, not
    copied (address: an array's device pointer; the caches keep Numba views of the inputs)."""
    from numba import cuda
    from minilm.kernels.cuda import linear_attention as la
    from minilm.kernels.cuda import selective_scan as scan

    def compare(op, shape, run, input_name, started):
        """run(to_device) -> (the first input as given, the cache's view of it, {name: result})."""
        given, cached, theirs = run(convert)
        _, _, ours = run(cuda.to_device)
        kinds_ok = all(is_theirs(x) for x in theirs.values())
        errors = {name: relative_error(to_host(theirs[name]), ours[name].copy_to_host()) if kinds_ok
                  else float("inf") for name in theirs}
        in_place = device_pointer(cached) == address(given)
        errors[f"{input_name} in place"] = 0.0 if in_place else float("inf")
        _record_check(results, f"{op} {library} in/out", shape, "float32", "numba arrays", errors, 1e-5,
                      time.time() - started)

    started = time.time()
    B, T, D, N = (1, 64, 16, 4) if smoke else (4, 4096, 1536, 16)
    arrays, options, dout = scan_inputs(B, T, D, N, np.float32, 24)
    options = {key: value for key, value in options.items() if key != "initial_state"}

    def run_scan(to_device):
        inputs = [to_device(x) for x in arrays.values()]
        out, cache = scan.forward(*inputs, **{k: to_device(v) if isinstance(v, np.ndarray) else v
                                              for k, v in options.items()})
        grads = scan.backward(to_device(dout), cache)
        return inputs[0], cache["u"], {"out": out, **{name: g for name, g in zip(SCAN_GRADS, grads) if g is not None}}

    compare("selective_scan", f"B={B} T={T} D={D} N={N}", run_scan, "u", started)

    started = time.time()
    B, H, T, d = (1, 2, 64, 8) if smoke else (2, 16, 16384, 64)
    (q, k, v), _, do = la_inputs(B, H, T, d, d, np.float32, 25)

    def run_la(to_device):
        q_dev = to_device(q)
        out, cache = la.forward(q_dev, to_device(k), to_device(v))
        return q_dev, cache["q"], dict(zip(("out", "dq", "dk", "dv"), [out, *la.backward(to_device(do), cache)]))

    compare("linear_attention", f"B={B} H={H} T={T} d={d}", run_la, "q", started)


def device_pointer(array):
    """The device address of a Numba device array's data."""
    return array.__cuda_array_interface__["data"][0]


def section_torch(results, smoke):
    """PyTorch tensors in and out, as a training loop would call the kernels: results must match the
    Numba-array path (outputs then come from PyTorch's caching allocator), and the timings show what
    allocation costs the call."""
    try:
        import torch
        if not torch.cuda.is_available():
            raise ImportError("torch without CUDA")
    except ImportError as error:
        log(f"(torch section skipped: {error})")
        return
    from minilm.kernels.cuda import linear_attention as la
    from minilm.kernels.cuda import selective_scan as scan
    check_arrays_in_and_out(results, "torch", lambda x: torch.as_tensor(x, device="cuda"),
                            lambda x: isinstance(x, torch.Tensor), lambda x: x.cpu().numpy(),
                            lambda x: x.data_ptr(), smoke)
    B, T, D, N = (1, 64, 16, 4) if smoke else (4, 4096, 1536, 16)
    shape = f"B={B} T={T} D={D} N={N}"
    arrays, options, dout = scan_inputs(B, T, D, N, np.float32, 24)
    plain_arrays, plain = (
        {key: torch.as_tensor(value, device="cuda") for key, value in part.items()}
        for part in peer_workload(arrays, options))
    dout_t = torch.as_tensor(dout, device="cuda")
    time_pair(results, "scan", shape, T, lambda: scan.forward(*plain_arrays.values(), **plain),
              lambda cache: scan.backward(dout_t, cache), " (torch in/out)")
    del plain_arrays, dout_t

    B, H, T, d = (1, 2, 64, 8) if smoke else (2, 16, 16384, 64)
    (q, k, v), _, do = la_inputs(B, H, T, d, d, np.float32, 25)
    q, k, v, do = (torch.as_tensor(x, device="cuda") for x in (q, k, v, do))
    time_pair(results, "linear_attn", f"B={B} H={H} T={T} d={d}", T, lambda: la.forward(q, k, v),
              lambda cache: la.backward(do, cache), " (torch in/out)")


def section_cupy(results, smoke):
    """CuPy arrays in and out: the same checks as PyTorch's (check_arrays_in_and_out), no timings."""
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as error:      # not installed, or no device (the simulator)
        log(f"(cupy section skipped: {error!r})")
        return
    check_arrays_in_and_out(results, "cupy", cupy.asarray, lambda x: isinstance(x, cupy.ndarray), cupy.asnumpy,
                            lambda x: x.data.ptr, smoke)


@contextlib.contextmanager
def memory_pool(enabled):
    """with memory_pool(False): ... runs the kernels with minilm's memory pool off (Numba arrays get
    their device memory from cuMemAlloc) or on, then puts the previous setting back."""
    from minilm.kernels.cuda import use_memory_pool
    previous = use_memory_pool(enabled)
    try:
        yield
    finally:
        use_memory_pool(previous)


def section_memory_pool(results, smoke):
    """The memory pool (use_memory_pool) on a real device: its bookkeeping (a slice keeps its
    buffer lent, a buffer comes back once its last view is gone), the outputs and gradients of both
    ops from pooled buffers (second run: every buffer handed out again, NaN-poisoned first) against
    an unpooled run, then the timings without the pool (rows labelled "(no memory pool)"; the
    other timings have it)."""
    from numba import cuda
    from minilm.kernels.cuda import _device
    from minilm.kernels.cuda import linear_attention as la
    from minilm.kernels.cuda import selective_scan as scan
    if _device.simulator_enabled():
        log("(memory pool section skipped: the simulator has no device memory to pool)")
        return
    started = time.time()
    pool = _device.memory_pool()

    def address(array):
        return array.__cuda_array_interface__["data"][0]

    first = pool.empty((1 << 20,), np.float32)
    where = address(first)
    part = first[10:20]
    del first
    other = pool.empty((1 << 20,), np.float32)
    lent_again_too_early = address(other) == where
    del part
    again = pool.empty((1 << 20,), np.float32)
    _device.fill(again, 3.0)
    bookkeeping = {"slice keeps its buffer": float("inf") if lent_again_too_early else 0.0,
                   "buffer comes back": 0.0 if address(again) == where else float("inf"),
                   "values": relative_error(again.copy_to_host(), np.full(1 << 20, 3.0))}
    del other, again
    _record_check(results, "memory pool bookkeeping", "4 MiB buffers", "float32", "expected", bookkeeping, 0.0,
                  time.time() - started)

    started = time.time()
    B, T, D, N = (1, 64, 16, 4) if smoke else (4, 4096, 1536, 16)
    (plain_arrays, plain), (arrays, options), dout = scan_device_inputs(B, T, D, N, 28)
    Bl, H, L, d = (1, 2, 64, 8) if smoke else (2, 16, 16384, 64)
    (q, k, v), _, do = la_inputs(Bl, H, L, d, d, np.float32, 29)
    q, k, v, do = (cuda.to_device(x) for x in (q, k, v, do))

    def run():
        out, cache = scan.forward(*arrays.values(), **options)
        values = {"scan out": out.copy_to_host()}
        values.update({f"scan {name}": g.copy_to_host() for name, g in zip(SCAN_GRADS, scan.backward(dout, cache))
                       if g is not None})
        out, cache = la.forward(q, k, v)
        values["la out"] = out.copy_to_host()
        values.update({f"la {name}": g.copy_to_host() for name, g in zip(LA_GRADS, la.backward(do, cache))})
        return values

    _device.POISON_OUTPUTS = True
    try:
        with memory_pool(False):
            unpooled = run()
        with memory_pool(True):
            run()
            pooled = run()
    finally:
        _device.POISON_OUTPUTS = False
    errors = {name: relative_error(pooled[name], unpooled[name]) for name in unpooled}
    _record_check(results, "scan + linear_attention, memory pool", f"B={B} T={T} D={D} N={N}; B={Bl} H={H} T={L} d={d}",
                  "float32", "no pool", errors, 1e-5, time.time() - started)

    with memory_pool(False):
        for label, forward, backward, shape, L_row in (
                ("scan", lambda: scan.forward(*plain_arrays.values(), **plain),     # the peer's work, as "scan fwd"
                 lambda cache: scan.backward(dout, cache), f"B={B} T={T} D={D} N={N}", T),
                ("linear_attn", lambda: la.forward(q, k, v), lambda cache: la.backward(do, cache),
                 f"B={Bl} H={H} T={L} d={d}", L)):
            time_pair(results, label, shape, L_row, forward, backward, " (no memory pool)")
    in_use, idle = pool.held_bytes()
    log(f"memory pool: {pool.hits} requests served from the pool, {pool.misses} new buffers; "
        f"holds {in_use / 2**20:.0f} MiB in use, {idle / 2**20:.0f} MiB idle")
    pool.release()


def _unpooled(call):
    with memory_pool(False):
        return call()


def target_calls(smoke):
    """({label: call}, (scan arrays, scan options)): scan fwd, scan fwd+bwd, linear_attn fwd,
    linear_attn fwd+bwd at the target shapes, Numba device arrays in and out."""
    from numba import cuda
    from minilm.kernels.cuda import linear_attention as la
    from minilm.kernels.cuda import selective_scan as scan
    B, T, D, N = (1, 64, 16, 4) if smoke else (4, 4096, 1536, 16)
    (arrays, options), _, dout = scan_device_inputs(B, T, D, N, 26)
    B, H, L, d = (1, 2, 64, 8) if smoke else (2, 16, 16384, 64)
    (q, k, v), _, do = la_inputs(B, H, L, d, d, np.float32, 27)
    q, k, v, do = (cuda.to_device(x) for x in (q, k, v, do))
    return {
        "scan fwd": lambda: scan.forward(*arrays.values(), **options),
        "scan fwd+bwd": lambda: scan.backward(dout, scan.forward(*arrays.values(), **options)[1]),
        "linear_attn fwd": lambda: la.forward(q, k, v),
        "linear_attn fwd+bwd": lambda: la.backward(do, la.forward(q, k, v)[1]),
    }, (arrays, options)


def section_host_profile(results, smoke, repeats=30):
    """Where the host time of a call goes: cProfile over repeated calls at the target shapes, Numba
    device arrays in and out (PyTorch tensors too where PyTorch has CUDA). The device is synchronised
    after every call, so waiting for the GPU shows up as the synchronize lines. Logs each call's
    costliest functions by own time (microseconds per call); results["host_profile"] keeps them."""
    import cProfile
    import pstats
    from numba import cuda
    from minilm.kernels.cuda import selective_scan as scan
    calls, (arrays, options) = target_calls(smoke)
    for label in ("scan fwd", "linear_attn fwd+bwd"):
        calls[f"{label} (no memory pool)"] = lambda call=calls[label]: _unpooled(call)
    try:
        import torch
        if torch.cuda.is_available():
            tensors = {key: torch.as_tensor(value, device="cuda") for key, value in arrays.items()}
            D_t = torch.as_tensor(options["D"], device="cuda")
            calls["scan fwd (torch in/out)"] = lambda: scan.forward(*tensors.values(), D=D_t)
    except ImportError:
        pass
    repeats = 2 if smoke else repeats
    for label, call in calls.items():
        call()
        cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(repeats):
            call()
            cuda.synchronize()
        profiler.disable()
        stats = pstats.Stats(profiler).stats       # (file, line, function) -> (cc, calls, own, cumulative, callers)
        rows = sorted(({"own_us": 1e6 * own / repeats, "cumulative_us": 1e6 * cumulative / repeats,
                        "calls": n_calls / repeats, "function": f"{os.path.basename(where[0])}:{where[1]}({where[2]})"}
                       for where, (_, n_calls, own, cumulative, _) in stats.items()),
                      key=lambda row: -row["own_us"])[:14]
        results.data["host_profile"][label] = rows
        log(f"-- {label}: host time per call, costliest functions by own time")
        log(f"{'own us':>10} {'cum. us':>10} {'calls':>7}  function")
        for row in rows:
            log(f"{row['own_us']:10.1f} {row['cumulative_us']:10.1f} {row['calls']:7.1f}  {row['function']}")


@contextlib.contextmanager
def kernel_events():
    """with kernel_events() as launches: ... records a CUDA event before and after every kernel
    launch (numba-cuda's CUDADispatcher.call) into launches: (kernel name, start, end)."""
    from numba import cuda
    from numba.cuda import dispatcher
    launches = []
    original = dispatcher.CUDADispatcher.call

    def call(self, *args, **kwargs):
        start, end = cuda.event(), cuda.event()
        start.record()
        result = original(self, *args, **kwargs)
        end.record()
        launches.append((self.py_func.__name__, start, end))
        return result

    dispatcher.CUDADispatcher.call = call
    try:
        yield launches
    finally:
        dispatcher.CUDADispatcher.call = original


def kernel_times(call, repeats):
    """(the call's GPU time, {kernel: its GPU time summed over its launches in the call}) in ms, each
    the median over repeats, from CUDA events around the call and around every launch."""
    from numba import cuda
    per_kernel, totals = {}, []
    for _ in range(repeats):
        with kernel_events() as launches:
            start, end = cuda.event(), cuda.event()
            start.record()
            call()
            end.record()
            end.synchronize()
        totals.append(_event_ms(start, end, float("nan")))
        summed = {}
        for name, first, last in launches:
            summed[name] = summed.get(name, 0.0) + _event_ms(first, last, float("nan"))
        for name, ms in summed.items():
            per_kernel.setdefault(name, []).append(ms)
    return statistics.median(totals), {name: statistics.median(values) for name, values in per_kernel.items()}


def section_kernel_times(results, smoke, repeats=7):
    """The GPU time of each kernel of a call (events around every launch; median over repeats,
    summed over a kernel's launches in the call) next to the call's own time: their difference is
    the GPU waiting for the host. results["kernel_times"] gets one row per call."""
    from numba import cuda
    from minilm.kernels.cuda import _device
    if _device.simulator_enabled():
        log("(GPU time per kernel skipped: the simulator has no GPU clock)")
        return
    calls, _ = target_calls(smoke)
    for label, call in calls.items():
        call()
        cuda.synchronize()
        call_ms, kernels = kernel_times(call, 2 if smoke else repeats)
        row = {"call": label, "call_ms": call_ms, "kernels_ms": sum(kernels.values()), **kernels}
        results.data["kernel_times"].append(row)
        log(f"{label:<22} call {row['call_ms']:7.3f} ms   kernels {row['kernels_ms']:7.3f} ms   " +
            "  ".join(f"{name} {ms:.3f}" for name, ms in kernels.items()))


SWEEP = [  # scan block shapes, most promising first (the forward's segments must divide the backward's
           # chunk: the forward stores the state entering each of them); registers and warps per
           # multiprocessor for sm_90 from bench/cuda_registers.py
    dict(),                                          # fwd 128-thread blocks: 80 registers (12 B spilled), 24 warps; bwd (warp sums) 64 (64 B spilled), 32 warps
    dict(fwd_segments=8),                            # fwd 64-thread blocks, chunks of 64: 164 registers, 12 warps
    dict(fwd_steps=4),                               # fwd 128-thread blocks of 4 steps, chunks of 64: 80 (28 B spilled), 24 warps
    dict(bwd_min_blocks=1),                          # bwd 126 registers (none spilled), 16 warps
    dict(bwd_warp_sums=False),                       # bwd sums by shared-memory atomics: 64 (236 B spilled), 32 warps
]
LA_SWEEP = [  # linear attention: (tile = chunk, register tile, launch bounds: blocks per SM or 0,
              # tile products on float FMAs or tensor cores: off | 3xtf32 | tf32, tile loads in flight
              # per thread). Measured before (docs/kernels.md): 8 x 8 register tiles, tile 32, tensor
              # cores without launch bounds
    (64, 4, 4, "off", 4), (64, 4, 3, "off", 4), (64, 4, 4, "tf32", 4), (64, 4, 3, "tf32", 4),
    (64, 4, 4, "3xtf32", 4), (64, 4, 4, "off", 8), (64, 4, 4, "off", 1), (64, 4, 0, "off", 4)]


def run_sweep(results, op, entries, configure, restore, forward, backward, L, until_s):
    """For each entry while the run is younger than until_s: configure(entry) -> its description;
    check the output and every gradient against the first entry's; time forward and forward +
    backward, and each kernel of forward + backward; record a row of the sweep table. A failing
    entry is reported and the next one runs; restore() puts the default configuration back after
    every entry."""
    from minilm.kernels.cuda import _device
    reference = None
    for entry in entries:
        if elapsed() > until_s and not QUICK:
            log("(sweep stopped: time budget)")
            break
        shape = str(entry)
        try:
            shape = configure(entry)
            out, cache = forward()
            outputs = [out.copy_to_host()] + [g.copy_to_host() for g in backward(cache) if g is not None]
            if not all(np.isfinite(x).all() for x in outputs):
                raise FloatingPointError("non-finite output or gradient")
            if reference is None:
                reference = outputs
            error = max(relative_error(a, b) for a, b in zip(outputs, reference))
            t_fwd = time_gpu(forward, warmup=1, repeats=7)
            t_both = time_gpu(lambda: backward(forward()[1]), warmup=1, repeats=3)
            # each kernel's GPU time too: whole calls carry the host's noise (~25 % in sweeps)
            kernels = {} if _device.simulator_enabled() else \
                {f"{name}_ms": ms for name, ms in kernel_times(lambda: backward(forward()[1]), 3)[1].items()}
            _record_timing(results, "sweep", op=op, shape=shape, L=L, **t_fwd, fwdbwd_ms=t_both["ms"],
                           rel_error_vs_default=error, **kernels)
        except Exception as error:
            log(f"!!! sweep {shape} failed: {error!r}")
            results.data["errors"].append({"section": f"sweep {shape}", "error": repr(error)[:300]})
        finally:
            restore()


def section_sweep(results, smoke, until_s):
    from minilm.kernels.cuda import selective_scan as scan
    B, T, D, N = (1, 64, 16, 4) if smoke else (4, 4096, 1536, 16)
    (arrays, options), _, dout = scan_device_inputs(B, T, D, N, 22)
    default = scan.CONFIGS["float32"]

    def configure(changes):
        scan.set_config("float32", **changes)
        return str(scan.CONFIGS["float32"])[10:]

    def restore():
        scan.CONFIGS["float32"] = default

    run_sweep(results, "scan sweep fwd", SWEEP, configure, restore, lambda: scan.forward(*arrays.values(), **options),
              lambda cache: scan.backward(dout, cache), T, until_s)


def section_la_sweep(results, smoke, until_s):
    from numba import cuda
    from minilm.kernels.cuda import linear_attention as la
    B, H, T, d = (1, 2, 64, 8) if smoke else (2, 16, 16384, 64)
    (q, k, v), _, do = la_inputs(B, H, T, d, d, np.float32, 23)
    q, k, v, do = (cuda.to_device(x) for x in (q, k, v, do))
    default = (la.TILES["float32"], la.REGS["float32"], la.MIN_BLOCKS["float32"], la.TENSOR_CORES["float32"],
               la.LOADS["float32"])

    def configure(entry):
        la.set_tile("float32", *entry)
        return "tile={} reg={} min_blocks={} tensor_cores={} loads={}".format(*entry)

    entries = LA_SWEEP if not smoke else [(8, 4, 3, "off", 4), (8, 4, 3, "off", 1), (8, 2, 0, "off", 4)]
    run_sweep(results, "linear_attn sweep fwd", entries, configure,
              lambda: la.set_tile("float32", *default), lambda: la.forward(q, k, v),
              lambda cache: la.backward(do, cache), T, until_s)


# ----------------------------------------------------------------------------------------------
# 3. peers and the summary

def section_peers(results, smoke, timeout):
    script = os.path.join(ROOT, ".whl", "peers.py")
    if smoke or not os.path.exists(script):
        log(f"(peers skipped: {'smoke run' if smoke else script + ' not found'}; using the recorded H100 figures)")
        return
    command = [sys.executable, script, "--what", "ceiling,fla,mambapy,sdpa", "--L", "1024,4096,16384"]
    log("running:", " ".join(command))
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        stdout, stderr = completed.stdout, completed.stderr
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        stderr = "timeout"
        results.data["errors"].append({"section": "peers", "error": f"timed out after {timeout} s"})
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            results.data["peers"].append(record)
            log("peer:", line)
    if stderr and stderr != "timeout":
        log("peers stderr (last lines):", "\n".join(stderr.strip().splitlines()[-5:]))


def _peer_figures(results):
    figures = dict(FALLBACK_PEERS)
    measured = set()
    for record in results.data["peers"]:
        peer = record.get("peer")
        if peer == "copy" and "TBps" in record:
            figures["copy_TBps"] = record["TBps"]
            measured.add("copy_TBps")
        elif peer == "mambapy_pscan" and "fwd_ms" in record:
            figures[("mambapy", record["L"])] = record["fwd_ms"]
            measured.add(("mambapy", record["L"]))
        elif peer == "fla_chunk_linear_attn" and "fwd_ms" in record:
            figures[("fla_fwd", record["L"])] = record["fwd_ms"]
            figures[("fla_fwdbwd", record["L"])] = record["fwdbwd_ms"]
            measured.update({("fla_fwd", record["L"]), ("fla_fwdbwd", record["L"])})
    return figures, measured


def _ours(results, op, L):
    for row in results.data["timings"]:
        if row["op"] == op and row["L"] == L:
            return row
    return None


def section_summary(results):
    figures, measured = _peer_figures(results)
    rows = []

    def add(what, ours, peer, ratio, target, better, source):
        met = None
        if ratio is not None and target is not None:
            met = ratio >= target if better == "higher" else ratio <= target
        rows.append({"what": what, "ours": ours, "peer": peer, "ratio": ratio,
                     "target": (">= " if better == "higher" else "<= ") + f"{target:g}" if target else "",
                     "met": met, "peer_source": source})

    def add_vs_peer(what, ours, peer_key, target, better, speedup=False):
        """A row against a peer's figure: ratio peer / ours (a speed-up) or ours / peer."""
        peer = figures.get(peer_key)
        ratio = None if not peer else (peer / ours if speedup else ours / peer)
        add(what, ours, peer, ratio, target, better, "measured" if peer_key in measured else "recorded H100")

    for L in (1024, 4096):
        fwd = _ours(results, "scan fwd", L)
        if fwd:
            add_vs_peer(f"scan fwd L={L}: speed-up vs mambapy pscan (ms)", fwd["ms"], ("mambapy", L),
                        TARGETS["scan_speedup_vs_mambapy"] if L == 4096 else None, "higher", speedup=True)
    fwd = _ours(results, "scan fwd", 4096)
    if fwd:
        add_vs_peer("scan fwd L=4096: bandwidth, fraction of copy (TB/s)", fwd["GBps"] / 1e3, "copy_TBps",
                    TARGETS["scan_fraction_of_copy"], "higher")
        both = _ours(results, "scan fwd+bwd", 4096)
        if both:
            add("scan L=4096: fwd+bwd / fwd (ms)", both["ms"], fwd["ms"], both["ms"] / fwd["ms"],
                TARGETS["scan_fwdbwd_over_fwd"], "lower", "ours")
    # the same ratio from the GPU time of the kernels alone (section_kernel_times): without the
    # host's share of each call, which moves the whole-call ratio by a tenth from run to run
    kernels = {row["call"]: row["kernels_ms"] for row in results.data["kernel_times"]}
    if "scan fwd" in kernels and "scan fwd+bwd" in kernels:
        add("scan L=4096: fwd+bwd / fwd, kernels alone (ms)", kernels["scan fwd+bwd"], kernels["scan fwd"],
            kernels["scan fwd+bwd"] / kernels["scan fwd"], TARGETS["scan_fwdbwd_over_fwd"], "lower", "ours")
    for L in (1024, 4096, 16384):
        fwd = _ours(results, "linear_attn fwd", L)
        if fwd:
            add_vs_peer(f"linear attn fwd L={L}: ours / fla (ms)", fwd["ms"], ("fla_fwd", L),
                        TARGETS["la_fwd_over_fla"] if L == 16384 else None, "lower")
        both = _ours(results, "linear_attn fwd+bwd", L)
        if both:
            add_vs_peer(f"linear attn fwd+bwd L={L}: ours / fla (ms)", both["ms"], ("fla_fwdbwd", L),
                        TARGETS["la_fwdbwd_over_fla"] if L == 16384 else None, "lower")
    for op, short, long in (("scan fwd", 1024, 4096), ("linear_attn fwd", 1024, 16384),
                            ("linear_attn fwd+bwd", 1024, 16384)):
        first, last = _ours(results, op, short), _ours(results, op, long)
        if first and last:
            growth = last["ms"] / first["ms"]
            add(f"{op.replace('_', ' ')} L={short}->{long}: time growth / L growth", growth, float(long // short),
                growth / (long // short), TARGETS["growth_over_L"], "lower", "ours")
    for label in (" (torch in/out)", " (no memory pool)"):     # the same targets, other kinds of output memory
        scan_fwd = _ours(results, f"scan fwd{label}", 4096)
        if scan_fwd:
            add_vs_peer(f"scan fwd{label} L=4096: speed-up vs pscan (ms)", scan_fwd["ms"], ("mambapy", 4096),
                        TARGETS["scan_speedup_vs_mambapy"], "higher", speedup=True)
            scan_both = _ours(results, f"scan fwd+bwd{label}", 4096)
            if scan_both:
                add(f"scan{label} L=4096: fwd+bwd / fwd (ms)", scan_both["ms"], scan_fwd["ms"],
                    scan_both["ms"] / scan_fwd["ms"], TARGETS["scan_fwdbwd_over_fwd"], "lower", "ours")
        for op, peer_name, target in (("fwd", "fla_fwd", "la_fwd_over_fla"),
                                      ("fwd+bwd", "fla_fwdbwd", "la_fwdbwd_over_fla")):
            row = _ours(results, f"linear_attn {op}{label}", 16384)
            if row:
                add_vs_peer(f"linear attn {op}{label} L=16384: ours / fla (ms)", row["ms"], (peer_name, 16384),
                            TARGETS[target], "lower")
    # the fastest correct entry of each sweep (same shapes as the target rows above)
    sweep = [row for row in results.data["sweep"] if row["rel_error_vs_default"] <= 1e-4]

    def fastest(op, key):
        return min((row for row in sweep if row["op"] == op), key=lambda row: row[key], default=None)

    best_scan = fastest("scan sweep fwd", "ms")
    if best_scan:
        add_vs_peer(f"scan fwd L={best_scan['L']}, best of sweep: speed-up vs pscan (ms)", best_scan["ms"],
                    ("mambapy", best_scan["L"]), TARGETS["scan_speedup_vs_mambapy"], "higher", speedup=True)
    best_both = fastest("scan sweep fwd", "fwdbwd_ms")
    if best_both:   # one entry's own ratio: mixing entries would pair the minima of noisy timings
        add(f"scan L={best_both['L']}, best of sweep: fwd+bwd / fwd (ms)", best_both["fwdbwd_ms"],
            best_both["ms"], best_both["fwdbwd_ms"] / best_both["ms"], TARGETS["scan_fwdbwd_over_fwd"],
            "lower", "ours")
    best_la = fastest("linear_attn sweep fwd", "ms")
    if best_la:
        add_vs_peer(f"linear attn fwd L={best_la['L']}, best of sweep: ours / fla (ms)", best_la["ms"],
                    ("fla_fwd", best_la["L"]), TARGETS["la_fwd_over_fla"], "lower")
    best_la_both = fastest("linear_attn sweep fwd", "fwdbwd_ms")
    if best_la_both:
        add_vs_peer(f"linear attn fwd+bwd L={best_la_both['L']}, best of sweep: ours / fla (ms)",
                    best_la_both["fwdbwd_ms"], ("fla_fwdbwd", best_la_both["L"]), TARGETS["la_fwdbwd_over_fla"],
                    "lower")
    # sweep entries on their own: tensor-core tiles, 3xTF32 (float32 accuracy) and TF32 (the precision
    # of fla's fp32 tiles), and the tile loads one at a time (as before LOADS)
    for label, setting, tolerance in (("3xtf32 tiles", "tensor_cores=3xtf32", 1e-4),
                                      ("tf32 tiles", "tensor_cores=tf32", 2e-2),
                                      ("loads=1", "tensor_cores=off loads=1", 1e-4)):
        entries = [row for row in results.data["sweep"] if row["op"] == "linear_attn sweep fwd"
                   and f" {setting} " in f" {row['shape']} " and row["rel_error_vs_default"] <= tolerance]
        for key, op, peer_name, target in (("ms", "fwd", "fla_fwd", "la_fwd_over_fla"),
                                           ("fwdbwd_ms", "fwd+bwd", "fla_fwdbwd", "la_fwdbwd_over_fla")):
            row = min(entries, key=lambda entry: entry[key], default=None)
            if row:
                add_vs_peer(f"linear attn {op} L={row['L']}, {label}: ours / fla (ms)", row[key],
                            (peer_name, row["L"]), TARGETS[target], "lower")
    results.data["summary"] = rows
    results.data["best_of_sweep"] = {"scan forward": best_scan and best_scan["shape"],
                                     "scan forward+backward": best_both and best_both["shape"],
                                     "linear_attn forward": best_la and best_la["shape"],
                                     "linear_attn forward+backward": best_la_both and best_la_both["shape"]}

    checks = results.data["correctness"]
    log("\n" + "=" * 110)
    log(f"device: {results.data['device']}")
    log("versions: " + ", ".join(f"{k} {v}" for k, v in results.data["versions"].items() if v))
    log(f"correctness: {sum(c['passed'] for c in checks)}/{len(checks)} checks passed" +
        "".join(f"\n  FAIL {c['op']} {c['shape']} {c['dtype']}: {c['max_rel_error']:.2e}" for c in checks
                if not c["passed"]))
    log(f"{'what':<62}{'ours':>10}{'peer':>10}{'ratio':>9}  {'target':<9}{'met':<6}peer figure")
    for row in rows:
        def cell(x):
            return f"{x:10.3f}" if isinstance(x, float) else f"{'-':>10}"
        ratio = f"{row['ratio']:9.2f}" if row["ratio"] is not None else f"{'-':>9}"
        met = {True: "yes", False: "NO", None: ""}[row["met"]]
        log(f"{row['what']:<62}{cell(row['ours'])}{cell(row['peer'])}{ratio}  {row['target']:<9}{met:<6}"
            f"{row['peer_source']}")
    for op, shape in results.data["best_of_sweep"].items():
        if shape:
            log(f"fastest {op} block shape of the sweep: {shape}")
    if results.data["errors"]:
        log(f"sections with errors: {[e['section'] for e in results.data['errors']]}")
    log(f"total time {elapsed():.0f} s; results in {results.folder}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("results", "gpu"), help="results folder")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (works under the CUDA simulator)")
    parser.add_argument("--sweeps", default="scan,la",
                        help="block-shape sweeps to run, comma-separated: scan, la (default: scan,la; none: neither)")
    parser.add_argument("--no-peers", action="store_true", help="skip running .whl/peers.py")
    parser.add_argument("--skip", default="",
                        help="sections to leave out, comma-separated: correctness, torch, cupy, pool, host "
                             "(for a short run that only compares block shapes)")
    parser.add_argument("--peers-timeout", type=int, default=150)
    parser.add_argument("--sweep-until", type=int, default=420,
                        help="seconds into the run after which the linear-attention sweep starts no new "
                             "entry (the scan sweep, which runs after it: 40 s later)")
    args = parser.parse_args()

    if args.smoke:
        global QUICK
        QUICK = True
        from minilm.kernels.cuda import linear_attention as la
        from minilm.kernels.cuda import selective_scan as scan
        for dtype in ("float32", "float64"):
            scan.set_config(dtype, channels=2, state_threads=2, states_per_thread=2, fwd_segments=2, fwd_steps=4,
                            bwd_segments=2, bwd_steps=4)
            la.set_tile(dtype, 8)
        SWEEP[1:] = [dict(fwd_segments=4, fwd_steps=2), dict(bwd_segments=4, bwd_steps=2)]

    skip = args.skip.split(",")
    results = Results(args.out)
    results.section("environment", section_environment)
    if "correctness" not in skip:
        results.section("correctness", section_correctness, args.smoke)
    results.section("timings", section_timings, args.smoke)
    if "torch" not in skip:
        results.section("torch tensors in and out", section_torch, args.smoke)
    if "cupy" not in skip:
        results.section("cupy arrays in and out", section_cupy, args.smoke)
    if "pool" not in skip:
        results.section("memory pool", section_memory_pool, args.smoke)
    if "host" not in skip:
        results.section("host time per call", section_host_profile, args.smoke)
    results.section("GPU time per kernel", section_kernel_times, args.smoke)
    if not args.no_peers:
        results.section("peers", section_peers, args.smoke, args.peers_timeout)
    sweeps = args.sweeps.split(",")
    if "la" in sweeps:
        results.section("linear attention tile sweep", section_la_sweep, args.smoke, args.sweep_until)
    if "scan" in sweeps:
        results.section("scan block-shape sweep", section_sweep, args.smoke, args.sweep_until + 40)
    results.section("summary", section_summary)
    ok = all(c["passed"] for c in results.data["correctness"]) and not results.data["errors"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
