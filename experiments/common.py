"""Shared helpers for experiments: compile, time, estimate memory, write results, print tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import registry

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GIB = 2 ** 30
MODES = ("fwd", "fwd_bwd")
ACCELERATORS = ("gpu", "tpu")
"""Backends where Pallas kernels compile for real (on CPU they only run in interpret mode)."""
"""What is timed: the forward, or the forward and the gradients wrt q, k, v."""


@dataclasses.dataclass(frozen=True)
class Memory:
    """XLA's compiled memory analysis of one function, in bytes.

    ``peak`` = arguments + outputs + temporaries - aliased buffers; ``extra`` = temporaries, the
    memory the computation needs beyond its inputs and outputs.
    """

    argument: int
    output: int
    temp: int
    alias: int

    @property
    def peak(self) -> int:
        return self.argument + self.output + self.temp - self.alias

    @property
    def extra(self) -> int:
        return self.temp

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), peak=self.peak, extra=self.extra)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median wall time of ``repeats`` runs after warmup, in seconds."""

    median_s: float
    repeats: int


def selected_entries(names: Optional[Sequence[str]]) -> list[registry.Entry]:
    """``attnjax.registry`` entries by name, in registry order (all of them when ``names`` is None)."""
    entries = registry.entries()
    if names is None:
        return entries
    unknown = set(names) - {e.name for e in entries}
    if unknown:
        raise SystemExit(f"unknown mechanisms {sorted(unknown)}; registered: {[e.name for e in entries]}")
    return [e for e in entries if e.name in names]


def compile_fn(fn: Callable, *args) -> jax.stages.Compiled:
    """``jax.jit(fn)`` lowered and compiled for ``args``; compiling allocates nothing."""
    return jax.jit(fn).lower(*args).compile()


def memory_of(compiled: jax.stages.Compiled) -> Memory:
    """The compiled executable's memory analysis (no run needed)."""
    m = compiled.memory_analysis()
    return Memory(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                  temp=m.temp_size_in_bytes, alias=m.alias_size_in_bytes)


def time_thunks(thunks: Mapping[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1,
                max_seconds: Optional[float] = None) -> dict[str, Timing]:
    """Median time of each zero-argument function, interleaved round by round.

    Interleaving spreads background load evenly over the functions, so their ratios are fairer
    than back-to-back loops. After ``warmup`` rounds, up to ``repeats`` timed rounds run; rounds
    stop early (at least one is kept) once the timed rounds pass ``max_seconds`` in total.
    """
    for _ in range(warmup):
        for thunk in thunks.values():
            jax.block_until_ready(thunk())
    samples: dict[str, list[float]] = {name: [] for name in thunks}
    start = time.perf_counter()
    for _ in range(max(repeats, 1)):
        for name, thunk in thunks.items():
            t0 = time.perf_counter()
            jax.block_until_ready(thunk())
            samples[name].append(time.perf_counter() - t0)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return {name: Timing(statistics.median(s), len(s)) for name, s in samples.items()}


def time_fn(fn: Callable, *args, repeats: int = 5, warmup: int = 1,
            max_seconds: Optional[float] = None) -> Timing:
    """Median time of the jitted ``fn(*args)``, compile excluded."""
    compiled = compile_fn(fn, *args)
    return time_thunks({"fn": lambda: compiled(*args)}, repeats=repeats, warmup=warmup,
                       max_seconds=max_seconds)["fn"]


def random_qkv(key: jax.Array, batch: int, seq_len: int, heads: int, head_dim: int,
               dtype=jnp.float32, *, kv_len: Optional[int] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Standard-normal q ``[batch, seq_len, heads, head_dim]`` and k, v ``[batch, kv_len, heads, head_dim]``.

    ``kv_len`` defaults to ``seq_len`` (self-attention); another value gives cross-attention inputs.
    """
    kv_len = seq_len if kv_len is None else kv_len
    shapes = [(batch, n, heads, head_dim) for n in (seq_len, kv_len, kv_len)]
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype)
                 for k, shape in zip(jax.random.split(key, 3), shapes))


def host_random_qkv(seed: int, batch: int, seq_len: int, heads: int, head_dim: int, dtype=jnp.float32, *,
                    kv_len: Optional[int] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Like ``random_qkv``, but drawn on the host with numpy from an integer ``seed``.

    ``jax.random`` compiles a kernel for every new shape; harnesses that visit many shapes (CAB,
    the main job) save those compilations this way.
    """
    kv_len = seq_len if kv_len is None else kv_len
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, n, heads, head_dim), np.float32).astype(jnp.dtype(dtype)))
                 for n in (seq_len, kv_len, kv_len))


def grad_fn(fn: Callable) -> Callable:
    """``(q, k, v, w) -> (dq, dk, dv)``: the gradients of ``sum(fn(q, k, v) * w)``."""

    def loss(q, k, v, w):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    return jax.grad(loss, argnums=(0, 1, 2))


def mode_fn(fn: Callable, mode: str) -> Callable:
    """``fn`` itself for ``"fwd"``; its ``grad_fn`` for ``"fwd_bwd"``."""
    return fn if mode == "fwd" else grad_fn(fn)


def mode_inputs(q: jax.Array, k: jax.Array, v: jax.Array, mode: str) -> tuple:
    """Arguments of ``mode_fn``: ``(q, k, v)``, plus a float32 cotangent ``w`` of ones for ``"fwd_bwd"``."""
    return (q, k, v) if mode == "fwd" else (q, k, v, jnp.ones(q.shape, jnp.float32))


TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}
"""Pass bound on ``relative_error`` (max|actual - reference| / max|reference|) per input dtype."""


def relative_error(actual, expected) -> float:
    """``max|actual - expected| / max|expected|`` as a float (non-finite ``actual`` gives ``inf``)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


FWD_BWD_FLOP_FACTOR = 3.5
"""Forward+backward FLOPs over forward FLOPs, FlashAttention-2's benchmark convention: the backward
is 2.5x the forward (5 matmuls against 2: the recomputed ``QK^T``, ``dV``, ``dP``, ``dQ``, ``dK``)."""


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, *, causal: bool,
                    mode: str = "fwd", head_dim_v: Optional[int] = None) -> float:
    """Useful FLOPs of dense softmax attention (Dao 2023, FlashAttention-2, section 4.1).

    Forward: ``2·B·H·T·S·D`` for ``QK^T`` plus ``2·B·H·T·S·Dv`` for ``PV``, i.e. ``4·B·H·T·S·D`` when
    ``Dv = D``; halved for a causal mask (the work above the diagonal is not useful). ``"fwd_bwd"``
    multiplies by ``FWD_BWD_FLOP_FACTOR``. For a subquadratic mechanism this is its *dense-equivalent*
    work, so its achieved rate can exceed the hardware's.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    flops = 2.0 * batch * heads * q_len * kv_len * (head_dim + head_dim_v)
    flops = flops / 2 if causal else flops
    return flops * FWD_BWD_FLOP_FACTOR if mode == "fwd_bwd" else flops


def matmul_for_flops(flops: float, dtype=jnp.float32) -> tuple[Callable, tuple, float]:
    """A square ``jnp.matmul`` with about ``flops`` FLOPs: ``(fn, (a, b), exact FLOPs = 2·n³)``.

    The reference rate: a plain matmul of the same work on the same device.
    """
    n = max(1, round((flops / 2) ** (1 / 3)))
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32).astype(jnp.dtype(dtype))) for _ in range(2))
    return jnp.matmul, (a, b), 2.0 * n ** 3


def machine_load() -> dict:
    """The 1, 5 and 15 minute load averages next to the CPU count: how busy the host was."""
    one, five, fifteen = os.getloadavg()
    return {"load_1m": one, "load_5m": five, "load_15m": fifteen, "cpu_count": os.cpu_count()}


def load_note(before: dict, after: dict) -> str:
    """One markdown line saying how loaded the host was before and after a measurement."""
    return (f"Host load average (1 min) {before['load_1m']:.1f} before and {after['load_1m']:.1f} after the run, "
            f"on {after['cpu_count']} CPUs (other jobs shared the machine: compare ratios measured in one run, "
            "not absolute times).")


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def benchmark_parser(doc: str, seq_lens: Sequence[int], *, heads: int = 8, head_dim: int = 64
                     ) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark shares: ``--seq-lens``, ``--batch``, ``--heads``, ``--head-dim``,
    ``--dtype``. Add the benchmark's own flags, then ``add_output_flags`` and ``parse_benchmark_args``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=parse_ints, default=list(seq_lens),
                   help="comma-separated sequence lengths (1k = 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--head-dim", type=int, default=head_dim)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def add_pallas_flag(p: argparse.ArgumentParser, what: str) -> None:
    """``--with-pallas/--no-with-pallas``: time ``what`` too; by default only on GPU/TPU."""
    p.add_argument("--with-pallas", action=argparse.BooleanOptionalAction, default=None,
                   help=f"also time {what} (default: on GPU/TPU only; on CPU Pallas runs in interpret mode, "
                        "which is meaningless to time)")


def add_output_flags(p: argparse.ArgumentParser, stem: str) -> None:
    """``--out``, ``--name`` (default ``<stem>_<backend>``) and ``--smoke``."""
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output directory")
    p.add_argument("--name", default=f"{stem}_{jax.default_backend()}", help="output file stem")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a _smoke file stem: checks it runs")


def parse_benchmark_args(p: argparse.ArgumentParser, argv: Optional[Sequence[str]], smoke: Mapping[str, Any]
                         ) -> argparse.Namespace:
    """Parse; under ``--smoke`` the ``smoke`` defaults apply (explicit flags still win) and the stem gets
    ``_smoke``; an unset ``--with-pallas`` becomes "on GPU/TPU only"."""
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**smoke, name=f"{args.name}_smoke")
        args = p.parse_args(argv)
    if getattr(args, "with_pallas", False) is None:
        args.with_pallas = jax.default_backend() in ACCELERATORS
    return args


def save_benchmark(results: dict, report: str, args, plot: Callable[[Path], Any]) -> None:
    """Write ``<out>/<name>.json`` (``results``), ``.md`` (``report``) and ``.png`` (``plot(path)``)."""
    out = Path(args.out)
    write_json(results, f"{args.name}.json", out)
    (out / f"{args.name}.md").write_text(report)
    plot(out / f"{args.name}.png")
    print(f"wrote {out / args.name}.{{json,md,png}}")


def finish_figure(fig, axes, xs: Sequence[int], title: str, path: Path) -> Path:
    """Label each axis at the lengths ``xs``, add grids and legends and the title, save to ``path``, close."""
    for ax in axes:
        label_x(ax, xs)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def label_x(ax, xs: Sequence[int]) -> None:
    """Label a log-scale x axis at exactly ``xs`` (the measured lengths), with no minor ticks."""
    ax.set_xticks(list(xs), [str(x) for x in xs])
    ax.set_xticks([], minor=True)


def jsonable_args(args) -> dict:
    """An argparse namespace as a JSON-ready dict (paths become strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def device_info() -> dict:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    return {"device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "jax_version": jax.__version__}


def write_json(data: Any, name: str, out_dir: Path = RESULTS_DIR) -> Path:
    """Write ``data`` to ``out_dir/name`` (indented JSON) and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table whose columns are padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    units = ("B", "KiB", "MiB", "GiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.1f} {units[i]}"


def parse_ints(text: str) -> list[int]:
    """``"1k,2048"`` -> ``[1024, 2048]`` (``k`` means 1024)."""
    return [int(float(t[:-1]) * 1024) if t.lower().endswith("k") else int(t) for t in text.split(",") if t]
