"""Smoke test of the MoH benchmark at tiny sizes, and its target and crossover bookkeeping."""

import json

import pytest

from experiments import bench_heads


def test_bench_heads_reports_ratios_to_all_heads(tmp_path):
    bench_heads.main(["--smoke", "--seq-lens", "128", "--fractions", "0.5", "--out", str(tmp_path), "--name", "tiny"])
    results = json.loads((tmp_path / "tiny.json").read_text())
    rows = {r["path"]: r for r in results["rows"]}
    assert set(rows) == {bench_heads.BASELINE, "moh 0.5"}
    for r in rows.values():
        assert r["median_s"] > 0 and r["ratio_to_all_heads"] > 0 and r["memory"]["peak"] > 0 and r["block"] == 64
    assert rows[bench_heads.BASELINE]["ratio_to_all_heads"] == 1.0
    assert (rows["moh 0.5"]["shared_heads"], rows["moh 0.5"]["top_k"]) == (1, 1)  # 2 of the smoke's 4 heads
    assert results["target"]["met"] is None  # T = 4k was not measured
    report = (tmp_path / "tiny.md").read_text()
    assert "moh 0.5" in report and "load average" in report and "not measured" in report
    assert (tmp_path / "tiny.png").stat().st_size > 0


def test_split_target_and_crossover():
    assert bench_heads.split_heads(0.5, 8) == (2, 2) and bench_heads.split_heads(0.25, 8) == (1, 1)
    assert bench_heads.split_heads(1.0, 8) == (4, 4)
    with pytest.raises(ValueError, match="gives 0 active heads"):
        bench_heads.split_heads(0.01, 8)
    args = bench_heads.parse_args(["--seq-lens", "1k,2k,4k", "--fractions", "0.5"])

    def row(T, path, block, t):
        return dict(T=T, path=path, block=block, median_s=t)

    rows = [row(T, bench_heads.BASELINE, b, 1.0) for T in (1024, 2048, 4096) for b in (256, 512)]
    rows += [row(1024, "moh 0.5", 256, 1.2), row(2048, "moh 0.5", 256, 0.9), row(2048, "moh 0.5", 512, 0.95),
             row(4096, "moh 0.5", 256, 0.7), row(4096, "moh 0.5", 512, 0.6)]
    assert bench_heads.crossover(rows, args) == {"moh 0.5": 2048}
    goal = bench_heads.targets(rows)
    assert goal["ratio"] == pytest.approx(0.6) and goal["met"] is True
