"""Smoke test of the memory benchmark's neural_memory section at tiny sizes."""

import json

import pytest

from experiments import bench_memory


@pytest.mark.slow
def test_smoke_neural_memory_section_fits_a_slope_and_a_reference_ratio(tmp_path):
    results = bench_memory.main(["--smoke", "--only", "neural_memory", "--out", str(tmp_path), "--name", "tiny"])
    section = results["sections"]["neural_memory"]
    assert json.loads((tmp_path / "tiny.json").read_text())["sections"]["neural_memory"]["slope"] == section["slope"]
    assert section["chunk_size"] in (8, 16) and section["slope"]["points"] == 2
    assert section["reference_over_chunked"] > 0 and section["met"] in (True, False)
    assert all(r["median_s"] > 0 and r["memory"]["peak"] > 0 for r in section["rows"])
    report = (tmp_path / "tiny.md").read_text()
    assert "## neural_memory" in report and "load average" in report


def test_only_rejects_an_unknown_section():
    with pytest.raises(SystemExit):
        bench_memory.parse_args(["--only", "nope"])
