"""CPU benchmark of the three token mixers: NumPy reference, Numba kernels, and PyTorch peers.

    python bench/cpu_kernels.py [--quick | --full] [--repeats R] [--out DIR]

Ops (float32, batch 1), with L the sequence length:
  selective scan      D=768 channels, N=16 state: forward and forward+backward.
                      Peers: mambapy's pscan (Blelloch scan in PyTorch) and a PyTorch loop over time.
  linear attention    causal, chunked (chunk 64), H=8 heads of d=64, identity feature map: forward
                      and forward+backward. Peer: the same chunked algorithm written in PyTorch.
                      Also the BLAS floor: the algorithm's matmul FLOPs at NumPy's float32 matmul rate.
  softmax attention   causal, H=8, d=64: forward+backward. Peer: torch scaled_dot_product_attention.
Plus peak extra memory (tracemalloc) of the Numba forward+backward for the scan and for attention.

Every Numba kernel and every peer is first checked against the NumPy reference op on fresh random
inputs at a small size (forward and gradients); one that disagrees is not timed. At each timed
size the result of the first timed repeat is compared again, against the reference where it is
affordable, else against the already-checked Numba kernel; a mismatch discards that timing.

Times are medians of the repeats after one warm-up call (which also compiles the Numba kernels).
Output: a header, one table per op, a targets table; CSV, JSON and a log-log PNG in --out.
"""
import argparse
import importlib
import os
import sys
import time


def _threads_from_argv(argv):
    """--threads N, read before NumPy is imported: BLAS sizes its thread pool at import time."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return None


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
if __name__ == "__main__" and _threads_from_argv(sys.argv[1:]):
    for _variable in THREAD_VARIABLES:
        os.environ[_variable] = _threads_from_argv(sys.argv[1:])

import numpy as np  # noqa: E402  (after the thread variables are set)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))      # the repository root, for `minilm` without installing

import _common  # noqa: E402  (the path above must come first)

DTYPE = np.float32
SEED = 0

# Problem sizes (fixed by the comparisons the targets are stated for).
SCAN_D, SCAN_N = 768, 16
HEADS, HEAD_DIM = 8, 64
LINEAR_CHUNK = 64

# Sweeps, per mode.
SWEEPS = {
    "quick": {"scan": [512, 1024], "linear": [1024, 2048], "attention": [512, 1024]},
    "default": {"scan": [512, 1024, 2048, 4096], "linear": [1024, 2048, 4096, 8192],
                "attention": [512, 1024, 2048, 4096]},
    "full": {"scan": [512, 1024, 2048, 4096, 8192, 16384], "linear": [1024, 2048, 4096, 8192],
             "attention": [512, 1024, 2048, 4096]},
}
SCAN_REFERENCE_MAX_L = 1024        # the NumPy chunked scan is slow; above this it is not timed
ATTENTION_REFERENCE_MAX_L = 2048   # the NumPy attention materializes (H, T, T) several times
TORCH_LOOP_AUTOGRAD_MAX_L = 1024   # autograd through a Python loop of L steps
PEER_MEMORY_CAP = 4 * 2**30        # skip a peer whose (L, D, N) tensors would exceed this
ATTENTION_MEMORY_L = (4096, 16384) # where the attention memory probe runs (the ratio shows the growth)
MATMUL_SIZE = 2048                 # square float32 matmul that sets the BLAS rate

REFERENCE = "the reference"      # the note of a reference cell
SMALL_TOLERANCE = 1e-5             # max|a-r|/max|r|, float32, small shapes
TIMED_TOLERANCE = 1e-4             # same metric at the timed sizes (long float32 sums)

# Targets: (key, description, comparison, bound).
TARGETS = [
    ("scan_pscan_speedup", "scan fwd: pscan time / numba time", ">=", 20.0),
    ("scan_loop_speedup", "scan fwd: torch loop time / numba time", ">=", 8.0),
    ("scan_fb_over_fwd", "scan numba: fwd+bwd time / fwd time", "<=", 3.0),
    ("scan_memory_ratio", "scan numba fwd+bwd: peak extra memory / input bytes", "<=", 2.0),
    ("linear_over_torch", "linear attn fwd: numba time / torch chunked time", "<=", 0.7),
    ("linear_over_floor", "linear attn fwd: numba time / BLAS floor", "<=", 3.0),
    ("attention_over_sdpa", "attention fwd+bwd: numba time / SDPA time", "<=", 1.5),
    ("attention_memory_tt", "attention numba fwd+bwd: peak extra memory / T*T fp32 (all heads)", "<=", 1.0),
]
TARGET_L = {"scan_pscan_speedup": 4096, "scan_loop_speedup": 4096, "scan_fb_over_fwd": 4096,
            "scan_memory_ratio": 4096, "linear_over_torch": 8192, "linear_over_floor": 8192,
            "attention_over_sdpa": 4096, "attention_memory_tt": 16384}


def log(message=""):
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# Optional imports

def import_torch(threads):
    try:
        import torch
    except ImportError as error:
        return None, f"torch not importable ({error}): PyTorch columns skipped"
    torch.set_num_threads(threads)
    return torch, ""


def import_pscan():
    try:
        from mambapy.pscan import pscan
    except ImportError as error:
        return None, f"mambapy not importable ({error}): pscan columns skipped"
    return pscan, ""


class NumbaPath:
    """How the Numba kernel of an op is called: through the op with backend="numba" when the op
    has it wired, else the kernel module directly. ``forward``/``backward`` are None when the
    kernel cannot be used, and ``note`` says why."""

    def __init__(self, op_name, tiny_inputs):
        self.forward = self.backward = None
        self.via = ""
        self.note = ""
        module_name = f"minilm.kernels.cpu.{op_name}"
        try:
            kernel = importlib.import_module(module_name)
        except Exception as error:       # missing or broken module: skip the column
            self.note = f"{module_name} not importable ({type(error).__name__}: {error})"
            return
        missing = [name for name in ("available", "forward", "backward") if not hasattr(kernel, name)]
        if missing:
            self.note = f"{module_name} has no {', '.join(missing)}"
            return
        ok, reason = kernel.available()
        if not ok:
            self.note = f"{module_name} unavailable: {reason}"
            return
        op = importlib.import_module(f"minilm.ops.{op_name}")
        try:
            _, cache = op.forward(*tiny_inputs, backend="numba")
            wired = isinstance(cache, dict) and cache.get("backend") == "numba"
        except Exception:                # the op does not offer backend="numba" yet
            wired = False
        if wired:
            self.forward = lambda *args, **kw: op.forward(*args, backend="numba", **kw)
            self.backward = op.backward
            self.via = f"minilm.ops.{op_name}.forward(backend='numba')"
        else:
            self.forward, self.backward = kernel.forward, kernel.backward
            self.via = f"{module_name}.forward (not wired into the op yet)"


# ----------------------------------------------------------------------------------------------
# Bookkeeping of one run

class Results:
    def __init__(self):
        self.records = []          # one dict per timed cell (CSV rows)
        self.checks = []           # validation messages, printed under the tables
        self.skips = []            # why a column or a cell is missing
        self.memory = []           # memory probes
        self.values = {}           # (op, impl, L) -> ms

    def add(self, op, impl, L, timing, extra=None):
        row = {"op": op, "impl": impl, "L": L, "ms": timing.ms, "repeats": len(timing.times),
               "times_ms": " ".join(f"{1e3 * t:.3f}" for t in timing.times),
               "ok": timing.ok, "note": timing.note}
        row.update(extra or {})
        self.records.append(row)
        if timing.ok:
            self.values[(op, impl, L)] = timing.ms
        else:
            self.skips.append(f"{op} / {impl} / L={L}: not timed: {timing.note}")
            log(f"    {impl:<22} L={L:<6} NOT TIMED: {timing.note}")
            return
        log(f"    {impl:<22} L={L:<6} {timing.ms:10.2f} ms  ({len(timing.times)} repeats) {timing.note}")

    def ms(self, op, impl, L):
        return self.values.get((op, impl, L))


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def run_cell(results, op, impl, L, fn, trusted, repeats, budget_s, trusted_name="reference"):
    """Time fn (returns a dict of named arrays), checking its first timed result against trusted."""
    def check(result):
        if trusted is None:
            return True, trusted_name or "not checked at this size"
        ok, message = _common.compare_outputs(result, trusted, TIMED_TOLERANCE)
        return ok, f"vs {trusted_name}: {message}"
    timing = _common.measure(fn, repeats, warmup=1, check=check, budget_s=budget_s)
    if timing.ok:
        timing.note = _short_check(timing.note)
    results.add(op, impl, L, timing)
    return timing


def _short_check(message):
    # "vs reference: max rel. error 3.1e-07 (out 3.1e-07, ...)" -> "vs reference: max rel. err 3.1e-07"
    return message.split(" (")[0].replace("error", "err")


def validate_small(results, label, fn, reference):
    """Small-size check of an implementation against the reference outputs. Returns ok."""
    try:
        actual = fn()
    except Exception as error:       # a crash is a failed check, reported like a mismatch
        ok, message = False, f"raised {type(error).__name__}: {error}"
    else:
        ok, message = _common.compare_outputs(actual, reference, SMALL_TOLERANCE)
    verdict = "ok" if ok else "FAILED, not timed"
    results.checks.append(f"{label}: {verdict}: {message}")
    log(f"  check {label}: {verdict}: {message}")
    return ok


# ----------------------------------------------------------------------------------------------
# Selective scan

def scan_inputs(rng, B, L, D, N):
    """u, delta, A, Bm, Cm, D_skip and dout, as a Mamba layer would see them (delta already
    positive, i.e. after softplus; A = -(1..N) per channel, the S4D-real init)."""
    return {
        "u": rng.standard_normal((B, L, D), dtype=DTYPE),
        "delta": rng.uniform(1e-3, 1e-1, (B, L, D)).astype(DTYPE),
        "A": -np.tile(np.arange(1, N + 1, dtype=DTYPE), (D, 1)),
        "Bm": rng.standard_normal((B, L, N), dtype=DTYPE),
        "Cm": rng.standard_normal((B, L, N), dtype=DTYPE),
        "D": rng.standard_normal(D).astype(DTYPE),
        "dout": rng.standard_normal((B, L, D), dtype=DTYPE),
    }


SCAN_GRAD_NAMES = ("du", "ddelta", "dA", "dBm", "dCm", "dD")


def scan_numpy(x, backward):
    from minilm.ops import selective_scan as op

    def run():
        out, cache = op.forward(x["u"], x["delta"], x["A"], x["Bm"], x["Cm"], D=x["D"], mode="chunked",
                                backend="numpy")
        result = {"out": out}
        if backward:
            grads = op.backward(x["dout"], cache)
            result.update(zip(SCAN_GRAD_NAMES, grads[:6]))
        return result
    return run


def scan_numba(path, x, backward):
    def run():
        out, cache = path.forward(x["u"], x["delta"], x["A"], x["Bm"], x["Cm"], D=x["D"])
        result = {"out": out}
        if backward:
            grads = path.backward(x["dout"], cache)
            result.update(zip(SCAN_GRAD_NAMES, grads[:6]))
        return result
    return run


def torch_discretize(torch, x, requires_grad):
    """mambapy's discretization: deltaA = exp(Δ⊗A), BX = Δ·B·x, both (B, L, D, N). With
    requires_grad the leaves are the op's inputs (for checking gradients); else plain tensors."""
    leaves = {name: torch.from_numpy(x[name]).clone().requires_grad_(requires_grad)
              for name in ("u", "delta", "A", "Bm", "Cm", "D")}
    u, delta, A, Bm = leaves["u"], leaves["delta"], leaves["A"], leaves["Bm"]
    deltaA = torch.exp(delta.unsqueeze(-1) * A)
    BX = delta.unsqueeze(-1) * Bm.unsqueeze(2) * u.unsqueeze(-1)
    return leaves, deltaA, BX


def pscan_readout(pscan, deltaA, BX, C, D, u):
    """mambapy's selective_scan after the discretization: the scan and the contraction with C."""
    hs = pscan(deltaA, BX)
    return (hs @ C.unsqueeze(-1)).squeeze(3) + D * u


def loop_readout(torch, deltaA, BX, C, D, u):
    """The plain recurrence in PyTorch: h = dA[:, t]·h + BX[:, t]; y_t = Σ_n h·C_t."""
    batch, L, channels, N = deltaA.shape
    h = torch.zeros(batch, channels, N, dtype=deltaA.dtype)
    ys = []
    # unbind, not deltaA[:, t]: under autograd each indexing op would scatter its gradient into a
    # full (B, L, D, N) tensor of zeros, making the backward O(L^2)
    for a_t, b_t, c_t in zip(deltaA.unbind(1), BX.unbind(1), C.unbind(1)):
        h = a_t * h + b_t
        ys.append((h * c_t[:, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + D * u


def scan_peer_check(torch, readout, x):
    """The peer with autograd from the op's inputs, so that every gradient can be compared."""
    def run():
        leaves, deltaA, BX = torch_discretize(torch, x, requires_grad=True)
        out = readout(deltaA, BX, leaves["Cm"], leaves["D"], leaves["u"])
        out.backward(torch.from_numpy(x["dout"]))
        result = {"out": out.detach().numpy()}
        for grad_name, leaf in zip(SCAN_GRAD_NAMES, ("u", "delta", "A", "Bm", "Cm", "D")):
            result[grad_name] = leaves[leaf].grad.numpy()
        return result
    return run


def scan_peer_timed(torch, readout, x, prepared, backward):
    """The timed peer: deltaA and BX are built beforehand (as mambapy builds them before its scan);
    only the scan and the contraction are timed. For fwd+bwd, deltaA, BX and C are the leaves."""
    deltaA, BX = prepared
    C, D, u = (torch.from_numpy(x[name]) for name in ("Cm", "D", "u"))
    dout = torch.from_numpy(x["dout"])

    def forward_only():
        with torch.no_grad():
            return {"out": readout(deltaA, BX, C, D, u).numpy()}

    def forward_backward():
        a, b, c = (t.detach().requires_grad_(True) for t in (deltaA, BX, C))
        out = readout(a, b, c, D, u)
        out.backward(dout)
        return {"out": out.detach().numpy(), "dCm": c.grad.numpy()}
    return forward_backward if backward else forward_only


def bench_scan(results, sizes, repeats, budget_s, torch, pscan):
    op = "selective_scan"
    log(f"\n== selective scan: B=1, D={SCAN_D}, N={SCAN_N}, float32 ==")
    rng = np.random.default_rng(SEED)
    tiny = scan_inputs(rng, 1, 5, 3, 2)
    path = NumbaPath(op, [tiny[n] for n in ("u", "delta", "A", "Bm", "Cm")])
    if path.forward is None:
        results.skips.append(f"{op}: numba column skipped: {path.note}")
        log(f"  numba skipped: {path.note}")
    else:
        log(f"  numba via {path.via}")

    # Small-size checks: B=2, T=300 (not a multiple of any chunk), D=40 (not a multiple of the
    # channel block), every gradient.
    small = scan_inputs(np.random.default_rng(SEED + 1), 2, 300, 40, SCAN_N)
    reference = scan_numpy(small, backward=True)()
    use = {"numba": False, "pscan": False, "loop": False}
    if path.forward is not None:
        use["numba"] = validate_small(results, f"{op} numba fwd+bwd (B=2, T=300, D=40)",
                                      scan_numba(path, small, backward=True), reference)
    if torch is not None and pscan is not None:
        use["pscan"] = validate_small(results, f"{op} pscan fwd+bwd (B=2, T=300, D=40)",
                                      scan_peer_check(torch, lambda *a: pscan_readout(pscan, *a), small),
                                      reference)
    if torch is not None:
        use["loop"] = validate_small(results, f"{op} torch loop fwd+bwd (B=2, T=300, D=40)",
                                     scan_peer_check(torch, lambda *a: loop_readout(torch, *a), small),
                                     reference)

    for L in sizes:
        log(f"  L={L}")
        x = scan_inputs(np.random.default_rng(SEED + L), 1, L, SCAN_D, SCAN_N)
        tensor_bytes = L * SCAN_D * SCAN_N * 4
        trusted = {}
        for backward, suffix in ((False, "fwd"), (True, "fwd+bwd")):
            if L <= SCAN_REFERENCE_MAX_L:
                t = run_cell(results, op, f"numpy {suffix}", L, scan_numpy(x, backward), None, repeats, budget_s,
                             REFERENCE)
                trusted[suffix] = (t.first, "reference") if t.ok else (None, "")
            if use["numba"]:
                ref, name = trusted.get(suffix, (None, ""))
                t = run_cell(results, op, f"numba {suffix}", L, scan_numba(path, x, backward), ref, repeats,
                             budget_s, name)
                if ref is None and t.ok:
                    trusted[suffix] = (t.first, "numba")

        if torch is not None and (use["pscan"] or use["loop"]):
            with torch.no_grad():
                _, deltaA, BX = torch_discretize(torch, x, requires_grad=False)
            # The peers' fwd+bwd take deltaA and BX as leaves: of the op's gradients only dCm is comparable.
            comparable = {"fwd": ("out",), "fwd+bwd": ("out", "dCm")}
            peers = [("pscan", lambda *a: pscan_readout(pscan, *a), 5, 9),
                     ("torch loop", lambda *a: loop_readout(torch, *a), 2, 4)]
            for name, readout, fwd_tensors, fb_tensors in peers:
                if not use["pscan" if name == "pscan" else "loop"]:
                    continue
                for backward, suffix, n_tensors in ((False, "fwd", fwd_tensors), (True, "fwd+bwd", fb_tensors)):
                    impl = f"{name} {suffix}"
                    if n_tensors * tensor_bytes > PEER_MEMORY_CAP:
                        results.skips.append(f"{op} / {impl} / L={L}: skipped, needs about "
                                             f"{n_tensors * tensor_bytes / 2**30:.1f} GiB of (L, D, N) tensors")
                        continue
                    if name == "torch loop" and backward and L > TORCH_LOOP_AUTOGRAD_MAX_L:
                        continue
                    fn = scan_peer_timed(torch, readout, x, (deltaA, BX), backward)
                    ref, ref_name = trusted.get(suffix, (None, ""))
                    if ref is not None:
                        ref = {key: ref[key] for key in comparable[suffix]}
                    run_cell(results, op, impl, L, fn, ref, repeats, budget_s, ref_name)
            del deltaA, BX


def memory_scan(results, L):
    op = "selective_scan"
    rng = np.random.default_rng(SEED + 7)
    tiny = scan_inputs(rng, 1, 5, 3, 2)
    path = NumbaPath(op, [tiny[n] for n in ("u", "delta", "A", "Bm", "Cm")])
    if path.forward is None:
        return
    x = scan_inputs(rng, 1, L, SCAN_D, SCAN_N)
    input_bytes = sum(x[n].nbytes for n in ("u", "delta", "A", "Bm", "Cm", "D"))
    fn = scan_numba(path, x, backward=True)
    fn()                              # compile outside the traced region
    _, peak = _common.peak_traced_bytes(fn)
    entry = {"op": op, "impl": "numba fwd+bwd", "L": L, "peak_extra_bytes": peak, "input_bytes": input_bytes,
             "ratio_to_inputs": peak / input_bytes,
             "materialized_B_T_D_N_bytes": L * SCAN_D * SCAN_N * 4}
    results.memory.append(entry)
    log(f"  memory {op} numba fwd+bwd L={L}: peak extra {peak / 2**20:.1f} MiB, inputs "
        f"{input_bytes / 2**20:.1f} MiB, ratio {peak / input_bytes:.2f}")


# ----------------------------------------------------------------------------------------------
# Linear attention (chunked, causal)

def qkv_inputs(rng, B, H, L, d, scale=1.0):
    return {name: (scale * rng.standard_normal((B, H, L, d))).astype(DTYPE) for name in ("q", "k", "v", "dout")}


def linear_numpy(x, backward):
    from minilm.ops import linear_attention as op

    def run():
        out, cache = op.forward(x["q"], x["k"], x["v"], causal=True, mode="chunked", chunk_size=LINEAR_CHUNK,
                                backend="numpy")
        result = {"out": out}
        if backward:
            result.update(zip(("dq", "dk", "dv"), op.backward(x["dout"], cache)[:3]))
        return result
    return run


def linear_numba(path, x, backward):
    def run():
        out, cache = path.forward(x["q"], x["k"], x["v"], causal=True, chunk_size=LINEAR_CHUNK)
        result = {"out": out}
        if backward:
            result.update(zip(("dq", "dk", "dv"), path.backward(x["dout"], cache)[:3]))
        return result
    return run


def torch_chunked_linear_attention(torch, q, k, v, chunk=LINEAR_CHUNK):
    """Causal linear attention, chunked, in PyTorch: within a chunk a masked (C×C) matmul, across
    chunks the state S_c = Σ_{chunks before c} Kᵀ V, applied as Q S_c.
    q, k: (B, H, T, Dk); v: (B, H, T, Dv) -> (B, H, T, Dv)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[3]
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    if pad:
        # zero rows: padded keys/values add nothing to the state; padded queries are cut off below
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qc = q.reshape(B, H, n_chunks, chunk, Dk)
    kc = k.reshape(B, H, n_chunks, chunk, Dk)
    vc = v.reshape(B, H, n_chunks, chunk, Dv)
    mask = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~mask, 0.0)
    intra = scores @ vc                                           # (B, H, n, C, Dv)
    increments = kc.transpose(-1, -2) @ vc                        # (B, H, n, Dk, Dv)
    states = torch.cumsum(increments, dim=2) - increments         # state entering each chunk
    inter = qc @ states
    return (intra + inter).reshape(B, H, n_chunks * chunk, Dv)[:, :, :T]


def linear_torch(torch, x, backward):
    q, k, v, dout = (torch.from_numpy(x[n]) for n in ("q", "k", "v", "dout"))

    def forward_only():
        with torch.no_grad():
            return {"out": torch_chunked_linear_attention(torch, q, k, v).numpy()}

    def forward_backward():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = torch_chunked_linear_attention(torch, *leaves)
        out.backward(dout)
        result = {"out": out.detach().numpy()}
        result.update(zip(("dq", "dk", "dv"), (t.grad.numpy() for t in leaves)))
        return result
    return forward_backward if backward else forward_only


def linear_flops(L, H=HEADS, Dk=HEAD_DIM, Dv=HEAD_DIM, chunk=LINEAR_CHUNK):
    """Matmul FLOPs of the chunked forward: per chunk and head QKᵀ (2C²Dk), scores·V (2C²Dv),
    KᵀV (2C·Dk·Dv) and Q·S (2C·Dk·Dv); the masked half of QKᵀ is counted (BLAS computes it)."""
    n_chunks = -(-L // chunk)
    return H * n_chunks * (2 * chunk * chunk * (Dk + Dv) + 4 * chunk * Dk * Dv)


def matmul_rate(repeats):
    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), dtype=DTYPE)
    b = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), dtype=DTYPE)
    timing = _common.measure(lambda: a @ b, max(3, repeats))
    return 2 * MATMUL_SIZE**3 / timing.seconds


def bench_linear(results, sizes, repeats, budget_s, torch, flop_rate):
    op = "linear_attention"
    log(f"\n== chunked linear attention: B=1, H={HEADS}, d={HEAD_DIM}, chunk {LINEAR_CHUNK}, causal, "
        f"identity feature map, float32 ==")
    tiny = qkv_inputs(np.random.default_rng(SEED), 1, 1, 3, 2)
    path = NumbaPath(op, [tiny[n] for n in ("q", "k", "v")])
    if path.forward is None:
        results.skips.append(f"{op}: numba column skipped: {path.note}")
        log(f"  numba skipped: {path.note}")
    else:
        log(f"  numba via {path.via}")

    small = qkv_inputs(np.random.default_rng(SEED + 1), 2, 3, 150, 16, scale=0.5)
    reference = linear_numpy(small, backward=True)()
    use_numba = path.forward is not None and validate_small(
        results, f"{op} numba fwd+bwd (B=2, H=3, T=150, d=16)", linear_numba(path, small, True), reference)
    use_torch = torch is not None and validate_small(
        results, f"{op} torch chunked fwd+bwd (B=2, H=3, T=150, d=16)", linear_torch(torch, small, True), reference)

    for L in sizes:
        log(f"  L={L}")
        x = qkv_inputs(np.random.default_rng(SEED + L), 1, HEADS, L, HEAD_DIM, scale=HEAD_DIM ** -0.5)
        floor_ms = 1e3 * linear_flops(L) / flop_rate
        results.values[(op, "BLAS floor", L)] = floor_ms
        results.records.append({"op": op, "impl": "BLAS floor", "L": L, "ms": floor_ms, "repeats": 0,
                                "times_ms": "", "ok": True,
                                "note": f"{linear_flops(L) / 1e9:.3f} GFLOP at {flop_rate / 1e9:.1f} GFLOP/s"})
        for backward, suffix in ((False, "fwd"), (True, "fwd+bwd")):
            t = run_cell(results, op, f"numpy {suffix}", L, linear_numpy(x, backward), None, repeats, budget_s,
                         REFERENCE)
            trusted, name = (t.first, "reference") if t.ok else (None, "")
            if use_numba:
                t = run_cell(results, op, f"numba {suffix}", L, linear_numba(path, x, backward), trusted, repeats,
                             budget_s, name)
                if trusted is None and t.ok:
                    trusted, name = t.first, "numba"
            if use_torch:
                run_cell(results, op, f"torch {suffix}", L, linear_torch(torch, x, backward), trusted, repeats,
                         budget_s, name)


# ----------------------------------------------------------------------------------------------
# Softmax attention (causal), forward + backward

def attention_numpy(x):
    from minilm.ops import attention as op

    def run():
        out, cache = op.forward(x["q"], x["k"], x["v"], causal=True, backend="numpy")
        result = {"out": out}
        result.update(zip(("dq", "dk", "dv"), op.backward(x["dout"], cache)))
        return result
    return run


def attention_numba(path, x):
    def run():
        out, cache = path.forward(x["q"], x["k"], x["v"], causal=True)
        result = {"out": out}
        result.update(zip(("dq", "dk", "dv"), path.backward(x["dout"], cache)))
        return result
    return run


def attention_sdpa(torch, x):
    q, k, v, dout = (torch.from_numpy(x[n]) for n in ("q", "k", "v", "dout"))

    def run():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
        out.backward(dout)
        result = {"out": out.detach().numpy()}
        result.update(zip(("dq", "dk", "dv"), (t.grad.numpy() for t in leaves)))
        return result
    return run


def attention_path():
    tiny = qkv_inputs(np.random.default_rng(SEED), 1, 1, 3, 2)
    return NumbaPath("attention", [tiny[n] for n in ("q", "k", "v")])


def bench_attention(results, sizes, repeats, budget_s, torch):
    op = "attention"
    log(f"\n== softmax attention fwd+bwd: B=1, H={HEADS}, d={HEAD_DIM}, causal, float32 ==")
    path = attention_path()
    if path.forward is None:
        results.skips.append(f"{op}: numba column skipped: {path.note}")
        log(f"  numba skipped: {path.note}")
    else:
        log(f"  numba via {path.via}")

    small = qkv_inputs(np.random.default_rng(SEED + 1), 2, 3, 150, 16)
    reference = attention_numpy(small)()
    use_numba = path.forward is not None and validate_small(
        results, f"{op} numba fwd+bwd (B=2, H=3, T=150, d=16)", attention_numba(path, small), reference)
    use_sdpa = torch is not None and validate_small(
        results, f"{op} torch SDPA fwd+bwd (B=2, H=3, T=150, d=16)", attention_sdpa(torch, small), reference)

    for L in sizes:
        log(f"  L={L}")
        x = qkv_inputs(np.random.default_rng(SEED + L), 1, HEADS, L, HEAD_DIM)
        trusted, name = None, ""
        if L <= ATTENTION_REFERENCE_MAX_L:
            t = run_cell(results, op, "numpy fwd+bwd", L, attention_numpy(x), None, repeats, budget_s,
                         REFERENCE)
            if t.ok:
                trusted, name = t.first, "reference"
        if use_numba:
            t = run_cell(results, op, "numba fwd+bwd", L, attention_numba(path, x), trusted, repeats, budget_s, name)
            if trusted is None and t.ok:
                trusted, name = t.first, "numba"
        if use_sdpa:
            run_cell(results, op, "sdpa fwd+bwd", L, attention_sdpa(torch, x), trusted, repeats, budget_s, name)


def memory_attention(results, lengths, heads):
    path = attention_path()
    if path.forward is None:
        return
    for L in lengths:
        x = qkv_inputs(np.random.default_rng(SEED + 3), 1, heads, L, HEAD_DIM)
        fn = attention_numba(path, x)
        attention_numba(path, qkv_inputs(np.random.default_rng(SEED), 1, 1, 70, HEAD_DIM))()  # compile
        start = time.perf_counter()
        _, peak = _common.peak_traced_bytes(fn)
        seconds = time.perf_counter() - start
        input_bytes = sum(x[n].nbytes for n in ("q", "k", "v"))
        tt_bytes = heads * L * L * 4
        entry = {"op": "attention", "impl": "numba fwd+bwd", "L": L, "heads": heads, "peak_extra_bytes": peak,
                 "input_bytes": input_bytes, "ratio_to_inputs": peak / input_bytes,
                 "T_by_T_fp32_bytes": tt_bytes, "ratio_to_T_by_T": peak / tt_bytes, "seconds": seconds}
        results.memory.append(entry)
        log(f"  memory attention numba fwd+bwd L={L} H={heads}: peak extra {peak / 2**20:.1f} MiB = "
            f"{peak / input_bytes:.2f}x q,k,v; T×T fp32 would be {tt_bytes / 2**20:.0f} MiB "
            f"(ratio {peak / tt_bytes:.4f}); {seconds:.1f} s")


# ----------------------------------------------------------------------------------------------
# Tables and targets

def column_table(L_values, columns):
    """columns: list of (header, function(L) -> value)."""
    rows = [[L] + [fn(L) for _, fn in columns] for L in L_values]
    return ["L"] + [header for header, _ in columns], rows


def build_tables(results, sweeps):
    R = results.ms
    tables = {}
    s = "selective_scan"
    tables["selective scan (B=1, D=768, N=16, float32), ms"] = column_table(sweeps["scan"], [
        ("numpy fwd", lambda L: R(s, "numpy fwd", L)),
        ("numba fwd", lambda L: R(s, "numba fwd", L)),
        ("pscan fwd", lambda L: R(s, "pscan fwd", L)),
        ("loop fwd", lambda L: R(s, "torch loop fwd", L)),
        ("numpy f+b", lambda L: R(s, "numpy fwd+bwd", L)),
        ("numba f+b", lambda L: R(s, "numba fwd+bwd", L)),
        ("pscan f+b", lambda L: R(s, "pscan fwd+bwd", L)),
        ("loop f+b", lambda L: R(s, "torch loop fwd+bwd", L)),
        ("pscan/numba", lambda L: ratio(R(s, "pscan fwd", L), R(s, "numba fwd", L))),
        ("loop/numba", lambda L: ratio(R(s, "torch loop fwd", L), R(s, "numba fwd", L))),
        ("numpy/numba", lambda L: ratio(R(s, "numpy fwd", L), R(s, "numba fwd", L))),
        ("numba f+b/fwd", lambda L: ratio(R(s, "numba fwd+bwd", L), R(s, "numba fwd", L))),
    ])
    a = "linear_attention"
    tables["chunked linear attention (B=1, H=8, d=64, chunk 64, float32), ms"] = column_table(
        sweeps["linear"], [
            ("numpy fwd", lambda L: R(a, "numpy fwd", L)),
            ("numba fwd", lambda L: R(a, "numba fwd", L)),
            ("torch fwd", lambda L: R(a, "torch fwd", L)),
            ("BLAS floor", lambda L: R(a, "BLAS floor", L)),
            ("numba/torch", lambda L: ratio(R(a, "numba fwd", L), R(a, "torch fwd", L))),
            ("numba/floor", lambda L: ratio(R(a, "numba fwd", L), R(a, "BLAS floor", L))),
            ("numpy f+b", lambda L: R(a, "numpy fwd+bwd", L)),
            ("numba f+b", lambda L: R(a, "numba fwd+bwd", L)),
            ("torch f+b", lambda L: R(a, "torch fwd+bwd", L)),
            ("numpy/numba f+b", lambda L: ratio(R(a, "numpy fwd+bwd", L), R(a, "numba fwd+bwd", L))),
        ])
    t = "attention"
    tables["causal softmax attention fwd+bwd (B=1, H=8, d=64, float32), ms"] = column_table(
        sweeps["attention"], [
            ("numpy f+b", lambda L: R(t, "numpy fwd+bwd", L)),
            ("numba f+b", lambda L: R(t, "numba fwd+bwd", L)),
            ("sdpa f+b", lambda L: R(t, "sdpa fwd+bwd", L)),
            ("numba/sdpa", lambda L: ratio(R(t, "numba fwd+bwd", L), R(t, "sdpa fwd+bwd", L))),
            ("numpy/numba", lambda L: ratio(R(t, "numpy fwd+bwd", L), R(t, "numba fwd+bwd", L))),
        ])
    return tables


def memory_table(results):
    columns = ["op", "L", "heads", "peak extra MiB", "inputs MiB", "peak/inputs", "T×T fp32 MiB", "peak/T×T"]
    rows = []
    for m in results.memory:
        tt = m.get("T_by_T_fp32_bytes")
        rows.append([m["op"], m["L"], m.get("heads", "-"), m["peak_extra_bytes"] / 2**20,
                     m["input_bytes"] / 2**20, m["ratio_to_inputs"],
                     None if tt is None else tt / 2**20, m.get("ratio_to_T_by_T")])
    return columns, rows


def _at_largest(sizes, target_L):
    """The L a target is read at: target_L when measured, else the largest measured L below it."""
    below = [L for L in sizes if L <= target_L]
    return max(below) if below else max(sizes)


def evaluate_targets(results, sweeps):
    R = results.ms
    rows, records = [], []
    for key, description, comparison, bound in TARGETS:
        measured, at = None, None
        if key.startswith("scan_") and key != "scan_memory_ratio":
            at = _at_largest(sweeps["scan"], TARGET_L[key])
            numba_fwd = R("selective_scan", "numba fwd", at)
            measured = {
                "scan_pscan_speedup": ratio(R("selective_scan", "pscan fwd", at), numba_fwd),
                "scan_loop_speedup": ratio(R("selective_scan", "torch loop fwd", at), numba_fwd),
                "scan_fb_over_fwd": ratio(R("selective_scan", "numba fwd+bwd", at), numba_fwd),
            }[key]
        elif key == "scan_memory_ratio":
            probes = [m for m in results.memory if m["op"] == "selective_scan"]
            if probes:
                at, measured = probes[-1]["L"], probes[-1]["ratio_to_inputs"]
        elif key.startswith("linear_"):
            at = _at_largest(sweeps["linear"], TARGET_L[key])
            other = "torch fwd" if key == "linear_over_torch" else "BLAS floor"
            measured = ratio(R("linear_attention", "numba fwd", at), R("linear_attention", other, at))
        elif key == "attention_over_sdpa":
            at = _at_largest(sweeps["attention"], TARGET_L[key])
            measured = ratio(R("attention", "numba fwd+bwd", at), R("attention", "sdpa fwd+bwd", at))
        elif key == "attention_memory_tt":
            probes = [m for m in results.memory if m["op"] == "attention"]
            if probes:
                at, measured = probes[-1]["L"], probes[-1]["ratio_to_T_by_T"]
        met = None if measured is None else (measured >= bound if comparison == ">=" else measured <= bound)
        where = "-" if at is None else (f"L={at}" if at == TARGET_L[key] else f"L={at} (target L={TARGET_L[key]})")
        rows.append([description, f"{comparison} {bound:g}", where, measured,
                     "n/a" if met is None else ("yes" if met else "no")])
        records.append({"target": key, "description": description, "bound": f"{comparison} {bound:g}",
                        "at": at, "measured": measured, "met": met})
    return ["target", "bound", "at", "measured", "met"], rows, records


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="few sizes, 3 repeats (a couple of minutes)")
    group.add_argument("--full", action="store_true", help="scan sweep up to L=16384")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 5; 3 with --quick)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed repeats per cell before fewer repeats are run (default 20; 5 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every library (Numba, PyTorch, BLAS); default: all cores")
    parser.add_argument("--out", default=os.path.join("results", "cpu_kernels"), help="results folder")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "default"
    repeats = args.repeats or (3 if args.quick else 5)
    budget_s = args.budget or (5.0 if args.quick else 20.0)
    sweeps = SWEEPS[mode]
    started = time.perf_counter()

    import numba
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    threads = numba.get_num_threads()
    torch, torch_note = import_torch(threads)
    pscan, pscan_note = import_pscan() if torch is not None else (None, "")
    info = _common.machine_info({
        "mambapy": _common._version("mambapy") or "not installed",
        "torch threads": torch.get_num_threads() if torch is not None else "-",
        "thread variables": " ".join(f"{v}={os.environ[v]}" for v in THREAD_VARIABLES if v in os.environ) or "unset",
        "command": _common.python_command(),
        "mode": f"{mode}, {repeats} repeats (median after 1 warm-up), {budget_s:g} s budget per cell",
    })
    log(_common.format_header(info, "minilm CPU kernel benchmark"))
    results = Results()
    for note in (torch_note, pscan_note):
        if note:
            results.skips.append(note)
            log(f"note: {note}")

    flop_rate = matmul_rate(repeats)
    log(f"\nnumpy float32 matmul {MATMUL_SIZE}x{MATMUL_SIZE}: {flop_rate / 1e9:.1f} GFLOP/s")

    bench_scan(results, sweeps["scan"], repeats, budget_s, torch, pscan)
    memory_scan(results, _at_largest(sweeps["scan"], TARGET_L["scan_memory_ratio"]))
    bench_linear(results, sweeps["linear"], repeats, budget_s, torch, flop_rate)
    bench_attention(results, sweeps["attention"], repeats, budget_s, torch)
    memory_heads = 1 if mode == "quick" else HEADS
    log(f"\n== attention memory probe (numba fwd+bwd, H={memory_heads}) ==")
    memory_attention(results, ATTENTION_MEMORY_L, memory_heads)

    # ---- report
    try:
        info["numba threads"] = f"{threads} ({numba.threading_layer()} layer)"
    except ValueError:               # no parallel kernel ran: the layer was never chosen
        pass
    tables = build_tables(results, sweeps)
    log("")
    log(_common.format_header(info, "minilm CPU kernel benchmark"))
    log(f"numpy float32 matmul rate (BLAS floor): {flop_rate / 1e9:.1f} GFLOP/s")
    for title, (columns, rows) in tables.items():
        log("")
        log(_common.format_table(title, columns, rows))
    mem_columns, mem_rows = memory_table(results)
    log("")
    log(_common.format_table("peak extra memory of the numba fwd+bwd (tracemalloc)", mem_columns, mem_rows))
    target_columns, target_rows, target_records = evaluate_targets(results, sweeps)
    log("")
    log(_common.format_table("targets", target_columns, target_rows))
    log("\nchecks:")
    for line in results.checks:
        log(f"  {line}")
    if results.skips:
        log("skipped:")
        for line in results.skips:
            log(f"  {line}")
    elapsed = time.perf_counter() - started
    log(f"\ntotal {elapsed:.0f} s")

    os.makedirs(args.out, exist_ok=True)
    _common.write_csv(os.path.join(args.out, "cpu_kernels.csv"), results.records)
    _common.write_json(os.path.join(args.out, "cpu_kernels.json"), {
        "header": info, "matmul_gflops": flop_rate / 1e9, "sweeps": sweeps,
        "tables": {title: {"columns": columns, "rows": rows} for title, (columns, rows) in tables.items()},
        "records": results.records, "memory": results.memory, "targets": target_records,
        "checks": results.checks, "skipped": results.skips, "seconds": elapsed,
        "tolerances": {"small": SMALL_TOLERANCE, "timed": TIMED_TOLERANCE},
    })
    panels = []
    for op, title, impls, key in (
            ("selective_scan", "selective scan (D=768, N=16)",
             ["numpy fwd", "numba fwd", "pscan fwd", "torch loop fwd",
              "numpy fwd+bwd", "numba fwd+bwd", "pscan fwd+bwd", "torch loop fwd+bwd"], "scan"),
            ("linear_attention", "chunked linear attention (H=8, d=64)",
             ["numpy fwd", "numba fwd", "torch fwd", "BLAS floor", "numpy fwd+bwd", "numba fwd+bwd",
              "torch fwd+bwd"], "linear"),
            ("attention", "causal softmax attention (H=8, d=64)",
             ["numpy fwd+bwd", "numba fwd+bwd", "sdpa fwd+bwd"], "attention")):
        series = {impl: (sweeps[key], [results.ms(op, impl, L) for L in sweeps[key]]) for impl in impls}
        panels.append((title, {k: v for k, v in series.items() if any(y is not None for y in v[1])}))
    png = os.path.join(args.out, "cpu_kernels.png")
    if _common.plot_loglog(png, panels):
        log(f"wrote {args.out}/cpu_kernels.{{csv,json,png}}")
    else:
        log(f"wrote {args.out}/cpu_kernels.{{csv,json}} (matplotlib missing: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
