"""`minilm tour` end to end at toy sizes, and the verdicts computed from rows.

The scaling and decode sections run for real on tiny sizes (NumPy backend only, so nothing is
compiled); the recall and stability sections are replaced by stand-ins that return fixed rows, so
that the report's verdicts can be checked against known numbers.
"""
import json

import pytest

from minilm.cli import main
from minilm.experiments import decode, scaling, tour

RECALL_ROWS = [  # attention near-perfect, fixed-state degrading with the pairs, hybrid recovering
    {"task": "mqar", "schedule": s, "kv_pairs": p, "seq_len": 64, "d_model": 32, "accuracy": a}
    for s, accs in {"AA": (1.0, 1.0, 0.98), "MM": (0.9, 0.6, 0.3), "LL": (0.8, 0.4, 0.2),
                    "MA": (1.0, 0.99, 0.95)}.items()
    for p, a in zip((4, 8, 16), accs)
] + [{"task": "passkey", "schedule": "AA", "kv_pairs": 1, "seq_len": 64, "d_model": 32, "accuracy": 1.0}]
STABILITY_ROWS = [
    {"variant": v, "lr": lr, "final_loss": loss, "diverged": div, "max_grad_norm": 3.0}
    for v, lr, loss, div in [("softmax", 1e-3, 2.0, False), ("softmax", 1e-2, 2.1, False),
                             ("linear_unnormalized", 1e-3, 2.6, False), ("linear_unnormalized", 1e-2, None, True),
                             ("linear_rmsnorm", 1e-3, 2.2, False), ("linear_rmsnorm", 1e-2, 2.3, False)]
]


def fake_runner(rows, figure):
    def run(quick, out_dir, progress=None, budget_s=None):
        assert budget_s is not None and budget_s >= 0
        if progress is not None:
            progress("working")
        with open(f"{out_dir}/{figure}", "wb") as f:
            f.write(b"\x89PNG")
        return [dict(r) for r in rows]
    return run


@pytest.fixture
def tiny_sizes(monkeypatch):
    monkeypatch.setattr(scaling, "LENGTHS", {"quick": [8, 16], "full": [8, 16]})
    monkeypatch.setattr(scaling, "DEFAULT_BACKENDS", ("numpy",))
    monkeypatch.setattr(decode, "CONTEXTS", {"quick": [8, 32], "full": [8, 32]})
    monkeypatch.setattr(decode, "SCHEDULES", ("AAAA", "MMMM", "MMMA"))
    monkeypatch.setattr(decode, "REFERENCE", ("AAAA", 16))
    monkeypatch.setattr(decode, "WIDTHS", range(8, 49, 8))
    monkeypatch.setattr(decode, "BACKEND", "numpy")
    monkeypatch.setattr(decode, "STEPS", {"quick": 2, "full": 2})
    monkeypatch.setattr(decode, "ROUNDS", {"quick": 1, "full": 1})
    fakes = {"recall": fake_runner(RECALL_ROWS, "recall_vs_pairs.png"),
             "stability": fake_runner(STABILITY_ROWS, "stability_curves.png")}
    monkeypatch.setattr(tour, "load_runner", lambda name: (fakes[name], ""))


def test_cli_tour_writes_report_results_and_plots(tiny_sizes, tmp_path, capsys):
    out = tmp_path / "tour"
    assert main(["tour", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("claim ") >= 6 and "report:" in printed

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"scaling", "decode", "recall", "stability", "meta"}
    assert all(set(r) == {"op", "mode", "backend", "L", "fwd_ms", "fwdbwd_ms", "peak_bytes"} for r in results["scaling"])
    assert all({"schedule", "context", "ms_per_token", "state_bytes"} <= set(r) for r in results["decode"])
    assert results["recall"] == RECALL_ROWS and results["stability"] == STABILITY_ROWS
    meta = results["meta"]
    assert meta["command"] == f"minilm tour --quick --out {out}" and meta["quick"] is True
    assert {"cpu", "python", "numpy", "numba"} <= set(meta["machine"])
    assert all(s["status"] == "ok" for s in meta["sections"].values())
    assert "[recall] working" in (out / "tour.log").read_text()
    for name in ("scaling_loglog.png", "decode_per_token.png", "recall_vs_pairs.png", "stability_curves.png"):
        assert (out / name).exists(), name

    report = (out / "report.md").read_text()
    for number in range(1, 7):
        assert f"## Claim {number}" in report
    assert report.count("**Verdict: ") == 6
    assert f"minilm tour --quick --out {out}" in report
    assert "python bench/scaling.py --quick --out DIR" in report
    assert "Machine and versions" in report
    # the stand-in rows were built to support claims 4, 5 and 6
    assert [meta["verdicts"][str(n)]["status"] for n in (4, 5, 6)] == ["supported"] * 3


def test_missing_or_failing_sections_are_reported_not_fatal(tiny_sizes, monkeypatch, tmp_path):
    def broken(quick, out_dir, progress=None, budget_s=None):
        raise RuntimeError("boom")
    monkeypatch.setattr(tour, "load_runner", lambda name: (None, f"minilm.experiments.{name} is not installed"))
    canned = scaling_rows("attention", "naive", "numpy", 2)
    result = tour.run_tour(quick=True, out_dir=str(tmp_path), progress=False,
                           runners={"decode": broken, "scaling": lambda *args, **kwargs: canned})
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["sections"]["decode"]["status"] == "failed" and "boom" in meta["sections"]["decode"]["note"]
    assert meta["sections"]["recall"]["status"] == "skipped"
    assert meta["scaling"]["series"][0]["slope_fwdbwd_ms"] == pytest.approx(2.0)   # summarized from the rows
    assert result.verdicts[4]["status"] == "not measured"
    assert result.verdicts[5]["status"] == "not measured"
    report = (tmp_path / "report.md").read_text()
    assert "not installed" in report and "recall_vs_pairs.png: not produced" in report


def test_a_section_past_its_hard_limit_is_interrupted(monkeypatch):
    import time

    def endless(quick, out_dir, progress=None, budget_s=None):
        while True:                      # a section that ignores its budget (and catches Exception)
            try:
                time.sleep(0.05)
            except Exception:
                pass
    monkeypatch.setattr(tour, "HARD_LIMIT", (1.0, 0.3))
    start = time.perf_counter()
    section = tour.run_section("recall", True, ".", None, budget_s=0.2, runner=endless)
    assert time.perf_counter() - start < 5
    assert section.status == "interrupted" and "hard limit" in section.note and section.rows == []


def test_load_runner_reports_a_missing_module():
    runner, why = tour.load_runner("no_such_experiment")
    assert runner is None and "not installed" in why


# ----------------------------------------------------------------------------------------------
# verdicts from synthetic rows

def scaling_rows(op, mode, backend, power, lengths=(512, 1024, 2048, 4096), memory_power=None):
    return [{"op": op, "mode": mode, "backend": backend, "L": L, "fwd_ms": 1e-4 * L ** power,
             "fwdbwd_ms": 3e-4 * L ** power, "peak_bytes": int(64 * L ** (memory_power or power))}
            for L in lengths]


def test_claim1_and_2_verdicts_follow_the_slopes():
    rows = (scaling_rows("attention", "naive", "numpy", 2) + scaling_rows("attention", "tiled", "numba", 2, memory_power=1)
            + scaling_rows("linear_attention", "parallel", "numpy", 2)
            + scaling_rows("linear_attention", "chunked", "numpy", 1))
    summaries = scaling.summarize(rows)
    decode_summary = {"LLLL": {"state_ratio": 1.0, "state_max": 65536}}
    assert tour.verdict_claim1(rows, summaries, {})[0] == "supported"
    assert tour.verdict_claim2(summaries, decode_summary)[0] == "supported"
    # a linear-time attention would contradict claim 1
    flat = scaling_rows("attention", "naive", "numpy", 1) + scaling_rows("attention", "tiled", "numba", 1)
    assert tour.verdict_claim1(flat, scaling.summarize(flat), {})[0] == "not supported"


def test_claim3_verdict_needs_flat_decoding():
    def summary(time_ratio, state_ratio):
        return {"time_ratio": time_ratio, "state_ratio": state_ratio, "context_min": 256, "context_max": 16384,
                "state_max": 1000, "ms_max": 1.0}
    rows = scaling_rows("selective_scan", "chunked", "numpy", 1)
    summaries = scaling.summarize(rows)
    assert tour.verdict_claim3(summaries, {"MMMM": summary(1.1, 1.0), "AAAA": summary(20, 64)})[0] == "supported"
    assert tour.verdict_claim3(summaries, {"MMMM": summary(5.0, 1.0)})[0] == "partly supported"
    assert tour.verdict_claim3(summaries, {})[0] == "not measured"


def test_claim4_and_6_verdicts_report_contradictions():
    flat_recall = [dict(r, accuracy=1.0) if r["schedule"] != "MA" else dict(r, accuracy=0.2) for r in RECALL_ROWS]
    assert tour.verdict_claim4(flat_recall)[0] == "not supported"       # fixed-state models did not degrade
    assert tour.verdict_claim6(flat_recall, {})[0] == "not supported"   # the hybrid did not recover recall
    status, line = tour.verdict_claim4(RECALL_ROWS)
    assert status == "supported" and "AA 0.98" in line and "MM 0.30" in line


def test_claim5_verdict_names_and_contradictions():
    flipped = [dict(r, diverged=("rmsnorm" in r["variant"] and r["lr"] == 1e-2)) for r in STABILITY_ROWS]
    assert tour.verdict_claim5(flipped)[0] == "not supported"
    unknown = [dict(r, variant="variant_" + str(i)) for i, r in enumerate(STABILITY_ROWS)]
    assert tour.verdict_claim5(unknown)[0] == "not measured"
