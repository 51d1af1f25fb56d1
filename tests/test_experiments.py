"""Smoke tests of the experiments: the main job at tiny sizes, and the benchmark's memory estimate."""

import json

import jax.numpy as jnp

from attnjax import registry
from experiments import bench_softmax, common
from experiments import main as main_job


def test_main_job_checks_and_times_mechanisms(tmp_path):
    """One mechanism per family at tiny sizes (every mechanism's paths have their own tests)."""
    names = ["softmax", "lightning"]
    main_job.main(["--seq-lens", "64,128", "--repeats", "1", "--check-len", "40", "--heads", "2",
                   "--head-dim", "16", "--mechanisms", ",".join(names), "--out", str(tmp_path)])
    results = json.loads((tmp_path / "main.json").read_text())
    assert set(results["mechanisms"]) == set(names)
    for entry in main_job.selected_entries(names):
        checks = results["mechanisms"][entry.name]["checks"]
        assert set(checks) == set(entry.implementations) - {"reference"}
        for impl, check in checks.items():
            assert check.get("passed"), f"{entry.name}/{impl}: {check}"
    seconds = results["timings"]["seconds"]["fwd_bwd"]
    assert all(len(s) == 2 and all(t is not None and t > 0 for t in s) for s in seconds.values())
    assert (tmp_path / "main_scaling.png").stat().st_size > 0


def test_selected_entries_default_to_the_registry():
    assert main_job.selected_entries(None) == registry.entries()


def test_failures_lists_failed_checks_only():
    checks = {"a": {"xla": {"passed": True}, "pallas": {"skipped": "cpu"}}, "b": {"xla": {"passed": False}}}
    assert main_job.failures(checks) == ["b/xla"]


def test_bench_memory_estimate_separates_dense_from_blocked():
    args = bench_softmax.parse_args(["--heads", "2", "--head-dim", "16"])
    fns = bench_softmax.path_fns(block_q=64, block_kv=64)
    T = 512
    xs = bench_softmax.inputs(T, "fwd", args)
    dense = bench_softmax.memory_estimate(fns["jax.nn/xla"], "fwd", xs)
    blocked = bench_softmax.memory_estimate(fns["attnjax/xla"], "fwd", xs)
    io = 4 * 512 * 2 * 16 * 4  # q, k, v in, out: [1, T, 2, 16] float32 each
    assert dense.argument + dense.output == blocked.argument + blocked.output == io
    assert dense.extra >= 2 * T * T * 4  # at least one [H, T, T] float32 score matrix
    assert blocked.extra < dense.extra / 2
    assert dense.peak == dense.argument + dense.output + dense.temp - dense.alias


def test_time_fn_reports_median_of_repeats():
    timing = common.time_fn(lambda x: x @ x, jnp.ones((8, 8)), repeats=3)
    assert timing.repeats == 3 and timing.median_s > 0


def test_parse_ints_and_table():
    assert common.parse_ints("1k,2048,32k") == [1024, 2048, 32768]
    table = common.markdown_table(["a", "bb"], [[1, "x"]]).splitlines()
    assert table[0] == "| a | bb |" and table[2] == "| 1 | x  |"
