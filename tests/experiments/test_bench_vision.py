"""Smoke test of the vision attention benchmark at tiny sizes."""

import json

from experiments import bench_vision


def test_bench_vision_reports_ratios_to_dense_and_memory(tmp_path):
    bench_vision.main(["--smoke", "--out", str(tmp_path), "--name", "tiny"])
    results = json.loads((tmp_path / "tiny.json").read_text())
    rows = {r["path"]: r for r in results["rows"]}
    assert set(rows) == {bench_vision.BASELINE, bench_vision.BLOCKED, "window 4x4", "shifted window 4x4", "grid 4x4",
                         "halo b=4 h=1", "neighborhood 3x3", "criss-cross"}
    for r in rows.values():
        assert r["run"] and r["median_s"] > 0 and r["time_ratio_to_dense"] > 0 and r["memory"]["peak"] > 0
        assert r["T"] == 256 and r["temp_fraction_of_logits"] == r["memory"]["temp"] / (2 * 256 * 256 * 4)
    assert rows[bench_vision.BASELINE]["time_ratio_to_dense"] == 1.0
    assert rows["window 4x4"]["memory"]["temp"] < rows[bench_vision.BASELINE]["memory"]["temp"]
    report = (tmp_path / "tiny.md").read_text()
    assert "criss-cross" in report and "load average" in report
    assert (tmp_path / "tiny.png").stat().st_size > 0
