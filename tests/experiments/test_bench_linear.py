"""Smoke test of the Lightning-vs-softmax benchmark at tiny sizes."""

import json

from experiments import bench_linear


def test_bench_linear_writes_slopes_for_both_paths(tmp_path):
    bench_linear.main(["--seq-lens", "128,256", "--repeats", "1", "--heads", "2", "--head-dim", "16",
                       "--slope-min-len", "128", "--no-with-pallas", "--out", str(tmp_path), "--name", "tiny"])
    results = json.loads((tmp_path / "tiny.json").read_text())
    for path in (bench_linear.LIGHTNING, bench_linear.SOFTMAX):
        for mode in bench_linear.MODES:
            fit = results["slopes"][path][mode]["all"]
            assert fit["points"] == 2 and isinstance(fit["slope"], float)
    assert all(r["run"] and r["median_s"] > 0 and r["memory"]["peak"] > 0 for r in results["rows"])
    assert "interpret" in results["pallas"] or results["device"]["platform"] != "cpu"
    assert (tmp_path / "tiny.md").read_text().count("slope") > 0
    assert (tmp_path / "tiny.png").stat().st_size > 0


def test_prediction_extrapolates_with_each_paths_order():
    assert bench_linear.predicted_seconds(bench_linear.SOFTMAX, 2048, (1024, 1.0)) == 4.0
    assert bench_linear.predicted_seconds(bench_linear.LIGHTNING, 2048, (1024, 1.0)) == 2.0
    assert bench_linear.predicted_seconds(bench_linear.LIGHTNING, 2048, None) is None
