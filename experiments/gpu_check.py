"""Hardware validation in one command (``make gpu-check`` / ``make tpu-check``): the kernels compiled for real.

On a machine with a GPU or TPU, in order, each section in its own process under a wall-clock cap (the
process group is killed at the cap; rows measured before it are kept), all within ``TOTAL_BUDGET_S``
(8 minutes on one H100/H200):

1. **kernel tests** (cap 140 s): every test under ``tests/`` that skips on CPU and runs on this platform,
   found by reading the ``pytest.mark.skipif`` conditions on ``jax.default_backend()`` (``kernel_tests``):
   real Triton (GPU) or Mosaic (TPU) compilation, forward and gradients against the references. Pytest
   runs them with ``JAX_PLATFORMS=""`` (the suite's conftest would otherwise pin the CPU) and the
   optimized XLA build (``JAX_DISABLE_MOST_OPTIMIZATIONS=0``).
2. **flash** (cap 130 s): causal softmax attention, B=2, H=16, D=128, bf16, T = 1k, 4k, 16k, forward and
   forward+backward: attnjax's Pallas kernel against ``jax.nn.dot_product_attention(implementation="cudnn")``
   (the GPU baseline), ``jax.experimental.pallas.ops.gpu.attention.mha`` (GPU) or
   ``jax.experimental.pallas.ops.tpu.flash_attention`` (TPU; the TPU baseline; given ``[B, H, T, D]`` inputs,
   its own layout) and ``jax.nn.dot_product_attention(implementation="xla")`` (timed only where its compiled
   peak memory fits ``MEMORY_BUDGET_GIB``). First, a square bf16 ``jnp.matmul`` (n = 8192) gives the
   device's measured peak rate in this run.
3. **lightning** (cap 55 s): Lightning Attention-2 (``decay="alibi"``), H=16, D=128, bf16, T = 4k, 16k:
   the Pallas kernel against the chunked ``xla`` path and, on GPU when ``fla`` imports,
   flash-linear-attention's ``chunk_simple_gla`` with the same per-head log decay (its baseline then; it
   runs in PyTorch, timed with ``torch.cuda.synchronize``).
4. **sparse** (cap 75 s): the block-sparse kernel on random causal lists (density 1/8 of the causal
   tiles, diagonal always listed; T = 8k, 16k) and 2-D neighbourhood attention (kernel 13, T = 4k, 16k
   on a square grid), each against the dense Pallas flash kernel with the same causality.

Times are medians of interleaved runs (``experiments.lib.measure.time_thunks``), compiled as in
``experiments.bench_softmax``; ratios are time / the group's baseline in the same run. TFLOP/s use
FlashAttention-2's count (``experiments.lib.flops.attention_flops``; sparse paths are credited the
density times the dense work of the tiles they visit); Lightning rows have no FLOP rate (its work is
not dense attention's), only times and ratios. Writes ``gpu_check_<device kind>.json/.md/.png`` under
``experiments/results/``. Exit status 1 when a kernel test fails or an attnjax path errors; failures
of third-party baselines (cuDNN, jax's Pallas ops, fla) are recorded, not fatal.

On a CPU-only machine it says that it needs an accelerator and exits 0. Needs jax with the
accelerator's plugin (e.g. ``pip install -U "jax[cuda12]"``).

    python -m experiments.gpu_check                    # whatever accelerator this machine has
    python -m experiments.gpu_check --require tpu      # make tpu-check
    python -m experiments.gpu_check --plan gpu         # print the plan for a GPU (runs nothing)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import attnjax
from attnjax import masks
from attnjax.local import NeighborhoodMask, neighborhood_attention
from attnjax.positional import alibi_slopes
from attnjax.sparse import allowed_blocks, block_sparse_attention, from_block_mask
from experiments import bench_linear, bench_softmax, bench_sparse
from experiments.bench import MatmulRates
from experiments.lib import flops, plots, report, workload
from experiments.lib.measure import GIB, memory_of, time_thunks

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: where pytest and the section processes run."""
PLATFORMS = ("gpu", "tpu")
TOTAL_BUDGET_S = 480.0
"""The whole check on one H100/H200: 8 minutes."""
OVERHEAD_S = 40.0
"""Kept out of the section caps: this process's start, the device probe, the report and the plot."""
MEMORY_BUDGET_GIB = 32.0
"""A path is timed only where its compiled peak memory (XLA's analysis) is below this."""
NEEDS_ACCELERATOR = ("gpu_check needs a GPU or TPU: the Pallas kernels compile for real only there "
                     "(found {found}). Nothing to do on this machine.")
MODES = workload.MODES
OURS = ("attnjax/pallas", bench_linear.PALLAS, bench_linear.LIGHTNING, "block_sparse/pallas", "neighborhood/pallas",
        "flash/pallas")
"""attnjax's own paths: an error in one of them fails the check (third-party baselines only get recorded)."""


# ------------------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class Bench:
    """One group of paths timed interleaved on the same inputs ``[batch, T, heads, head_dim]``.

    ``family``: "matmul" (a square ``T × T`` matmul), "flash", "lightning", "block_sparse" or
    "neighborhood". ``block``: the block-sparse tile (and, for neighbourhood attention, ``tile``
    its 2-D tile); ``density``: the target fraction of causal tiles listed; ``kernel``: the
    neighbourhood window per axis.
    """

    family: str
    T: int
    mode: str
    paths: tuple[str, ...]
    baseline: str
    batch: int = 2
    heads: int = 16
    head_dim: int = 128
    dtype: str = "bfloat16"
    causal: bool = True
    block: int = 0
    tile: tuple[int, ...] = ()
    density: float = 0.0
    kernel: int = 0
    repeats: int = 10
    max_seconds: float = 2.0


@dataclasses.dataclass(frozen=True)
class Section:
    """What one capped process runs: pytest node ids (``tests``) or benchmark groups (``benches``)."""

    name: str
    cap_s: float
    tests: tuple[str, ...] = ()
    benches: tuple[Bench, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict:
        """JSON-ready (tuples become lists); ``from_json`` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Section":
        """The section ``to_json`` wrote."""
        benches = tuple(Bench(**dict(b, paths=tuple(b["paths"]), tile=tuple(b["tile"]))) for b in data["benches"])
        return cls(name=data["name"], cap_s=data["cap_s"], tests=tuple(data["tests"]), benches=benches,
                   env=tuple(tuple(e) for e in data["env"]))


SECTION_CAPS = {"kernel tests": 140.0, "flash": 130.0, "lightning": 55.0, "sparse": 75.0}
"""Wall-clock cap of each section in seconds (the process is killed there)."""
SIZES = {"flash": (1024, 4096, 16384), "lightning": (4096, 16384), "block_sparse": (8192, 16384),
         "neighborhood": (4096, 16384), "matmul": (8192,)}
SMOKE_SIZES = {"flash": (256, 512), "lightning": (256, 512), "block_sparse": (512,), "neighborhood": (256,),
               "matmul": (1024,)}
SMOKE_SHAPE = dict(batch=1, heads=2, head_dim=64, repeats=2, max_seconds=0.5)


def flash_paths(platform: str) -> tuple[tuple[str, ...], str]:
    """The flash group's paths and its baseline on ``platform``."""
    if platform == "gpu":
        return ("attnjax/pallas", "cudnn", "pallas.ops/gpu", "jax.nn/xla"), "cudnn"
    return ("attnjax/pallas", "pallas.ops/tpu", "jax.nn/xla"), "pallas.ops/tpu"


def plan(platform: str, tests: Sequence[str], *, fla: bool = False, smoke: bool = False) -> tuple[Section, ...]:
    """The check for ``platform`` ("gpu" or "tpu"): the kernel tests, then the benchmark sections.

    Pure: ``tests`` are the pytest node ids to run (``kernel_tests``), ``fla`` whether
    flash-linear-attention imports (GPU only), ``smoke`` tiny sizes. Every group lists its
    smallest T first, forward before forward+backward, so a capped section keeps the cheap rows.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    sizes, shape = (SMOKE_SIZES, SMOKE_SHAPE) if smoke else (SIZES, {})
    cap = (lambda name: SECTION_CAPS[name] / 2) if smoke else SECTION_CAPS.get
    fpaths, fbase = flash_paths(platform)
    lightning = (bench_linear.PALLAS, bench_linear.LIGHTNING) + (("fla/chunk_simple_gla",) if fla and platform == "gpu"
                                                                   else ())
    block = 64 if platform == "gpu" else 128
    tile = (8, 8) if platform == "gpu" else (8, 16)

    def groups(family: str, paths: tuple[str, ...], baseline: str, **kw) -> tuple[Bench, ...]:
        return tuple(Bench(family, T, mode, paths, baseline, **{**shape, **kw})
                     for T in sizes[family] for mode in MODES)

    matmul = tuple(Bench("matmul", n, "fwd", ("jnp.matmul",), "jnp.matmul", **{**shape, "repeats": 5})
                   for n in sizes["matmul"])
    # fla runs in PyTorch beside jax: jax keeps half the device memory instead of 75%.
    torch_env = (("XLA_PYTHON_CLIENT_MEM_FRACTION", ".5"),) if len(lightning) > 2 else ()
    return (
        Section("kernel tests", cap("kernel tests"), tests=tuple(tests)),
        Section("flash", cap("flash"), benches=matmul + groups("flash", fpaths, fbase)),
        Section("lightning", cap("lightning"), benches=groups("lightning", lightning, lightning[-1]), env=torch_env),
        Section("sparse", cap("sparse"), benches=(
            groups("block_sparse", ("block_sparse/pallas", "flash/pallas"), "flash/pallas", block=block,
                   density=1 / 8)
            + groups("neighborhood", ("neighborhood/pallas", "flash/pallas"), "flash/pallas", causal=False,
                     tile=tile, kernel=13))),
    )


# ------------------------------------------------------------------------------ which tests skip on CPU


class _Backend:
    """Stands in for ``jax`` when evaluating a skip condition: ``default_backend()`` returns ``platform``."""

    def __init__(self, platform: str):
        self.platform = platform

    def default_backend(self) -> str:
        return self.platform


def _skip_conditions(decorators: Sequence[ast.expr]) -> list[ast.expr]:
    """The condition expressions of ``pytest.mark.skipif(cond, ...)`` among ``decorators``."""
    conds = []
    for d in decorators:
        if (isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "skipif"
                and d.args):
            conds.append(d.args[0])
    return conds


def _module_marks(tree: ast.Module) -> list[ast.expr]:
    """``pytestmark = <mark>`` or ``pytestmark = [<marks>]`` at module level."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            value = node.value
            return list(value.elts) if isinstance(value, (ast.List, ast.Tuple)) else [value]
    return []


def _skips(cond: ast.expr, platform: str) -> Optional[bool]:
    """Whether the condition skips on ``platform``; None when it does not depend on ``jax.default_backend()``
    alone (it names something else, or fails to evaluate)."""
    if "default_backend" not in ast.unparse(cond):
        return None
    try:
        return bool(eval(compile(ast.Expression(cond), "<skipif>", "eval"), {"__builtins__": {}},
                         {"jax": _Backend(platform)}))
    except Exception:  # noqa: BLE001 - a condition on anything else is not a platform skip
        return None


def accelerator_tests(sources: Mapping[str, str], platform: str) -> list[str]:
    """Pytest node ids of the tests in ``sources`` (path -> file text) that skip on CPU and run on ``platform``.

    A test qualifies when a ``skipif`` on ``jax.default_backend()`` (its own or the module's
    ``pytestmark``) skips it with the backend "cpu" and none skips it with ``platform``. Pure: the
    conditions are evaluated with a stand-in ``jax`` whose ``default_backend()`` returns the platform.
    """
    found = []
    for path, text in sorted(sources.items()):
        if "default_backend" not in text:  # nothing to evaluate: no need to parse it
            continue
        tree = ast.parse(text)
        module = _skip_conditions(_module_marks(tree))
        scopes = [(node, "") for node in tree.body]
        scopes += [(item, f"{node.name}::") for node in tree.body if isinstance(node, ast.ClassDef)
                   for item in node.body]
        for node, prefix in scopes:
            if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")):
                continue
            conds = module + _skip_conditions(node.decorator_list)
            on_cpu = [_skips(c, "cpu") for c in conds]
            on_platform = [_skips(c, platform) for c in conds]
            if any(on_cpu) and not any(on_platform):
                found.append(f"{path}::{prefix}{node.name}")
    return found


def kernel_tests(platform: str, tests_dir: Path = ROOT / "tests") -> list[str]:
    """``accelerator_tests`` over every ``test_*.py`` under ``tests_dir`` (paths relative to the repository)."""
    sources = {str(p.relative_to(tests_dir.parent)): p.read_text() for p in tests_dir.rglob("test_*.py")}
    return accelerator_tests(sources, platform)


# ------------------------------------------------------------------------------------ running, capped


@dataclasses.dataclass
class Completed:
    """A capped process: its exit code (None when killed at the cap), output lines and wall time."""

    returncode: Optional[int]
    lines: list[str]
    elapsed_s: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_capped(cmd: Sequence[str], cap_s: float, env: Mapping[str, str]) -> Completed:
    """Run ``cmd`` in its own process group, echoing its output; kill the group at ``cap_s`` seconds."""
    started = time.monotonic()
    proc = subprocess.Popen(list(cmd), cwd=ROOT, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: Optional[int] = proc.wait(timeout=cap_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    reader.join(timeout=5)
    return Completed(code, lines, time.monotonic() - started)


TEST_LINE = re.compile(r"^(\S+::\S+?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
SUMMARY_LINE = re.compile(r"^(FAILED|ERROR)\s+(\S+::\S+?)(?:\s+-\s+(.*))?$")


def parse_pytest(lines: Sequence[str]) -> list[dict]:
    """Per-test outcomes from ``pytest -v -rfE`` output: ``{"test", "outcome", "message"}``, in run order.

    Parametrized cases keep their ids; a failure's message comes from the short summary.
    """
    outcomes: dict[str, dict] = {}
    for line in lines:
        if m := TEST_LINE.match(line):
            outcomes.setdefault(m[1], {"test": m[1], "outcome": m[2], "message": ""})["outcome"] = m[2]
    for line in lines:
        if m := SUMMARY_LINE.match(line):
            row = outcomes.setdefault(m[2], {"test": m[2], "outcome": m[1], "message": ""})
            row["message"] = (m[3] or "")[:300]
    return list(outcomes.values())


def pytest_env(base: Mapping[str, str]) -> dict[str, str]:
    """The environment of the kernel tests: the accelerator visible (the suite's conftest pins
    ``JAX_PLATFORMS=cpu`` unless it is set; empty means jax's default, accelerator first) and the
    optimized XLA build."""
    return {**base, "JAX_PLATFORMS": "", "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}


def run_tests(section: Section, cap_s: float) -> dict:
    """Run the section's tests under pytest (``--runslow``, verbose) within ``cap_s``."""
    if not section.tests:
        return {"status": "ok", "elapsed_s": 0.0, "tests": [], "detail": "no test skips on CPU for this platform"}
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "--color=no", "-p", "no:cacheprovider", "--runslow",
           *section.tests]
    done = run_capped(cmd, cap_s, pytest_env(os.environ))
    tests = parse_pytest(done.lines)
    ran = {t["test"].split("[")[0] for t in tests}
    tests += [{"test": t, "outcome": "NOT RUN", "message": "section cap reached" if done.timed_out else ""}
              for t in section.tests if t not in ran]
    failed = [t for t in tests if t["outcome"] in ("FAILED", "ERROR")]
    skipped_all = bool(tests) and all(t["outcome"] == "SKIPPED" for t in tests)
    status = ("capped" if done.timed_out else "failed" if failed or skipped_all or done.returncode not in (0, 5)
              else "ok")
    detail = f"{sum(t['outcome'] == 'PASSED' for t in tests)} passed, {len(failed)} failed"
    if skipped_all:
        detail += ", every test skipped: pytest did not see the accelerator"
    elif done.timed_out:
        detail += f", killed at the {cap_s:.0f} s cap"
    elif status == "failed" and not failed:
        detail += f", pytest exited {done.returncode}: " + " | ".join(done.lines[-3:])
    return {"status": status, "elapsed_s": done.elapsed_s, "tests": tests, "detail": detail}


def run_bench_section(section: Section, cap_s: float, work_dir: Path) -> dict:
    """Run the section's groups in a child process (``--child``) within ``cap_s``; read back its rows."""
    spec, rows_file = work_dir / f"{slug(section.name)}.section.json", work_dir / f"{slug(section.name)}.rows.jsonl"
    spec.write_text(json.dumps(section.to_json()))
    rows_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "experiments.gpu_check", "--child", str(spec), "--rows", str(rows_file),
           "--deadline", repr(time.time() + cap_s)]
    done = run_capped(cmd, cap_s, {**os.environ, **dict(section.env)})
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    measured = {(r["family"], r["T"], r["mode"]) for r in rows}
    for b in section.benches:
        if (b.family, b.T, b.mode) not in measured:
            rows += [skipped_row(b, p, "section cap reached" if done.timed_out else "section process ended early")
                     for p in b.paths]
    if done.timed_out:
        status, detail = "capped", f"killed at the {cap_s:.0f} s cap"
    elif done.returncode != 0:
        status, detail = "failed", f"exited {done.returncode}: " + " | ".join(done.lines[-3:])
    else:
        status, detail = "ok", ""
    return {"status": status, "elapsed_s": done.elapsed_s, "rows": rows, "detail": detail}


# ------------------------------------------------------------------------------------- measuring (child)


@dataclasses.dataclass
class PathImpl:
    """One timed path: ``fn(q, k, v) -> out`` on inputs in ``layout`` ("BTHD" or "BHTD"), in jax; or a
    ``torch`` maker ``(q, k, v, mode) -> thunk`` for PyTorch kernels; ``density`` for sparse paths."""

    fn: Optional[Callable] = None
    layout: str = "BTHD"
    torch: Optional[Callable] = None
    density: Optional[float] = None


def _dense_flash(causal: bool) -> PathImpl:
    mask = masks.Causal() if causal else None
    return PathImpl(lambda q, k, v: attnjax.attention(q, k, v, mask=mask, implementation="pallas"))


def _pallas_ops_gpu(b: Bench) -> PathImpl:
    from jax.experimental.pallas.ops.gpu import attention as ops  # optional dependency: jax's own kernels

    return PathImpl(lambda q, k, v: ops.mha(q, k, v, segment_ids=None, sm_scale=b.head_dim ** -0.5, causal=b.causal))


def _pallas_ops_tpu(b: Bench) -> PathImpl:
    from jax.experimental.pallas.ops.tpu import flash_attention as ops  # optional dependency: jax's own kernels

    return PathImpl(lambda q, k, v: ops.flash_attention(q, k, v, causal=b.causal, sm_scale=b.head_dim ** -0.5),
                    layout="BHTD")


def _random_lists(b: Bench):
    """Causal block lists at about ``b.density`` of the causal tiles, the diagonal always listed, per head."""
    causal = allowed_blocks(masks.Causal(), b.T, b.T, b.block, b.block)
    n = causal.shape[-1]
    pick = np.random.default_rng(b.T).random((1, b.heads, n, n)) < b.density
    return from_block_mask((pick | np.eye(n, dtype=bool)) & causal, b.block, b.block)


def _block_sparse(b: Bench) -> PathImpl:
    lists, causal = _random_lists(b), masks.Causal()
    return PathImpl(lambda q, k, v: block_sparse_attention(q, k, v, lists, mask=causal, implementation="pallas"),
                    density=bench_sparse.relative_density(lists, causal=True))


def _neighborhood(b: Bench) -> PathImpl:
    grid = bench_sparse.grid_2d(b.T)
    lists = NeighborhoodMask(grid, b.kernel, tile_shape=b.tile).block_lists()
    return PathImpl(lambda q, k, v: neighborhood_attention(q, k, v, kernel_size=b.kernel, grid=grid, tile_shape=b.tile,
                                                           implementation="pallas"),
                    density=bench_sparse.relative_density(lists, causal=False))


def _fla(b: Bench) -> PathImpl:
    import torch  # optional dependency: flash-linear-attention runs in PyTorch
    from fla.ops.simple_gla import chunk_simple_gla  # optional dependency: flash-linear-attention

    log_decay = -np.asarray(alibi_slopes(b.heads), np.float32)  # Lightning: lambda_h = exp(-m_h)
    takes_gamma = "g_gamma" in inspect.signature(chunk_simple_gla).parameters

    def make(q, k, v, mode):
        def to_torch(x, grad):
            return torch.from_numpy(np.asarray(x, np.float32)).to("cuda", torch.bfloat16).requires_grad_(grad)

        grad = mode == "fwd_bwd"
        tq, tk, tv = (to_torch(x, grad) for x in (q, k, v))
        decay = torch.from_numpy(log_decay).cuda()
        gates = {"g_gamma": decay} if takes_gamma else {"g": decay.expand(b.batch, b.T, b.heads).contiguous()}

        def thunk():
            if grad:
                for t in (tq, tk, tv):
                    t.grad = None
                out, _ = chunk_simple_gla(tq, tk, tv, scale=b.head_dim ** -0.5, **gates)
                out.float().sum().backward()
            else:
                with torch.no_grad():
                    chunk_simple_gla(tq, tk, tv, scale=b.head_dim ** -0.5, **gates)
            torch.cuda.synchronize()

        return thunk

    return PathImpl(torch=make)


def path_impl(name: str, b: Bench) -> PathImpl:
    """The implementation of path ``name`` for group ``b`` (raises if it cannot be built here)."""
    if name in ("attnjax/pallas", "flash/pallas"):
        return _dense_flash(b.causal)
    if name == "cudnn":
        return PathImpl(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=b.causal,
                                                                     implementation="cudnn"))
    if name == "jax.nn/xla":
        return PathImpl(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=b.causal,
                                                                     implementation="xla"))
    if name == "pallas.ops/gpu":
        return _pallas_ops_gpu(b)
    if name == "pallas.ops/tpu":
        return _pallas_ops_tpu(b)
    if name in (bench_linear.PALLAS, bench_linear.LIGHTNING):
        return PathImpl(bench_linear.path_fns(chunk_size=64, with_pallas=True)[name])
    if name == "fla/chunk_simple_gla":
        return _fla(b)
    if name == "block_sparse/pallas":
        return _block_sparse(b)
    if name == "neighborhood/pallas":
        return _neighborhood(b)
    raise ValueError(f"unknown path {name!r}")


def group_flops(b: Bench, mode: str) -> Optional[float]:
    """Dense attention FLOPs of the group (FlashAttention-2's count), None for Lightning."""
    if b.family == "lightning":
        return None
    return flops.attention_flops(b.batch, b.heads, b.T, b.T, b.head_dim, causal=b.causal, mode=mode)


def skipped_row(b: Bench, path: str, why: str) -> dict:
    """A row for a path that was not measured."""
    return {"family": b.family, "T": b.T, "mode": b.mode, "path": path, "baseline": b.baseline, "status": "skipped",
            "detail": why, "median_s": None}


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:240] if str(e) else ''}"


def compiled_peak(compiled: jax.stages.Compiled) -> Optional[int]:
    """XLA's peak-memory estimate of a compiled function, or None where the backend gives no analysis."""
    try:
        return memory_of(compiled).peak
    except Exception:  # noqa: BLE001 - some plugins return no memory analysis: then the path just runs
        return None


def measure_matmul(b: Bench) -> list[dict]:
    """The measured peak: a square ``b.T × b.T`` matmul in the group's dtype (``experiments.bench.MatmulRates``)."""
    rate = MatmulRates(b.repeats, b.max_seconds).rate(2.0 * b.T ** 3, b.dtype)
    return [{"family": "matmul", "T": b.T, "mode": "fwd", "path": "jnp.matmul", "baseline": "jnp.matmul",
             "status": "ok", "median_s": rate["seconds"], "repeats": b.repeats, "flops": rate["flops"],
             "tflops": rate["flops_per_s"] / 1e12, "ratio": 1.0, "detail": f"n={rate['n']}, {b.dtype}"}]


def measure_group(b: Bench) -> list[dict]:
    """Build, compile (``bench_softmax.compile_path``), run once and then time every path of group ``b``;
    a path that fails at any step gets an ``error`` row and the others go on."""
    if b.family == "matmul":
        return measure_matmul(b)
    q, k, v = workload.random_qkv(jax.random.PRNGKey(b.T), b.batch, b.T, b.heads, b.head_dim, jnp.dtype(b.dtype))
    dense = group_flops(b, b.mode)
    rows, thunks = {}, {}
    for name in b.paths:
        row = {"family": b.family, "T": b.T, "mode": b.mode, "path": name, "baseline": b.baseline, "status": "ok",
               "detail": "", "median_s": None, "flops": dense}
        try:
            impl = path_impl(name, b)
            if impl.density is not None:
                row["density"] = impl.density
                row["flops"] = None if dense is None else dense * impl.density
            if impl.torch is not None:
                thunk = impl.torch(q, k, v, b.mode)
            else:
                xs = (q, k, v) if impl.layout == "BTHD" else tuple(x.swapaxes(1, 2) for x in (q, k, v))
                args = workload.mode_inputs(*xs, b.mode)
                compiled = bench_softmax.compile_path(impl.fn, b.mode, args)
                peak = compiled_peak(compiled)
                row["peak_bytes"] = peak
                if peak is not None and peak > MEMORY_BUDGET_GIB * GIB:
                    row.update(status="not run", detail=f"needs {report.format_bytes(peak)}")
                    rows[name] = row
                    continue
                thunk = (lambda c=compiled, a=args: c(*a))
            jax.block_until_ready(thunk())
            thunks[name] = thunk
        except Exception as e:  # noqa: BLE001 - one failing path must not stop the check
            row.update(status="error", detail=_error(e))
        rows[name] = row
    timings = time_thunks(thunks, repeats=b.repeats, warmup=0, max_seconds=b.max_seconds) if thunks else {}
    base = timings.get(b.baseline)
    for name, t in timings.items():
        row = rows[name]
        row.update(median_s=t.median_s, repeats=t.repeats,
                   ratio=t.median_s / base.median_s if base else None,
                   tflops=row["flops"] / t.median_s / 1e12 if row.get("flops") else None)
    return list(rows.values())


def run_child(spec: Path, rows_file: Path, deadline: float) -> None:
    """The section process: measure each group while the next one (predicted as 1.5x the slowest so far,
    plus 5 s to spare) ends before ``deadline`` (``time.time()`` seconds, set by the parent when it
    started this process, so its imports count), appending the rows to ``rows_file`` as it goes."""
    section = Section.from_json(json.loads(spec.read_text()))
    slowest = 0.0
    with rows_file.open("a") as out:
        for b in tqdm(section.benches, desc=section.name, unit="group"):
            if time.time() + 1.5 * slowest + 5.0 > deadline:
                rows = [skipped_row(b, p, "would pass the section cap") for p in b.paths]
            else:
                t0 = time.monotonic()
                rows = measure_group(b)
                slowest = max(slowest, time.monotonic() - t0)
            for row in rows:
                out.write(json.dumps(row) + "\n")
            out.flush()


# --------------------------------------------------------------------------------------------- the report


def slug(text: str) -> str:
    """``"NVIDIA H200"`` -> ``"NVIDIA_H200"``: a file-name-safe device kind."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "unknown"


def peak_rate(rows: Sequence[dict]) -> Optional[float]:
    """The measured matmul rate (TFLOP/s) of the run, if one was measured."""
    rates = [r["tflops"] for r in rows if r["family"] == "matmul" and r.get("tflops")]
    return max(rates) if rates else None


def _cell(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


FAMILY_TITLES = {"flash": "Flash attention (causal)", "lightning": "Lightning Attention-2",
                 "block_sparse": "Block-sparse kernel (random causal lists)",
                 "neighborhood": "Neighbourhood attention (2-D, not causal)"}


def markdown(results: dict) -> str:
    """The report: device, sections, kernel tests, then one table per benchmark family."""
    device, rows = results["device"], results["rows"]
    peak = peak_rate(rows)
    lines = [
        f"# Hardware check on {device['device_kind']} ({device['platform']})", "",
        f"jax {device['jax_version']}, {device['device_count']} device(s). Whole run {results['elapsed_s']:.0f} s "
        f"(budget {results['budget_s']:.0f} s). Times: medians of interleaved runs; *vs baseline*: time / the "
        "group's baseline time in the same run (below 1 is faster). TFLOP/s: FlashAttention-2's FLOP count "
        "(4·B·H·T²·D forward, halved when causal, ×3.5 forward+backward), sparse paths credited density × "
        "that; *% of matmul*: against a square bf16 `jnp.matmul` timed in this run"
        + (f" ({peak:.0f} TFLOP/s)." if peak else " (not measured)."), "",
        "## Sections", "",
        report.markdown_table(["section", "status", "seconds", "cap", "detail"],
                              [[s["name"], s["status"], f"{s['elapsed_s']:.0f}", f"{s['cap_s']:.0f}", s["detail"]]
                               for s in results["sections"]]), "",
    ]
    tests = results.get("tests", [])
    if tests:
        lines += ["## Kernel tests (skipped on CPU, compiled here)", "",
                  report.markdown_table(["test", "outcome", "message"],
                                        [[t["test"], t["outcome"], t["message"]] for t in tests]), ""]
    for family, title in FAMILY_TITLES.items():
        sel = [r for r in rows if r["family"] == family]
        if not sel:
            continue
        lines += [f"## {title}", "", f"Baseline: `{sel[0]['baseline']}`.", "",
                  report.markdown_table(
                      ["T", "mode", "path", "median", "TFLOP/s", "% of matmul", "vs baseline", "density", "status"],
                      [[r["T"], r["mode"].replace("_", "+"), r["path"],
                        "-" if r.get("median_s") is None else f"{r['median_s'] * 1e3:.3f} ms",
                        _cell(r.get("tflops"), ".3g"),
                        _cell(100 * r["tflops"] / peak if r.get("tflops") and peak else None, ".0f"),
                        _cell(r.get("ratio"), ".2f"), _cell(r.get("density"), ".3f"),
                        r["status"] + (f" ({r['detail']})" if r.get("detail") else "")] for r in sel]), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Optional[Path]:
    """Small multiples: a row per benchmark family, a column per mode; TFLOP/s vs T (Lightning: ms vs T)."""
    rows = [r for r in results["rows"] if r["family"] in FAMILY_TITLES and r.get("median_s")]
    families = [f for f in FAMILY_TITLES if any(r["family"] == f for r in rows)]
    if not families:
        return None
    plt = plots.plt
    peak = peak_rate(results["rows"])
    fig, axes = plt.subplots(len(families), len(MODES), figsize=(11, 3.6 * len(families)), squeeze=False)
    for axrow, family in zip(axes, families):
        mine = [r for r in rows if r["family"] == family]
        colors = {p: f"C{i % 10}" for i, p in enumerate(dict.fromkeys(r["path"] for r in mine))}
        rate = all(r.get("tflops") for r in mine)
        for ax, mode in zip(axrow, MODES):
            sel = [r for r in mine if r["mode"] == mode]
            ax.set(title=f"{FAMILY_TITLES[family]}, {mode.replace('_', '+')}", xlabel="T",
                   ylabel="TFLOP/s" if rate else "median ms")
            if not sel:
                ax.text(0.5, 0.5, "nothing timed", ha="center", va="center", transform=ax.transAxes)
                continue
            for p in dict.fromkeys(r["path"] for r in sel):
                pts = sorted((r["T"], r["tflops"] if rate else r["median_s"] * 1e3) for r in sel if r["path"] == p)
                ax.semilogx(*zip(*pts), "o-", color=colors[p], label=p)
            if rate and peak:
                ax.axhline(peak, color="k", ls=":", lw=0.8, label="bf16 matmul (measured)")
            plots.label_x(ax, sorted({r["T"] for r in sel}))
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"attnjax kernels on {results['device']['device_kind']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict, out: Path, name: str) -> list[Path]:
    """Write ``<out>/<name>.json`` and ``.md`` (and ``.png`` when something was timed); return the paths."""
    paths = [report.write_json(results, f"{name}.json", out), out / f"{name}.md"]
    paths[1].write_text(markdown(results))
    png = plot(results, out / f"{name}.png")
    return paths + ([png] if png else [])


def exit_code(results: dict) -> int:
    """1 when a kernel test failed, a section crashed, or an attnjax path errored; else 0."""
    bad_tests = any(t["outcome"] in ("FAILED", "ERROR") for t in results.get("tests", []))
    bad_sections = any(s["status"] == "failed" for s in results["sections"])
    bad_paths = any(r["status"] == "error" and r["path"] in OURS for r in results["rows"])
    return int(bad_tests or bad_sections or bad_paths)


# ------------------------------------------------------------------------------------------------ the CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--require", choices=PLATFORMS, default=None,
                   help="the accelerator this check is for (make gpu-check / tpu-check); default: whichever is here")
    p.add_argument("--plan", choices=PLATFORMS, default=None, help="print the plan for this platform and exit")
    p.add_argument("--sections", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated subset of {list(SECTION_CAPS)}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and half caps: checks the command itself")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="output directory")
    p.add_argument("--name", default=None, help="output file stem (default gpu_check_<device kind>)")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fla_available() -> bool:
    """Whether flash-linear-attention (and PyTorch) can be imported, without importing them."""
    return all(importlib.util.find_spec(m) is not None for m in ("fla", "torch"))


def describe(sections: Sequence[Section]) -> str:
    """The plan in words: one line per section, then its tests or groups."""
    lines = []
    for s in sections:
        lines.append(f"{s.name} (cap {s.cap_s:.0f} s)")
        lines += [f"  {t}" for t in s.tests]
        lines += [f"  {b.family} T={b.T} {b.mode} B={b.batch} H={b.heads} D={b.head_dim} {b.dtype}: "
                  f"{', '.join(b.paths)} (baseline {b.baseline})" for b in s.benches]
    return "\n".join(lines)


PROBE = ("import json, jax; from experiments.lib import host; "
         "print(json.dumps(dict(host.device_info(), backend=jax.default_backend())))")
"""Run in a child process: what accelerator this machine has (a TPU admits one process at a time, so the
checking process itself never opens it)."""


def probe_device() -> dict:
    """``host.device_info()`` plus ``"backend"`` (``jax.default_backend()``), read in a child process; with
    ``JAX_PLATFORMS=cpu`` (nothing else can be visible) no child is needed."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return {"backend": "cpu"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"backend": "unknown", "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check (or a section process, or print a plan); returns the exit status."""
    args = parse_args(argv)
    if args.child is not None:
        run_child(args.child, args.rows, args.deadline)
        return 0
    if args.plan is not None:
        print(describe(plan(args.plan, kernel_tests(args.plan), fla=fla_available(), smoke=args.smoke)))
        return 0
    started = time.monotonic()
    device = probe_device()
    platform = device["backend"]
    if "error" in device:
        print(f"gpu_check could not start jax to look for an accelerator: {device['error']}")
        return 1
    if platform not in PLATFORMS or (args.require and platform != args.require):
        print(NEEDS_ACCELERATOR.format(found=platform if not args.require
                                       else f"{platform}, and this check is for {args.require}"))
        return 0
    sections = plan(platform, kernel_tests(platform), fla=fla_available(), smoke=args.smoke)
    if args.sections:
        unknown = set(args.sections) - set(SECTION_CAPS)
        if unknown:
            raise SystemExit(f"unknown --sections {sorted(unknown)}; choose from {list(SECTION_CAPS)}")
        sections = tuple(s for s in sections if s.name in args.sections)
    name = args.name or f"gpu_check_{slug(device['device_kind'])}" + ("_smoke" if args.smoke else "")
    out = report.SMOKE_DIR if args.smoke and args.out == report.RESULTS_DIR else args.out
    out.mkdir(parents=True, exist_ok=True)
    print(describe(sections), flush=True)
    results = {"device": device, "budget_s": TOTAL_BUDGET_S, "plan": [s.to_json() for s in sections],
               "sections": [], "tests": [], "rows": []}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work_dir:
        for section in sections:
            cap = min(section.cap_s, TOTAL_BUDGET_S - OVERHEAD_S - (time.monotonic() - started))
            if cap <= 5:
                results["sections"].append({"name": section.name, "status": "skipped", "elapsed_s": 0.0,
                                            "cap_s": max(cap, 0.0), "detail": "the total budget is spent"})
                continue
            print(f"\n=== {section.name} (cap {cap:.0f} s) ===", flush=True)
            outcome = (run_bench_section(section, cap, Path(work_dir)) if section.benches
                       else run_tests(section, cap))
            results["tests"] += outcome.pop("tests", [])
            results["rows"] += outcome.pop("rows", [])
            results["sections"].append({"name": section.name, "cap_s": cap, **outcome})
    results["elapsed_s"] = time.monotonic() - started
    written = write_report(results, out, name)
    print("\n" + markdown(results))
    print("wrote " + ", ".join(str(p) for p in written))
    return exit_code(results)


if __name__ == "__main__":
    raise SystemExit(main())
