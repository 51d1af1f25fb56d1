"""The benchmark entry point (experiments.bench): modules run, FLOP rates against a matmul, smoke mode."""

import json
import time

import pytest

from experiments import bench
from experiments.lib import flops, report
from experiments.lib.workload import MODES


def test_bench_runs_a_module_and_reports_flop_rates(tmp_path):
    """One module at one tiny length (the full ``--smoke`` run is the slow test below), plus a missing one."""
    data = bench.main(["--smoke", "--modules", "bench_softmax,bench_nonexistent", "--seq-lens", "128",
                       "--matmul-repeats", "1", "--out", str(tmp_path)])
    assert data["modules"]["bench_softmax"]["status"] == "ok"
    assert data["modules"]["bench_nonexistent"]["status"] == "missing"
    rows = data["rows"]
    assert {r["path"] for r in rows} == {"attnjax/xla", "jax.nn/xla", "attnjax/reference"}
    assert {r["mode"] for r in rows} == set(MODES) and {r["T"] for r in rows} == {128}
    for r in rows:
        expected = flops.attention_flops(1, 2, 128, 128, 32, causal=True, mode=r["mode"])
        assert r["flops"] == expected
        assert r["flops_per_s"] == pytest.approx(expected / r["median_s"])
        assert r["fraction_of_matmul"] == pytest.approx(r["flops_per_s"] / r["matmul_flops_per_s"])
    name = data["settings"]["name"]
    assert name.endswith("_smoke") and json.loads((tmp_path / f"{name}.json").read_text())["rows"] == rows
    assert "fraction of matmul" in (tmp_path / f"{name}.md").read_text()
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert (tmp_path / "bench_softmax_cpu_smoke.json").exists()  # the module's own results, smoke-named


def test_a_failing_module_is_reported_not_raised(tmp_path):
    assert bench.run_module("bench_softmax", ["--no-such-flag"], tmp_path / "none.json")["status"] == "error"


def test_module_names_and_forwarded_flags():
    names = bench.module_names()
    assert names[:3] == list(bench.KNOWN) and "bench" not in names
    args = bench.parse_args(["--smoke", "--heads", "3", "--out", "/x"])
    stem = bench.module_stem("bench_softmax", smoke=True)
    assert stem.startswith("bench_softmax_") and stem.endswith("_smoke")
    assert bench.module_argv(args, "bench_softmax") == ["--out", "/x", "--name", stem, "--smoke", "--heads", "3"]
    assert bench.parse_args(["--smoke"]).out == report.SMOKE_DIR  # smoke results are never kept ones


def test_attention_flops_formula_and_matmul_size():
    assert flops.attention_flops(2, 3, 5, 7, 4, causal=False) == 4 * 2 * 3 * 5 * 7 * 4
    assert flops.attention_flops(2, 3, 5, 7, 4, causal=True) == 2 * 2 * 3 * 5 * 7 * 4
    assert flops.attention_flops(1, 1, 8, 8, 4, causal=False, mode="fwd_bwd") == 3.5 * 4 * 64 * 4
    assert flops.attention_flops(1, 1, 8, 8, 4, causal=False, head_dim_v=2) == 2 * 64 * (4 + 2)
    fn, (a, b), work = flops.matmul_for_flops(2 * 100 ** 3)
    assert a.shape == b.shape == (100, 100) and work == 2e6 and fn(a, b).shape == (100, 100)


@pytest.mark.slow
def test_bench_smoke_runs_every_module_in_under_a_minute(tmp_path):
    started = time.perf_counter()
    data = bench.main(["--smoke", "--out", str(tmp_path)])
    assert time.perf_counter() - started < 60
    assert all(m["status"] in ("ok", "missing") for m in data["modules"].values()), data["modules"]
    assert {"bench_softmax", "bench_linear"} <= {r["module"] for r in data["rows"]}
