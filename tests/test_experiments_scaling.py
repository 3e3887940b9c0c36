"""The scaling and decode experiments at toy sizes: row schema, reference checks, caps, summaries, plots.

No Numba kernel is compiled here: the fast-backend plumbing is exercised with stand-in kernel
modules (the real kernels have their own tests), and the decode models use backend="numpy".
"""
import json
import math
import sys
import types

import numpy as np
import pytest

from minilm.experiments import decode, scaling
from minilm.ops import attention

SCALING_KEYS = {"op", "mode", "backend", "L", "fwd_ms", "fwdbwd_ms", "peak_bytes"}
DECODE_KEYS = {"schedule", "context", "ms_per_token", "state_bytes"}


def fake_attention_kernel(distort=1.0):
    """A module with the kernel contract (available, forward, backward) backed by the reference."""
    module = types.ModuleType("fake_attention_kernel")
    module.available = lambda: (True, "")

    def forward(q, k, v, causal=True, scale=None):
        out, cache = attention.forward(q, k, v, causal=causal, scale=scale, backend="numpy")
        return out * distort, cache

    module.forward = forward
    module.backward = attention.backward
    return module


@pytest.fixture
def fake_numba(monkeypatch):
    def install(distort=1.0):
        monkeypatch.setitem(sys.modules, "fake_attention_kernel", fake_attention_kernel(distort))
        monkeypatch.setitem(scaling.KERNEL_MODULES, "numba", "fake_{op}_kernel")
    return install


def test_numpy_rows_have_the_schema_and_sane_values():
    result = scaling.measure_scaling(lengths=[8, 16], backends=["numpy"], point_cap_s=30, budget_s=60)
    assert result.rows
    labels = {(r["op"], r["mode"], r["backend"]) for r in result.rows}
    assert labels == {(op, mode, "numpy") for op in scaling.OPS for mode in scaling.NUMPY_MODES[op]}
    for row in result.rows:
        assert set(row) == SCALING_KEYS
        assert row["L"] in (8, 16)
        assert 0 < row["fwd_ms"] <= row["fwdbwd_ms"]
        assert isinstance(row["peak_bytes"], int) and row["peak_bytes"] > 0
    # every non-reference series was checked against the reference before it was timed
    for label, info in result.config["series"].items():
        assert info["check"] == "the reference" or "max rel. error" in info["check"], (label, info)
    json.dumps(scaling.jsonable(result.rows))


def test_naive_attention_memory_holds_the_score_matrix():
    """The naive form's peak allocation is at least the H x L x L float32 probabilities."""
    result = scaling.measure_scaling(lengths=[64], backends=["numpy"], ops=["attention"], point_cap_s=30)
    (row,) = result.rows
    assert row["peak_bytes"] >= scaling.HEADS * 64 * 64 * 4


def test_fast_series_through_the_kernel_module_is_checked_and_timed(fake_numba):
    fake_numba()
    result = scaling.measure_scaling(lengths=[16, 32], backends=["numba"], ops=["attention"], through_op=False,
                                     point_cap_s=30)
    assert [(r["mode"], r["backend"], r["L"]) for r in result.rows] == [("tiled", "numba", 16), ("tiled", "numba", 32)]
    info = result.config["series"]["attention/tiled/numba"]
    assert info["via"] == "kernel" and "max rel. error 0.0e+00" in info["check"]


def test_a_kernel_that_disagrees_is_not_timed(fake_numba):
    fake_numba(distort=1.01)
    result = scaling.measure_scaling(lengths=[16, 32], backends=["numba"], ops=["attention"], through_op=False)
    assert result.rows == []
    (summary,) = result.series
    assert summary["stop"].startswith("not timed") and "too large" in summary["stop"]


def test_missing_backends_are_noted_not_fatal(monkeypatch):
    monkeypatch.setitem(scaling.KERNEL_MODULES, "numba", "no_such_module_{op}")
    series, notes = scaling.build_series(backends=("numba",), ops=("attention",))
    assert series == [] and len(notes) == 1 and "not importable" in notes[0]
    # tests run under the CUDA simulator (conftest): the cuda series is skipped, with a reason
    series, notes = scaling.build_series(backends=("cuda",), ops=("selective_scan",))
    assert series == []


def test_a_slow_point_caps_its_series():
    result = scaling.measure_scaling(lengths=[16, 32, 64], backends=["numpy"], ops=["attention"], point_cap_s=1e-9)
    assert [r["L"] for r in result.rows] == [16]
    assert result.series[0]["stop"].startswith("capped")


def test_the_budget_stops_every_series_after_its_first_point():
    result = scaling.measure_scaling(lengths=[8, 16], backends=["numpy"], ops=["linear_attention"], budget_s=0)
    assert sorted(r["L"] for r in result.rows) == [8, 8, 8]
    assert all("budget" in s["stop"] for s in result.series)


def test_summaries_fit_slopes_and_doubling_ratios():
    rows = []
    for L in (256, 512, 1024, 2048):
        rows.append({"op": "attention", "mode": "naive", "backend": "numpy", "L": L,
                     "fwd_ms": 1e-6 * L * L, "fwdbwd_ms": 3e-6 * L * L, "peak_bytes": 16 * L * L})
        rows.append({"op": "linear_attention", "mode": "chunked", "backend": "numpy", "L": L,
                     "fwd_ms": 1e-3 * L, "fwdbwd_ms": 3e-3 * L, "peak_bytes": 1000 * L})
    quadratic, linear = scaling.summarize(rows)
    assert quadratic["slope_fwdbwd_ms"] == pytest.approx(2.0) and quadratic["doubling_fwdbwd_ms"] == pytest.approx(4.0)
    assert quadratic["slope_peak_bytes"] == pytest.approx(2.0)
    assert linear["slope_fwdbwd_ms"] == pytest.approx(1.0) and linear["doubling_fwdbwd_ms"] == pytest.approx(2.0)
    assert quadratic["L_max"] == 2048 and quadratic["points"] == 4
    assert scaling.fit_slope([1], [1]) is None
    assert "attention/naive/numpy" in scaling.format_summary([quadratic, linear])


def test_run_scaling_writes_json_and_plot(tmp_path):
    rows = scaling.run_scaling(quick=True, out_dir=str(tmp_path), lengths=[8, 16], backends=["numpy"],
                               ops=["attention"])
    assert rows and all(set(r) == SCALING_KEYS for r in rows)
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert saved["rows"] == rows and {"series", "notes", "config"} <= set(saved)
    assert (tmp_path / "scaling_loglog.png").stat().st_size > 1000


def test_relative_error():
    assert scaling.relative_error(np.ones(3), np.ones(3)) == 0.0
    assert scaling.relative_error(np.zeros(2), np.zeros(3)) == math.inf
    assert scaling.relative_error(np.array([1.0, 2.1]), np.array([1.0, 2.0])) == pytest.approx(0.05)


# ----------------------------------------------------------------------------------------------
# decode

@pytest.fixture
def tiny_decode(monkeypatch):
    monkeypatch.setattr(decode, "REFERENCE", ("AAAA", 16))
    monkeypatch.setattr(decode, "WIDTHS", range(8, 49, 8))
    monkeypatch.setattr(decode, "BACKEND", "numpy")
    monkeypatch.setattr(decode, "PREFILL_TOKENS", 8)


def test_decode_rows_attention_grows_others_flat(tiny_decode):
    rows, info = decode.measure_decode(contexts=[8, 64], schedules=["AAAA", "MMMM", "MMMA"], n_steps=2, rounds=1)
    assert len(rows) == 6
    for row in rows:
        assert DECODE_KEYS <= set(row) and row["ms_per_token"] > 0
    by = {(r["schedule"], r["context"]): r for r in rows}
    # the KV cache grows by 2 * d_model float32 numbers per token and attention layer
    d = by["AAAA", 8]["d_model"]
    assert by["AAAA", 64]["state_bytes"] - by["AAAA", 8]["state_bytes"] == 4 * 2 * d * 4 * (64 - 8)
    assert by["MMMM", 64]["state_bytes"] == by["MMMM", 8]["state_bytes"]
    hybrid_growth = by["MMMA", 64]["state_bytes"] - by["MMMA", 8]["state_bytes"]
    assert hybrid_growth == 1 * 2 * by["MMMA", 8]["d_model"] * 4 * (64 - 8)
    summary = decode.summarize(rows)
    assert summary["MMMM"]["state_ratio"] == 1.0 and summary["AAAA"]["state_ratio"] > 1.0
    # matched parameter budget: every model within 15% of the reference
    budget = info["parameter_budget"]
    assert all(abs(m["params"] - budget) / budget < 0.15 for m in info["models"].values())


def test_extended_cache_continues_like_a_real_prefill(tiny_decode):
    """Building the context by repeating the cache changes values, not the shapes a step works on:
    a step from the extended state has the same cache length and position as after a real prefill."""
    from minilm.model import LM
    model = LM(decode._config("AAAA", 16, "numpy"))
    state = decode.state_at_context(model, 40, decode.prefill_state(model, 8))
    _, real = model.prefill(np.zeros((1, 40), dtype=np.int64))
    assert state["position"] == real["position"] == 40
    for mine, theirs in zip(state["layers"], real["layers"]):
        assert mine["mixer"]["k"].shape == theirs["mixer"]["k"].shape
    _, after = model.step(np.array([1]), state)
    assert after["layers"][0]["mixer"]["k"].shape[2] == 41


def test_run_decode_writes_json_and_plot(tiny_decode, tmp_path):
    rows = decode.run_decode(out_dir=str(tmp_path), contexts=[8, 16], schedules=["LLLL", "AAAA"], n_steps=1,
                             rounds=1)
    saved = json.loads((tmp_path / "decode.json").read_text())
    assert saved["rows"] == rows and set(saved["summary"]) == {"LLLL", "AAAA"}
    assert (tmp_path / "decode_per_token.png").stat().st_size > 1000
