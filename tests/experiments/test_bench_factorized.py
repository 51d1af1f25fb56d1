"""Smoke test of the Combiner / CCA-Attention / HyperAttention benchmark at tiny sizes."""

import json

import pytest

from experiments import bench_factorized


@pytest.mark.slow
def test_bench_factorized_writes_rows_and_ratios(tmp_path):
    bench_factorized.main(["--seq-lens", "64", "--repeats", "1", "--heads", "2", "--head-dim", "8", "--window", "16",
                           "--group-size", "4", "--hyper-min-seq-len", "16", "--out", str(tmp_path), "--name", "tiny"])
    results = json.loads((tmp_path / "tiny.json").read_text())
    (row,) = results["rows"]
    assert set(row["ratio_to_dense"]) == {"combiner_fixed", "combiner_logsparse", "combiner_axial", "core_context",
                                            "hyper"}
    for path, ratio in row["ratio_to_dense"].items():
        assert ratio == pytest.approx(row["seconds"][path] / row["seconds"]["dense"])
    assert 0.0 < row["hyper_error"]["spectral"] < 1.0   # the recursion approximates below T = 64
    assert "| 64 | core_context" in (tmp_path / "tiny.md").read_text().replace("  ", " ")
    assert (tmp_path / "tiny.png").stat().st_size > 0
