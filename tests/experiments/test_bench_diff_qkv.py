"""Smoke test of the DiffQKV decode benchmark at tiny sizes."""

import json

from experiments import bench_diff_qkv


def test_bench_diff_qkv_reports_cache_and_time_ratios(tmp_path):
    bench_diff_qkv.main(["--smoke", "--out", str(tmp_path), "--name", "tiny"])
    results = json.loads((tmp_path / "tiny.json").read_text())
    rows = {r["path"]: r for r in results["rows"]}
    assert set(rows) == {bench_diff_qkv.BASELINE, "diffqkv Hv=1"}
    # B·L·(Hk·D + Hv·Dv)·4 bytes: Hk = 2, Hv = 2 or 1, D = Dv = 8, L = 64
    assert rows[bench_diff_qkv.BASELINE]["cache_bytes"] == 64 * (2 * 8 + 2 * 8) * 4
    assert rows["diffqkv Hv=1"]["cache_bytes"] == 64 * (2 * 8 + 1 * 8) * 4
    assert rows["diffqkv Hv=1"]["cache_ratio_to_gqa"] == 0.75
    assert all(r["median_s"] > 0 and r["time_ratio_to_gqa"] > 0 for r in rows.values())
    assert (tmp_path / "tiny.png").stat().st_size > 0 and "time / GQA" in (tmp_path / "tiny.md").read_text()
