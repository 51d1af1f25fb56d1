"""Smoke test of the linear-family benchmark at tiny sizes, and its timing and target bookkeeping."""

import argparse
import json
import time

import numpy as np
import pytest

from experiments import bench_linear_family as blf

FAST_PATHS = {"flow", "flow causal", "inline", "rala", "kernelized_rpe", "kernelized_rpe causal", "agent",
              "channel_group", "slab", "l2vit", "scatterformer"}


@pytest.mark.slow
def test_smoke_fits_a_slope_and_a_softmax_ratio_for_every_path(tmp_path):
    # One mode keeps the compilations (13 paths x 2 lengths) within the test budget; the slow test runs both.
    results = blf.main(["--smoke", "--modes", "fwd", "--seq-lens", "64,128", "--out", str(tmp_path), "--name", "tiny"])
    assert json.loads((tmp_path / "tiny.json").read_text())["targets"] == results["targets"]
    assert set(results["slopes"]) == FAST_PATHS | {blf.SOFTMAX_XLA, blf.SOFTMAX_CAUSAL}
    for path, by_mode in results["slopes"].items():
        fit = by_mode["fwd"]["all"]
        assert fit["points"] == 2 and isinstance(fit["slope"], float), path
    assert set(results["targets"]) == FAST_PATHS
    for path, by_mode in results["targets"].items():
        goal = by_mode["fwd"]
        assert goal["bound"] == (1.25 if path.startswith("kernelized_rpe") else 1.15)
        assert goal["baseline"] == (blf.SOFTMAX_CAUSAL if path.endswith("causal") else blf.SOFTMAX_XLA)
        assert goal["ratio_to_softmax"] > 0 and goal["baseline_measured"] and goal["met"] in (True, False)
    assert all(r["run"] and r["median_s"] > 0 and r["repeats"] == len(r["samples_s"]) >= 1 and r["warmup_s"] > 0
               and r["memory"]["peak"] > 0 for r in results["rows"])
    report = (tmp_path / "tiny.md").read_text()
    assert all(f"`{path}`" in report for path in FAST_PATHS) and "load average" in report
    assert "64 -> 128" in report
    assert (tmp_path / "tiny.png").stat().st_size > 0
    assert set(results["cpu_slopes"]) == set(results["slopes"]) and "Process CPU time" in report
    assert all(r["cpu_median_s"] > 0 and len(r["page_faults"]) == r["repeats"] for r in results["rows"])


@pytest.mark.slow
def test_full_smoke_runs_both_modes(tmp_path):
    results = blf.main(["--smoke", "--out", str(tmp_path), "--name", "tiny"])
    assert all(by_mode[m]["all"] for by_mode in results["slopes"].values() for m in blf.MODES)


def test_slow_path_leaves_the_rounds_while_fast_ones_keep_repeating():
    samples, faults, cpu = blf.time_each_path({"slow": lambda: time.sleep(0.05), "fast": lambda: None}, repeats=4,
                                              max_seconds=0.04)
    assert len(samples["slow"]) == 1 and samples["slow"][0] >= 0.05 and len(samples["fast"]) == 4
    assert len(faults["slow"]) == 1 and len(faults["fast"]) == 4 and all(f >= 0 for f in faults["fast"])
    assert len(cpu["slow"]) == 1 and cpu["slow"][0] < 0.05, "sleeping takes wall time, not CPU time"


def test_page_faults_of_a_run_that_touches_fresh_memory_are_counted():
    faults, cpu = [], []
    blf.counting_faults(lambda: np.ones(64 << 20, np.uint8), faults, cpu)()   # 64 MiB, mapped afresh (huge pages or not)
    assert len(faults) == 1 and faults[0] >= 1 and len(cpu) == 1 and cpu[0] > 0


def test_paths_flag_picks_known_paths_only():
    assert blf.parse_args(["--paths", "rala,l2vit"]).paths == ["rala", "l2vit"]
    assert blf.parse_args([]).paths is None
    with pytest.raises(SystemExit):
        blf.parse_args(["--paths", "rala,nope"])
    assert set(blf.PATHS) == FAST_PATHS | {blf.SOFTMAX_XLA, blf.SOFTMAX_CAUSAL}


def _row(T, path, seconds, kind=blf.LINEAR, baseline=blf.SOFTMAX_XLA, predicted=None):
    return {"T": T, "mode": "fwd", "path": path, "kind": kind, "baseline": baseline, "run": seconds is not None,
            "median_s": seconds, "predicted_s": predicted}


def test_target_uses_the_bound_of_the_kind_and_softmaxs_predicted_time_when_it_did_not_run():
    rows = [_row(1024, "p", 1.0), _row(2048, "p", 2.3), _row(1024, blf.SOFTMAX_XLA, 1.0, blf.SOFTMAX),
            _row(2048, blf.SOFTMAX_XLA, None, blf.SOFTMAX, predicted=4.6)]
    args = argparse.Namespace(seq_lens=[1024, 2048], modes=["fwd"], slope_min_len=2048)
    fits = blf.path_slopes(rows, ["p", blf.SOFTMAX_XLA], ["fwd"], 2048)
    goal = blf.targets(rows, fits, args)["p"]["fwd"]
    assert goal["slope"] == pytest.approx(1.2016, abs=1e-4) and goal["met"] is False
    assert goal["slope_from_min_len"] is None and goal["met_from_min_len"] is None
    assert goal["ratio_to_softmax"] == pytest.approx(0.5) and not goal["baseline_measured"]
    assert blf.SOFTMAX_XLA not in blf.targets(rows, fits, args)


def test_rejects_lengths_that_do_not_make_a_map():
    with pytest.raises(SystemExit):
        blf.parse_args(["--seq-lens", "1000", "--image-width", "32"])
