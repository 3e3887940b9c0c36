"""bench/gpu_scaling.py --replot: a run's rows plus the peers bench/gpu_check.py timed, without a GPU."""
import csv
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def replot(folder, peers):
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_scaling.py"), "--replot", "--out", str(folder),
                    "--peer-results", str(peers)], check=True, capture_output=True, text=True,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    with open(folder / "scaling.csv") as f:
        return list(csv.DictReader(f))


def test_replot_adds_the_recorded_peers_once(tmp_path):
    run = {"title": "a device | versions", "rows": [
        {"op": "selective_scan", "backend": "numba-cuda", "L": 1024, "fwd_ms": 0.5, "fwdbwd_ms": 1.7, "note": ""}]}
    (tmp_path / "scaling.json").write_text(json.dumps(run))
    peers = tmp_path / "results.json"
    peers.write_text(json.dumps({"peers": [
        {"peer": "copy", "TBps": 4.2},                       # not a row of the scaling table
        {"peer": "mambapy_pscan", "L": 1024, "fwd_ms": 4.0, "peak_GiB": 1.8},
        {"peer": "fla_chunk_linear_attn", "L": 1024, "fwd_ms": 0.4, "fwdbwd_ms": 1.9, "recurrent_fwd_ms": 1.5},
        {"peer": "sdpa_causal", "dtype": "torch.float32", "L": 1024, "fwd_ms": 0.2, "fwdbwd_ms": 0.8},
        {"peer": "fla", "error": "ImportError()"}]}))

    rows = replot(tmp_path, peers)
    assert [(r["op"], r["backend"]) for r in rows] == [
        ("selective_scan", "numba-cuda"), ("selective_scan", "mambapy-pscan"), ("linear_attention", "fla-chunk"),
        ("linear_attention", "fla-recurrent"), ("softmax_attention", "sdpa-float32")]
    assert float(rows[4]["fwdbwd_ms"]) == 0.8 and rows[1]["fwdbwd_ms"] == ""
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert replot(tmp_path, peers) == rows          # redrawing again does not add the peers twice
