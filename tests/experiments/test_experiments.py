"""Smoke tests of the experiments: the main job at tiny sizes, and the benchmark's memory estimate."""

import dataclasses
import json
from typing import ClassVar

import jax
import jax.numpy as jnp
import pytest

from attnjax import registry
from experiments import bench_softmax
from experiments import main as main_job
from experiments.lib import cli, measure, mqar_runs, plots, report, workload


@pytest.mark.slow
def test_main_job_full_checks_and_times_mechanisms(tmp_path, monkeypatch):
    """The --full study at tiny sizes, one mechanism per family of two (every mechanism's paths have their own
    tests): checks at --check-len, two lengths, both modes, MQAR at a toy size."""
    names = ["softmax", "lightning"]
    monkeypatch.setattr(mqar_runs, "QUICK", dict(d_models=(16,), kv_pairs=(2,), seq_len=16, steps=3, batch_size=4,
                                                 warmup_steps=1, test_examples=8, vocab_size=32, num_layers=1))
    main_job.main(["--full", "--seq-lens", "64,128", "--repeats", "1", "--check-len", "40", "--heads", "2",
                   "--head-dim", "16", "--mechanisms", ",".join(names), "--no-cab", "--no-check-pallas",
                   "--out", str(tmp_path), "--mqar-mechanisms", "softmax,lightning"])
    results = json.loads((tmp_path / "main_full_cpu.json").read_text())
    assert set(results["mechanisms"]) == set(names)
    for entry in cli.selected_entries(names):
        checks = results["mechanisms"][entry.name]["checks"]
        assert set(checks) == set(entry.implementations) - {"reference"}
        for impl, check in checks.items():
            assert check.get("passed") or impl == "pallas", f"{entry.name}/{impl}: {check}"
    seconds = results["timings"]["seconds"]["fwd_bwd"]
    assert set(seconds) == {main_job.BASELINE, "softmax/xla", "lightning/xla"}  # what "auto" picks on CPU
    assert all(len(s) == 2 and all(t is not None and t > 0 for t in s) for s in seconds.values())
    assert (tmp_path / "main_full_cpu.png").stat().st_size > 0
    summary = (tmp_path / "main_full_cpu.md").read_text()
    assert "| lightning/xla" in summary and "T=128 fwd+bwd" in summary
    assert [r["mechanism"] for r in results["mqar"]] == ["softmax", "lightning"]
    assert "## MQAR recall (d_model 16, T=16, 3 steps" in summary


def test_main_job_checks_times_and_summarizes(tmp_path):
    """The default job on one mechanism at toy sizes: the suite's core check, one length, the summary and plot."""
    results = main_job.main(["--mechanisms", "softmax", "--seq-lens", "32", "--repeats", "1", "--heads", "1",
                             "--head-dim", "8", "--mqar-mechanisms", "", "--out", str(tmp_path)])
    checks = results["mechanisms"]["softmax"]["checks"]
    assert checks["xla"]["passed"] and checks["xla"]["T"] == 21
    assert "interpret mode" in checks["pallas"]["skipped"] and not main_job.failed_anything(results)
    timings = results["timings"]
    assert timings["modes"] == ["fwd"] and timings["seq_lens"] == [32]
    assert timings["ratio_to_baseline"]["fwd"][main_job.BASELINE] == [1.0]
    assert timings["ratio_to_baseline"]["fwd"]["softmax/xla"][0] > 0
    summary = (tmp_path / "main_cpu.md").read_text()
    assert "## Summary by family" in summary and "| softmax | 1          | 1/1 " in summary
    assert "Pallas paths not checked here (1 mechanisms)" in summary and "MQAR" not in summary
    assert json.loads((tmp_path / "main_cpu.json").read_text())["timings"] == timings
    assert (tmp_path / "main_cpu.png").stat().st_size > 0


def test_checks_compile_unoptimized_and_restore_the_setting():
    before = jax.config.read("jax_disable_most_optimizations")
    with main_job.unoptimized_compiles():
        assert jax.config.read("jax_disable_most_optimizations")
    assert jax.config.read("jax_disable_most_optimizations") == before


def test_full_sets_the_longer_study_and_explicit_flags_win():
    args = main_job.parse_args(["--full", "--seq-lens", "128"])
    assert args.seq_lens == [128] and args.modes == ["fwd", "fwd_bwd"] and args.check_len == 640 and args.cab
    assert args.name == "main_full_cpu" and args.check_pallas
    quick = main_job.parse_args([])
    assert quick.seq_lens == [1024] and quick.modes == ["fwd"] and quick.check_len is None and not quick.cab
    assert quick.name == "main_cpu" and not quick.check_pallas
    with pytest.raises(SystemExit):
        main_job.parse_args(["--modes", "bwd"])


def test_timing_leaves_out_costly_paths_and_runs_slow_ones_once():
    def cubic(q, k, v):  # eight [T, T] @ [T, T] products: many times the baseline's flops, like a cubic mechanism
        scores = jnp.einsum("bthd,bshd->bhts", q, k)
        for _ in range(8):
            scores = scores @ scores / q.shape[1]
        return jnp.einsum("bhts,bshd->bthd", scores, v)

    fns = {main_job.BASELINE: main_job.jax_nn_fn, "cubic/xla": cubic, "same/xla": main_job.jax_nn_fn}
    args = main_job.parse_args(["--heads", "1", "--head-dim", "4", "--repeats", "2", "--max-cost-ratio", "5",
                                "--time-budget-s", "0"])
    seconds, runs, skipped = main_job.time_one_length(fns, 32, "fwd", args, last := {})
    assert "XLA cost analysis" in skipped["cubic/xla"] and seconds["cubic/xla"] is None
    assert runs == {main_job.BASELINE: 2, "same/xla": 1}  # over the (zero) budget: one run only
    assert set(last) == {main_job.BASELINE, "same/xla"}


def test_ratio_panels_pack_families_into_rows(tmp_path):
    assert plots.pack_rows({"softmax": 7, "linear": 8, "sparse": 22, "local": 2}, 22) == [
        ["softmax", "linear", "local"], ["sparse"]]
    panels = {"softmax": {"a": [0.5, 2.0], "b": [None, 3.0]}, "sparse": {"c": [1.2, None]}}
    path = plots.ratio_panels(panels, ["T=64 fwd", "T=64 fwd+bwd"], tmp_path / "r.png", title="t", ylabel="ratio",
                              reference_label="baseline")
    assert path.stat().st_size > 0


def test_main_job_runs_cab_at_its_sizes():
    args = main_job.parse_args(["--seq-lens", "64", "--cab-seq-lens", "64", "--heads", "2", "--head-dim", "16",
                                "--repeats", "1"])
    results, cab_args = main_job.run_cab(cli.selected_entries(["softmax"]), args)
    assert cab_args.seq_lens == [64] and cab_args.heads == 2 and [p.name for p in cab_args.efficiency_patterns] == [
        "causal_self"]
    assert {p: r["status"] for p, r in results["softmax"]["patterns"].items()} == dict.fromkeys(
        ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross"), "ok")
    assert results["softmax"]["efficiency"]["causal_self"]["skipped"] == "the baseline itself"
    assert main_job.run_cab(cli.selected_entries(["softmax"]), args, deadline=0.0)[0] == {}


@dataclasses.dataclass(frozen=True)
class _OneQuery:
    """Takes one query per head only: the main job must skip it, not crash. Not registered."""

    name: ClassVar[str] = "one_query"
    family: ClassVar[str] = "test"
    paper: ClassVar[str] = "none"
    supports: ClassVar[frozenset] = frozenset({"mask"})

    def implementations(self):
        def attend(q, k, v, **_):
            if q.shape[1] != 1:
                raise NotImplementedError("one query per head")
            return v
        return {"reference": attend, "xla": attend}


def test_main_job_skips_a_mechanism_whose_reference_refuses_the_inputs():
    entry = registry.Entry(name="one_query", family="test", paper="none", config=_OneQuery,
                           implementations=("reference", "xla"), supports=_OneQuery.supports)
    args = main_job.parse_args(["--check-len", "8", "--heads", "1", "--head-dim", "4"])
    checks = main_job.check_entry(entry, args)
    assert "one query per head" in checks["reference"]["skipped"] and "skipped" in checks["xla"]
    assert main_job.failures({"one_query": checks}) == []
    assert main_job.timed_implementations(entry, checks, "all") == ()
    timings = {"modes": ["fwd"], "seconds": {"fwd": {main_job.BASELINE: [1e-3]}}, "skipped": {"fwd": {}}}
    assert "not timed" in main_job.check_notes({"one_query": checks}, timings)[-1]
    past = main_job.run_checks([entry], args, deadline=0.0)
    assert "--max-minutes" in past["one_query"]["reference"]["skipped"]


def test_selected_entries_default_to_the_registry():
    assert cli.selected_entries(None) == registry.entries()


def test_failures_lists_failed_checks_only():
    checks = {"a": {"xla": {"passed": True}, "pallas": {"skipped": "cpu"}}, "b": {"xla": {"passed": False}},
              "c": {"xla": {"error": "ValueError: x", "passed": False}}}
    assert main_job.failures(checks) == ["b/xla", "c/xla"]


def test_reference_checks_shrink_to_the_memory_budget():
    # The softmax reference's gradients need 157 KiB at T=64 and 570 KiB at T=128 (B=2, H=1, D=8).
    args = main_job.parse_args(["--check-len", "128", "--heads", "1", "--head-dim", "8", "--check-memory-gib", "3e-4"])
    entry = cli.selected_entries(["softmax"])[0]
    _, case, expected = main_job.reference_outputs(entry, args)
    assert case.T == main_job.MIN_CHECK_LEN == 64 and expected["out"].shape == (case.B, case.T, case.Hq, case.Dv)
    args.check_memory_gib = 1e-5
    assert "MemoryError" in main_job.check_entry(entry, args)["reference"]["skipped"]


def test_timing_stops_at_the_time_budget():
    assert main_job.predicted_seconds((512, 0.5), 1024) == 2.0 and main_job.predicted_seconds(None, 64) is None


def test_bench_memory_estimate_separates_dense_from_blocked():
    args = bench_softmax.parse_args(["--heads", "2", "--head-dim", "16"])
    fns = bench_softmax.path_fns(block_q=64, block_kv=64)
    T = 512
    xs = workload.benchmark_inputs(T, "fwd", args)
    dense = bench_softmax.memory_estimate(fns["jax.nn/xla"], "fwd", xs)
    blocked = bench_softmax.memory_estimate(fns["attnjax/xla"], "fwd", xs)
    io = 4 * 512 * 2 * 16 * 4  # q, k, v in, out: [1, T, 2, 16] float32 each
    assert dense.argument + dense.output == blocked.argument + blocked.output == io
    assert dense.extra >= 2 * T * T * 4  # at least one [H, T, T] float32 score matrix
    assert blocked.extra < dense.extra / 2
    assert dense.peak == dense.argument + dense.output + dense.temp - dense.alias


def test_time_fn_reports_median_of_repeats():
    timing = measure.time_fn(lambda x: x @ x, jnp.ones((8, 8)), repeats=3)
    assert timing.repeats == 3 and timing.median_s > 0


def test_parse_ints_and_table():
    assert cli.parse_ints("1k,2048,32k") == [1024, 2048, 32768]
    table = report.markdown_table(["a", "bb"], [[1, "x"]]).splitlines()
    assert table[0] == "| a | bb |" and table[2] == "| 1 | x  |"
