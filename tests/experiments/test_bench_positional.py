"""Smoke test of the positional bias-rule benchmark at tiny sizes."""

import json

import pytest

from experiments import bench_positional


@pytest.mark.slow
def test_bench_positional_reports_time_ratios_and_temporaries(tmp_path):
    bench_positional.main(["--smoke", "--out", str(tmp_path), "--name", "tiny"])
    results = json.loads((tmp_path / "tiny.json").read_text())
    rows = results["rows"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd_bwd"}
    names = {r["rule"] for r in rows}
    assert {bench_positional.BASELINE, "alibi", "t5"} <= names
    assert all(r["median_s"] > 0 and r["time_ratio_to_none"] > 0 and r["memory"]["temp"] >= 0 for r in rows)
    assert "time / none" in (tmp_path / "tiny.md").read_text() and (tmp_path / "tiny.png").stat().st_size > 0
