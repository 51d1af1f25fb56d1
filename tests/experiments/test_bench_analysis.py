"""Smoke test of the entropy / sink-score benchmark at tiny sizes."""

import json

from experiments import bench_analysis


def test_bench_analysis_reports_ratios_to_the_forward_and_memory(tmp_path):
    bench_analysis.main(["--smoke", "--seq-lens", "128", "--block-q", "32", "--out", str(tmp_path),
                         "--name", "tiny"])
    results = json.loads((tmp_path / "tiny.json").read_text())
    rows = {r["path"]: r for r in results["rows"]}
    assert set(rows) == {bench_analysis.BASELINE, bench_analysis.DENSE, bench_analysis.ENTROPY_BY_ATTENTION,
                         "entropy bq=32", "sink_scores bq=32"}
    for r in rows.values():
        assert r["run"] and r["median_s"] > 0 and r["ratio_to_forward"] > 0 and r["memory"]["peak"] > 0
        assert r["temp_fraction_of_map"] == r["memory"]["temp"] / (1 * 2 * 128 * 128 * 4)
    assert rows[bench_analysis.BASELINE]["ratio_to_forward"] == 1.0 and "flops" not in rows[bench_analysis.BASELINE]
    assert rows["entropy bq=32"]["flops"] == 2 * 2 * 128 * 128 * 16
    assert all(g["time_met"] is None for g in results["targets"].values())  # T = 32k was not measured
    report = (tmp_path / "tiny.md").read_text()
    assert "sink_scores bq=32" in report and "load average" in report and "not measured" in report
    assert (tmp_path / "tiny.png").stat().st_size > 0


def test_targets_pick_the_best_tile_at_32k():
    args = bench_analysis.parse_args(["--block-q", "64,128"])
    row = dict(T=32768, temp_fraction_of_map=0.01, temp_ratio_to_forward=3.0)
    rows = [dict(row, path="entropy bq=64", ratio_to_forward=1.7), dict(row, path="entropy bq=128", ratio_to_forward=1.4),
            dict(row, path="sink_scores bq=64", ratio_to_forward=2.0, temp_fraction_of_map=0.1)]
    goals = bench_analysis.targets(rows, args)
    assert goals["entropy"]["best_path"] == "entropy bq=128" and goals["entropy"]["time_met"] is True
    assert goals["entropy"]["memory_met"] is True
    assert goals["sink_scores"]["time_met"] is False and goals["sink_scores"]["memory_met"] is False
