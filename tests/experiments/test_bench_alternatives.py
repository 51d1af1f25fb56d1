"""Smoke test of the softmax-alternatives benchmark at tiny sizes."""

import json

import pytest

from experiments import bench_alternatives


def test_alternatives_come_from_the_registry():
    names = {e.name for e in bench_alternatives.alternatives()}
    assert {"sigmoid", "softplus"} <= names and "softmax" not in names


@pytest.mark.slow
def test_bench_alternatives_smoke_reports_ratios_to_softmax(tmp_path):
    bench_alternatives.main(["--smoke", "--mechanisms", "sigmoid", "--no-with-pallas", "--out", str(tmp_path),
                             "--name", "tiny"])
    results = json.loads((tmp_path / "tiny.json").read_text())
    rows = {(r["path"], r["mode"]): r for r in results["rows"]}
    assert {p for p, _ in rows} == {"softmax/xla", "sigmoid/xla"}
    for (path, mode), r in rows.items():
        assert r["run"] and r["median_s"] > 0 and r["memory"]["peak"] > 0
        assert r["ratio_to_softmax_xla"] > 0 and r["memory_ratio_to_softmax_xla"] > 0
    assert rows[("softmax/xla", "fwd")]["ratio_to_softmax_xla"] == 1.0
    report = (tmp_path / "tiny.md").read_text()
    assert "sigmoid/xla" in report and "load average" in report and "interpret mode" in report
    assert (tmp_path / "tiny.png").stat().st_size > 0
