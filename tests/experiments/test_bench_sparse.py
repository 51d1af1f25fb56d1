"""Smoke tests of the block-sparse benchmark and the tile-throughput study at tiny sizes, and the
benchmark's density and verdict rules."""

import json

import numpy as np
import pytest

from attnjax.sparse import from_block_mask
from experiments import bench_sparse, tile_rates


def test_bench_sparse_writes_cases_and_timing_rows(tmp_path):
    bench_sparse.main(["--seq-lens", "256", "--repeats", "1", "--heads", "2", "--head-dim", "16",
                       "--mechanisms", "sparse_window,neighborhood", "--na-kernel", "5", "--out", str(tmp_path),
                       "--name", "tiny"])
    results = json.loads((tmp_path / "tiny.json").read_text())
    assert [(c["mechanism"], c["causal"]) for c in results["cases"]] == [("sparse_window", True),
                                                                         ("neighborhood", False)]
    for case in results["cases"]:
        assert 0 < case["density"] <= 1 and all(s > 0 for s in case["seconds"].values())
        assert case["speedup_engine"] == pytest.approx(case["seconds"]["dense"] / case["seconds"]["engine"])
    paths = {r["path"] for r in results["rows"]}
    assert {"sparse_window/engine", "neighborhood/selected", "dense/xla"} <= paths
    assert "| sparse_window" in (tmp_path / "tiny.md").read_text()
    assert (tmp_path / "tiny.png").stat().st_size > 0


def test_relative_density_counts_the_causal_triangle():
    causal = from_block_mask(np.tril(np.ones((4, 4), bool)), 16, 16)
    assert bench_sparse.relative_density(causal, causal=True) == pytest.approx(1.0)
    assert bench_sparse.relative_density(causal, causal=False) == pytest.approx(10 / 16)
    diagonal = from_block_mask(np.eye(4, dtype=bool), 16, 16)
    assert bench_sparse.relative_density(diagonal, causal=True) == pytest.approx(0.4)


def test_verdict_only_where_density_is_low():
    row = {"seconds": {"dense": 1.0, "engine": 0.2, "selected": 0.3}, "density": 0.2}
    assert bench_sparse.finish_row(dict(row))["target"] == "met"  # 5x >= 0.7 / 0.2 = 3.5x
    assert bench_sparse.finish_row(dict(row, density=0.1))["target"] == "missed"  # 5x < 7x
    assert bench_sparse.finish_row(dict(row, density=0.5))["target"].startswith("n/a")
    assert bench_sparse.grid_2d(12) == (3, 4) and bench_sparse.grid_2d(13) == (1, 13)


def test_tile_rates_smoke(tmp_path):
    results = tile_rates.main(["--smoke", "--out", str(tmp_path)])
    shapes = [(r["rows"], r["keys"]) for r in results["rows"]]
    assert shapes == [(16, 16), (16, 48), (32, 16), (32, 48)]
    assert all(r["gflops"] > 0 for r in results["rows"]) and max(r["relative"] for r in results["rows"]) == 1.0
    assert (tmp_path / "tile_rates_cpu_smoke.png").stat().st_size > 0


def test_block_flag_sets_every_selector_and_the_neighbourhood_tile():
    args = bench_sparse.parse_args(["--block", "128", "--mechanisms", "sparse_window,moba,neighborhood"])
    configs = bench_sparse.cases(args)
    assert configs["sparse_window"].block_q == configs["moba"].block_kv == 128
    assert configs["sparse_window"].window_blocks == type(configs["sparse_window"])().window_blocks
    assert bench_sparse.na_tile(args) == (8, 16)
    assert bench_sparse.na_tile(bench_sparse.parse_args([])) is None


@pytest.mark.slow
def test_key_lists_rows_time_both_paths_and_each_selectors_selection(tmp_path):
    results = bench_sparse.main(["--key-lists", "--seq-lens", "256", "--key-fractions", "8", "--heads", "2",
                                 "--head-dim", "16", "--repeats", "1", "--max-seconds", "1", "--segment", "16",
                                 "--out", str(tmp_path), "--name", "kl"])
    rows = {r["source"]: r for r in results["cases"]}
    assert set(rows) == set(bench_sparse.KEY_LIST_SOURCES)
    for source, r in rows.items():
        sec = r["seconds"]
        assert r["blocks_over_dense"] == pytest.approx(sec["blocks"] / sec["dense"])
        if source in bench_sparse.SELECTORS:
            path = r["auto"].split()[0]
            assert r["end_to_end_over_dense"] == pytest.approx((sec["selection"] + sec[path]) / sec["dense"])
        else:
            assert "selection" not in sec and r["end_to_end_over_dense"] is None
    assert "selection + auto / dense" in (tmp_path / "kl.md").read_text()
