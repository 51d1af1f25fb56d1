"""Smoke test of the ring benchmark at tiny sizes (the peer runs only where it is installed)."""

import pytest

from experiments import bench_ring


@pytest.mark.slow
def test_smoke_times_both_layouts_and_the_peer_when_installed(tmp_path):
    results = bench_ring.main(["--smoke", "--out", str(tmp_path), "--name", "tiny"])
    (row,) = results["rows"]
    assert row["seconds"]["ours/contiguous"] > 0 and row["seconds"]["ours/zigzag"] > 0
    if bench_ring.load_peer() is not None:
        assert row["max_abs_diff"] < 1e-4 and row["ratio_contiguous"] > 0
    assert "peer" in (tmp_path / "tiny.md").read_text()
