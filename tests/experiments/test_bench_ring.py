"""Smoke test of the ring benchmark at tiny sizes (the peer runs only where it is installed), with ``--lasp2``."""

import pytest

from experiments import bench_ring


@pytest.mark.slow
def test_smoke_times_both_layouts_lasp2_and_the_peer_when_installed(tmp_path):
    results = bench_ring.main(["--smoke", "--lasp2", "--out", str(tmp_path), "--name", "tiny"])
    (row,) = results["rows"]
    assert row["seconds"]["ours/contiguous"] > 0 and row["seconds"]["ours/zigzag"] > 0
    assert row["seconds"]["lasp2"] > 0 and row["lasp2_over_ring"] > 0 and row["lasp2_over_ring_cpu"] > 0
    assert row["bytes_per_device"]["lasp2"] > 0 and row["bytes_per_device"]["ours/contiguous"] > 0
    if bench_ring.load_peer() is not None:
        assert row["max_abs_diff"] < 1e-4 and row["ratio_contiguous"] > 0
    text = (tmp_path / "tiny.md").read_text()
    assert "peer" in text and "lasp2 / ring" in text
