"""The hardware check without hardware: the CPU exit, the plan for a pretend GPU and TPU, the discovery of the
tests that skip on CPU, the section cap, and the report on fake timing rows."""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from experiments import gpu_check
from experiments.lib import workload

FAKE_TESTS = {
    "tests/kernels/test_a.py": '''
import jax, pytest
HAS_X = False

@pytest.mark.skipif(jax.default_backend() != "gpu", reason="GPU only")
def test_gpu():
    pass

@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"), reason="accelerator")
def test_accelerator():
    pass

@pytest.mark.skipif(jax.default_backend() != "tpu", reason="TPU only")
@pytest.mark.parametrize("x", [1, 2])
def test_tpu(x):
    pass

@pytest.mark.skipif(not HAS_X, reason="not about the backend")
def test_unrelated():
    pass

def test_everywhere():
    pass

class TestGroup:
    @pytest.mark.skipif(jax.default_backend() == "cpu", reason="compiled")
    def test_in_class(self):
        pass
''',
    "tests/kernels/test_interpret.py": '''
import jax, pytest
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="interpret mode is the CPU default only")

def test_interpreted():
    pass
''',
}


def test_on_cpu_it_says_it_needs_an_accelerator_and_exits_zero(capsys):
    assert gpu_check.main([]) == 0
    assert gpu_check.main(["--require", "tpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("needs a GPU or TPU") == 2 and "found cpu" in out and "this check is for tpu" in out


def test_accelerator_tests_are_those_that_skip_on_cpu_only():
    assert gpu_check.accelerator_tests(FAKE_TESTS, "gpu") == [
        "tests/kernels/test_a.py::test_gpu", "tests/kernels/test_a.py::test_accelerator",
        "tests/kernels/test_a.py::TestGroup::test_in_class"]
    assert gpu_check.accelerator_tests(FAKE_TESTS, "tpu") == [
        "tests/kernels/test_a.py::test_accelerator", "tests/kernels/test_a.py::test_tpu",
        "tests/kernels/test_a.py::TestGroup::test_in_class"]
    found = gpu_check.kernel_tests("gpu")  # the repository's own tests
    assert "tests/kernels/test_flash_gpu.py::test_triton_lowering_on_gpu" in found
    assert not any("test_interpret_mode" in t or "tpu" in t for t in found)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_plan(platform):
    sections = gpu_check.plan(platform, ["tests/x.py::test_y"], fla=True)
    assert [s.name for s in sections] == ["kernel tests", "flash", "lightning", "sparse"]
    assert sections[0].tests == ("tests/x.py::test_y",) and not sections[0].benches
    assert sum(s.cap_s for s in sections) + gpu_check.OVERHEAD_S <= gpu_check.TOTAL_BUDGET_S == 480
    benches = {s.name: s.benches for s in sections}
    assert benches["flash"][0].family == "matmul"
    flash = [b for b in benches["flash"] if b.family == "flash"]
    assert [(b.T, b.mode) for b in flash] == [(T, m) for T in (1024, 4096, 16384) for m in ("fwd", "fwd_bwd")]
    assert all(b.causal == (b.family != "neighborhood") and b.dtype == "bfloat16" and b.baseline in b.paths
               for s in sections for b in s.benches)
    lightning = benches["lightning"][0].paths
    sparse = {b.family: b for b in benches["sparse"]}
    if platform == "gpu":
        assert flash[0].paths == ("attnjax/pallas", "cudnn", "pallas.ops/gpu", "jax.nn/xla")
        assert flash[0].baseline == "cudnn"
        assert "fla/chunk_simple_gla" in lightning and benches["lightning"][0].baseline == "fla/chunk_simple_gla"
        assert dict(sections[2].env)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".5"
        assert sparse["block_sparse"].block == 64 and sparse["neighborhood"].tile == (8, 8)
    else:
        assert "cudnn" not in flash[0].paths and flash[0].baseline == "pallas.ops/tpu"
        assert lightning == ("lightning/pallas", "lightning/xla") and not sections[2].env  # fla is GPU-only
        assert sparse["block_sparse"].block == 128
    assert sparse["block_sparse"].density == 1 / 8 and not sparse["neighborhood"].causal
    no_fla = gpu_check.plan(platform, [], fla=False)
    assert no_fla[2].benches[0].baseline == "lightning/xla"
    smoke = gpu_check.plan(platform, [], smoke=True)
    assert max(b.T for s in smoke for b in s.benches) <= 1024 and smoke[1].cap_s < sections[1].cap_s
    with pytest.raises(ValueError, match="platform"):
        gpu_check.plan("cpu", [])


def test_section_json_round_trip_and_cap_skips_every_group(tmp_path):
    section = gpu_check.plan("gpu", [], fla=True)[3]
    assert gpu_check.Section.from_json(json.loads(json.dumps(section.to_json()))) == section
    spec, rows = tmp_path / "s.json", tmp_path / "rows.jsonl"
    spec.write_text(json.dumps(section.to_json()))
    gpu_check.run_child(spec, rows, deadline=time.time())  # nothing fits: all rows skipped, none measured
    got = [json.loads(line) for line in rows.read_text().splitlines()]
    assert len(got) == sum(len(b.paths) for b in section.benches)
    assert {r["status"] for r in got} == {"skipped"}


def test_jax_pallas_ops_baseline_lowers_to_triton():
    """The GPU flash group's jax baseline as called here (this jax's ``mha`` signature), forward and backward,
    cross-lowered for CUDA from the CPU host: it becomes Triton kernel calls."""
    bench = gpu_check.Bench("flash", 128, "fwd_bwd", ("pallas.ops/gpu",), "pallas.ops/gpu", batch=1, heads=2,
                            head_dim=64)
    qkv = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    args = (qkv, qkv, qkv, jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.float32))  # workload.mode_inputs' shapes
    fn = workload.mode_fn(gpu_check.path_impl("pallas.ops/gpu", bench).fn, "fwd_bwd")
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") >= 2  # the forward kernel and the backward kernels


def test_run_capped_kills_at_the_cap():
    done = gpu_check.run_capped([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                0.5, os.environ)
    assert done.timed_out and done.lines == ["started"] and done.elapsed_s < 10


def test_parse_pytest_output():
    lines = ["tests/a.py::test_ok PASSED                     [ 33%]",
             "tests/a.py::test_bad[True] FAILED              [ 66%]",
             "tests/b.py::test_skip SKIPPED (needs a TPU)    [100%]",
             "FAILED tests/a.py::test_bad[True] - AssertionError: out: rel err 0.3"]
    assert gpu_check.parse_pytest(lines) == [
        {"test": "tests/a.py::test_ok", "outcome": "PASSED", "message": ""},
        {"test": "tests/a.py::test_bad[True]", "outcome": "FAILED", "message": "AssertionError: out: rel err 0.3"},
        {"test": "tests/b.py::test_skip", "outcome": "SKIPPED", "message": ""}]


def fake_results():
    row = dict(mode="fwd", status="ok", detail="", repeats=5)
    return {
        "device": {"device_kind": "NVIDIA H200", "platform": "gpu", "device_count": 1, "jax_version": "0.10.2"},
        "budget_s": 480.0, "elapsed_s": 400.0, "plan": [],
        "sections": [{"name": "kernel tests", "status": "ok", "elapsed_s": 90.0, "cap_s": 150.0, "detail": "1 passed"},
                     {"name": "flash", "status": "capped", "elapsed_s": 110.0, "cap_s": 110.0, "detail": "killed"}],
        "tests": [{"test": "tests/kernels/test_flash_gpu.py::test_triton_lowering_on_gpu", "outcome": "PASSED",
                   "message": ""}],
        "rows": [
            dict(row, family="matmul", T=8192, path="jnp.matmul", baseline="jnp.matmul", median_s=1e-3, flops=1.1e12,
                 tflops=800.0, ratio=1.0),
            dict(row, family="flash", T=4096, path="attnjax/pallas", baseline="cudnn", median_s=2e-3, flops=8e11,
                 tflops=400.0, ratio=1.25),
            dict(row, family="flash", T=4096, path="cudnn", baseline="cudnn", median_s=1.6e-3, flops=8e11,
                 tflops=500.0, ratio=1.0),
            dict(row, family="flash", T=4096, path="pallas.ops/gpu", baseline="cudnn", status="error",
                 detail="ValueError: no", median_s=None, flops=8e11),
            dict(row, family="flash", T=16384, path="jax.nn/xla", baseline="cudnn", status="not run",
                 detail="needs 40.0 GiB", median_s=None, flops=1e13),
            dict(row, family="lightning", T=4096, path="lightning/pallas", baseline="lightning/xla", median_s=1e-3,
                 flops=None, tflops=None, ratio=0.5),
            dict(row, family="block_sparse", T=8192, path="block_sparse/pallas", baseline="flash/pallas",
                 median_s=1e-3, flops=2e11, density=0.15, tflops=200.0, ratio=0.2),
        ]}


def test_report_on_fake_rows():
    results = fake_results()
    assert json.loads(json.dumps(results)) == results
    md = gpu_check.markdown(results)
    assert "# Hardware check on NVIDIA H200 (gpu)" in md and "(800 TFLOP/s)" in md
    table_line = next(line for line in md.splitlines() if "| attnjax/pallas" in line)
    assert "2.000 ms" in table_line and "| 400 " in table_line and "| 50 " in table_line and "1.25" in table_line
    assert "error (ValueError: no)" in md and "not run (needs 40.0 GiB)" in md and "0.150" in md
    assert "test_triton_lowering_on_gpu | PASSED" in md and "capped" in md
    assert gpu_check.exit_code(results) == 0  # a third-party baseline's error is recorded, not fatal
    results["rows"][1].update(status="error")
    assert gpu_check.exit_code(results) == 1
    assert gpu_check.slug("NVIDIA H200 (SXM)") == "NVIDIA_H200_SXM"


@pytest.mark.slow
def test_write_report_json_markdown_and_plot(tmp_path):
    results = fake_results()
    written = gpu_check.write_report(results, tmp_path, "gpu_check_NVIDIA_H200")
    assert [p.name for p in written] == ["gpu_check_NVIDIA_H200.json", "gpu_check_NVIDIA_H200.md",
                                         "gpu_check_NVIDIA_H200.png"]
    assert json.loads(written[0].read_text()) == results
    assert written[1].read_text() == gpu_check.markdown(results)
    assert written[2].stat().st_size > 0
