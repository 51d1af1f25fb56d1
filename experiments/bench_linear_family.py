"""The linear family of issue 17: time vs T of each fast path against blocked softmax, as log-log slopes.

In one run, for each sequence length T, forward and forward+backward (gradients of ``sum(out * w)`` wrt q, k, v),
inputs q, k, v ``[B, T, H, D]``:

- ``flow`` / ``flow causal``: ``attnjax.linear.flow.flow_attention`` (Flowformer; non-causal right product first,
  causal by prefix sums and the chunked scan);
- ``inline``: ``attnjax.linear.inline.inline_attention`` (InLine, identity map, right product with the mean
  correction);
- ``rala``: ``attnjax.linear.rala.rala`` with RAVLT's 2-D rotary tables on the ``T/W × W`` map;
- ``kernelized_rpe`` / ``kernelized_rpe causal``: ``attnjax.linear.kernelized_rpe.kernelized_rpe_attention``
  (PRF features, a random relative bias ``[H, 2T − 1]``, the Toeplitz product by FFT: O(T log T));
- on the ``T/W × W`` token map (``--image-width`` W): ``agent`` (``attnjax.vision.agent.agent_attention`` with
  ``agent_tokens`` pooled to ``p × p``), ``slab`` (``attnjax.vision.slab.simplified_linear_attention``, 5 × 5
  value convolution), ``l2vit`` (``attnjax.vision.l2vit.linear_global_attention``);
- ``channel_group``: ``attnjax.vision.channel_attention.channel_group_attention`` (DaViT; the H heads are the
  channel groups of D channels, the T tokens the positions);
- ``scatterformer``: ``attnjax.vision.scatterformer.scatterformer_attention``, T voxels at random distinct cells of
  ``--voxel-grid``, windows of ``--voxel-window`` × the grid's depth (the layer's defaults);
- the baselines ``softmax/xla`` and ``softmax/xla causal``: ``attnjax.attention(q, k, v, implementation="xla")``
  (blocked, O(T²) time), without and with ``masks.Causal()``; each causal path is compared with the causal one.

Every fast path is fitted a log-log slope of time vs T (least squares of log time on log T) per mode, over every
timed T and over ``T >= --slope-min-len``. The issue's targets: slope at most 1.15 for the linear paths, 1.25 for
the FFT ones (softmax: about 2). A path is timed at the next T only while its predicted single-run time (its
warm-up time at the last T × (T / last T)^order, order 2 for softmax, 1 otherwise) fits ``--time-budget-s``; peak
memory (XLA's compiled memory analysis) is reported at every T. Within a mode, every (path, T) is timed
interleaved, round by round, so that a change in the host's load shifts all lengths alike rather than the slopes;
a (path, T) leaves the rounds after ``--repeats`` runs or ``--max-seconds`` of its own runs, so fast paths get
their repeats while softmax at large T runs once.

Every timed run also records the process's CPU time (all threads; on a host shared with other jobs it is less
disturbed than the wall time, which the main tables use) and its minor page faults (``getrusage``), reported per
run: glibc serves an
allocation of 32 MiB or more (its largest dynamic mmap threshold) with a fresh ``mmap`` and unmaps it when freed,
so once a compiled program's temporaries pass 32 MiB, every run first-touches them again (one fault per 4 KiB).
That cost is linear in the temporaries, but it starts at some T between 1k and 16k and so steepens a slope fitted
over that range; the column shows where it starts for each path.

    python -m experiments.bench_linear_family --seq-lens 1k,2k,4k,8k,16k
    python -m experiments.bench_linear_family --paths rala,l2vit --modes fwd --name bench_linear_family_cpu_rala
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import resource
import time
import statistics
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import attnjax
from attnjax import masks
from attnjax.linear.flow import flow_attention
from attnjax.linear.inline import inline_attention
from attnjax.linear.kernelized_rpe import kernelized_rpe_attention
from attnjax.linear.rala import rala, rala_rotary
from attnjax.vision.agent import agent_attention, agent_tokens
from attnjax.vision.channel_attention import channel_group_attention
from attnjax.vision.l2vit import linear_global_attention
from attnjax.vision.scatterformer import scatterformer_attention
from attnjax.vision.slab import simplified_linear_attention
from experiments.lib import cli, host, plots, report, workload
from experiments.lib.measure import GIB, compile_fn, memory_of, time_thunks
from experiments.lib.slopes import extrapolate, fitted_line, format_fit, path_slopes

MODES = workload.MODES
LINEAR, FFT, SOFTMAX = "linear", "fft", "softmax"
TARGET_SLOPE = {LINEAR: 1.15, FFT: 1.25}
"""The issue's bound on each kind of fast path's log-log slope (softmax has none: about 2)."""
ORDER = {LINEAR: 1, FFT: 1, SOFTMAX: 2}
"""Expected growth exponent of each kind's time in T, used only to predict whether the next T fits the budget."""
SOFTMAX_XLA, SOFTMAX_CAUSAL = "softmax/xla", "softmax/xla causal"
SLAB_KERNEL = 5
"""SLAB's value convolution is 5 × 5 (official ``SimplifiedLinearAttention``)."""

SMOKE = {"seq_lens": [256, 512], "heads": 2, "head_dim": 16, "repeats": 1, "max_seconds": 1.0,
         "slope_min_len": 256, "image_width": 16, "agent_pool": 3, "voxel_grid": [32, 32, 4], "voxel_window": 4}
"""``--smoke`` defaults: tiny sizes that check the benchmark runs, in seconds (explicit flags still win)."""


PATHS = ("flow", "flow causal", "inline", "rala", "kernelized_rpe", "kernelized_rpe causal", "agent", "channel_group",
         "slab", "l2vit", "scatterformer", SOFTMAX_XLA, SOFTMAX_CAUSAL)
"""Every path ``path_fns`` builds, in its order (``--paths`` picks some)."""


@dataclasses.dataclass(frozen=True)
class BenchPath:
    """One timed path: ``fn(q, k, v, extra) -> out`` on ``[B, T, H, D]``, its kind (``LINEAR``, ``FFT``,
    ``SOFTMAX``), and whether it is causal (then compared with ``SOFTMAX_CAUSAL``, else with ``SOFTMAX_XLA``).

    ``extra``: the op's other array inputs (a bias, a kernel, coordinates), passed to the compiled program as
    arguments, so that XLA cannot fold work on them (a sort of the voxel windows, the FFT of the bias) into
    compile time; not differentiated.
    """

    fn: Callable
    kind: str
    causal: bool = False
    extra: Any = ()

    @property
    def baseline(self) -> str:
        """The softmax path this one is compared with."""
        return SOFTMAX_CAUSAL if self.causal else SOFTMAX_XLA


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = cli.benchmark_parser(__doc__, [1024, 2048, 4096, 8192, 16384], heads=4, head_dim=64)
    p.add_argument("--image-width", type=int, default=32, help="W: the image ops see T tokens as a T/W x W map")
    p.add_argument("--chunk-size", type=int, default=64, help="chunk of the causal Flow-Attention scan")
    p.add_argument("--agent-pool", type=int, default=7, help="agent attention pools the queries to p x p agents "
                                                              "(49 in the paper's Agent-PVT/Swin)")
    p.add_argument("--voxel-grid", type=cli.parse_ints, default=[468, 468, 32],
                   help="ScatterFormer's voxel grid X,Y,Z (Waymo's, the layer's docstring example)")
    p.add_argument("--voxel-window", type=int, default=12, help="ScatterFormer's window side in x and y (Waymo: 12)")
    p.add_argument("--modes", type=lambda text: text.split(","), default=list(MODES),
                   help=f"comma-separated modes to time, of {','.join(MODES)}")
    p.add_argument("--paths", type=lambda text: text.split(","), default=None,
                   help="comma-separated paths to time (default: all; e.g. 'rala,l2vit,softmax/xla'); the ratio to "
                        "softmax needs its baseline among them")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="a path stops repeating once its timed runs at one (T, mode) pass this many seconds")
    p.add_argument("--time-budget-s", type=float, default=60.0,
                   help="time a path at T only if its predicted single-run time is below this")
    p.add_argument("--slope-min-len", type=int, default=4096,
                   help="also fit the slope over T >= this, where fixed overheads matter less")
    cli.add_output_flags(p, "bench_linear_family")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    if not args.modes or set(args.modes) - set(MODES):
        p.error(f"--modes must be some of {','.join(MODES)}, got {','.join(args.modes)}")
    if args.paths is not None and (not args.paths or set(args.paths) - set(PATHS)):
        p.error(f"--paths must be some of {','.join(PATHS)}, got {','.join(args.paths)}")
    bad = [t for t in args.seq_lens if t % args.image_width or t // args.image_width < args.agent_pool]
    if bad:
        p.error(f"every T must be a multiple of --image-width {args.image_width} with at least --agent-pool "
                f"{args.agent_pool} rows; not {bad}")
    if len(args.voxel_grid) != 3 or max(args.seq_lens) > int(np.prod(args.voxel_grid)):
        p.error(f"--voxel-grid must be X,Y,Z with at least max(T) = {max(args.seq_lens)} cells, got {args.voxel_grid}")
    return args


def random_voxels(seq_len: int, batch: int, grid: Sequence[int]) -> jax.Array:
    """int32 ``[batch, seq_len, 3]``: distinct random cells of ``grid`` per row (seeded by ``seq_len``)."""
    rng = np.random.default_rng(seq_len)
    cells = np.stack([rng.choice(int(np.prod(grid)), seq_len, replace=False) for _ in range(batch)])
    return jnp.asarray(np.stack(np.unravel_index(cells, tuple(grid)), axis=-1), jnp.int32)


def path_fns(seq_len: int, args: argparse.Namespace) -> dict[str, BenchPath]:
    """Every benchmarked path at one length; fixed inputs other than q, k, v (biases, kernels, coordinates,
    rotary tables) are drawn here, seeded by ``seq_len``."""
    H, D, W = args.heads, args.head_dim, args.image_width
    rows = seq_len // W
    rng = np.random.default_rng(seq_len)
    rpe_bias = jnp.asarray(0.1 * rng.standard_normal((H, 2 * seq_len - 1)), jnp.float32)
    dwc_kernel = jnp.asarray(rng.standard_normal((SLAB_KERNEL, SLAB_KERNEL, 1, D)) / SLAB_KERNEL, jnp.float32)
    rotary = rala_rotary(rows, W, D)
    coords = random_voxels(seq_len, args.batch, args.voxel_grid)
    window = (args.voxel_window, args.voxel_window, args.voxel_grid[2])

    def image(op: Callable) -> Callable:
        def fn(q, k, v, extra):
            B = q.shape[0]
            out = op(*(a.reshape(B, rows, W, H, a.shape[-1]) for a in (q, k, v)), extra)
            return out.reshape(B, seq_len, H, -1)
        return fn

    def agent(q, k, v, _):
        agents = agent_tokens(q.reshape(q.shape[0], rows, W, H, D), args.agent_pool)
        return agent_attention(q, k, v, agents, implementation="xla")

    def plain(op: Callable) -> Callable:
        return lambda q, k, v, _: op(q, k, v)

    causal = masks.Causal()
    return {
        "flow": BenchPath(plain(functools.partial(flow_attention, implementation="xla")), LINEAR),
        "flow causal": BenchPath(plain(functools.partial(flow_attention, causal=True, chunk_size=args.chunk_size,
                                                         implementation="xla")), LINEAR, causal=True),
        "inline": BenchPath(plain(functools.partial(inline_attention, implementation="xla")), LINEAR),
        "rala": BenchPath(lambda q, k, v, tables: rala(q, k, v, rotary=tables, implementation="xla"), LINEAR,
                          extra=rotary),
        "kernelized_rpe": BenchPath(kernelized_rpe_attention, FFT, extra=rpe_bias),
        "kernelized_rpe causal": BenchPath(functools.partial(kernelized_rpe_attention, causal=True), FFT, causal=True,
                                           extra=rpe_bias),
        "agent": BenchPath(agent, LINEAR),
        "channel_group": BenchPath(plain(functools.partial(channel_group_attention, implementation="xla")), LINEAR),
        "slab": BenchPath(image(functools.partial(simplified_linear_attention, implementation="xla")), LINEAR,
                          extra=dwc_kernel),
        "l2vit": BenchPath(image(lambda q, k, v, _: linear_global_attention(q, k, v, implementation="xla")), LINEAR),
        "scatterformer": BenchPath(lambda q, k, v, cells: scatterformer_attention(q, k, v, cells, None, window,
                                                                                  implementation="xla"),
                                   LINEAR, extra=coords),
        SOFTMAX_XLA: BenchPath(plain(functools.partial(attnjax.attention, implementation="xla")), SOFTMAX),
        SOFTMAX_CAUSAL: BenchPath(plain(functools.partial(attnjax.attention, mask=causal, implementation="xla")),
                                  SOFTMAX, causal=True),
    }


def program(path: BenchPath, mode: str) -> Callable:
    """``(extra, *inputs) -> outputs``: the path's ``workload.mode_fn`` (forward, or gradients wrt q, k, v) with its
    extra inputs as a leading argument."""
    return lambda extra, *xs: workload.mode_fn(lambda q, k, v: path.fn(q, k, v, extra), mode)(*xs)


def counting_faults(thunk: Callable, faults: list[int], cpu: list[float]) -> Callable:
    """``thunk`` run to completion, appending the process's minor page faults during the run to ``faults`` and its
    CPU time (seconds, all threads) to ``cpu``."""
    def run():
        before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        out = jax.block_until_ready(thunk())
        cpu.append(time.process_time() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return out
    return run


def time_each_path(thunks: Mapping[Hashable, Callable], repeats: int, max_seconds: float
                   ) -> tuple[dict[Hashable, list[float]], dict[Hashable, list[int]], dict[Hashable, list[float]]]:
    """Timed runs (seconds) of each warmed-up thunk, interleaved round by round (``measure.time_thunks``, one round
    at a time), and the minor page faults and CPU seconds of each run.

    Each round runs the thunks that have fewer than ``repeats`` runs and less than ``max_seconds`` of timed runs, so
    a slow thunk stops early without cutting the repeats of the fast ones; every thunk runs at least once.
    """
    samples: dict[Hashable, list[float]] = {key: [] for key in thunks}
    faults: dict[Hashable, list[int]] = {key: [] for key in thunks}
    cpu: dict[Hashable, list[float]] = {key: [] for key in thunks}
    counted = {key: counting_faults(thunk, faults[key], cpu[key]) for key, thunk in thunks.items()}
    while True:
        active = {key: thunk for key, thunk in counted.items()
                  if not samples[key] or (len(samples[key]) < repeats and sum(samples[key]) < max_seconds)}
        if not active:
            return samples, faults, cpu
        for key, t in time_thunks(active, repeats=1, warmup=0).items():
            samples[key].append(t.median_s)


def measure_mode(mode: str, args: argparse.Namespace) -> list[dict]:
    """Every path at every length in one mode: compiled memory everywhere, then the times, interleaved over all
    lengths and paths at once (so a change of the host's load shifts every T alike, not the slope).

    Lengths go up one at a time: compile each path, and run it once (the warm-up, whose time predicts the next
    length's: a path whose predicted single run exceeds ``--time-budget-s`` is not run there). Then the rounds of
    ``time_each_path`` over every warmed-up ``(path, T)``.
    """
    rows, thunks, last = {}, {}, {}
    for seq_len in tqdm(args.seq_lens, desc=f"bench_linear_family {mode}: compile, warm up", unit="T"):
        xs = workload.benchmark_inputs(seq_len, mode, args)
        warm = {}
        for name, path in path_fns(seq_len, args).items():
            if args.paths is not None and name not in args.paths:
                continue
            compiled = compile_fn(program(path, mode), path.extra, *xs)
            predicted = extrapolate(last.get(name), seq_len, ORDER[path.kind])
            runs = predicted is None or predicted <= args.time_budget_s
            rows[(name, seq_len)] = {"T": seq_len, "mode": mode, "path": name, "kind": path.kind,
                                     "causal": path.causal, "baseline": path.baseline,
                                     "memory": memory_of(compiled).as_dict(), "run": runs, "predicted_s": predicted}
            if runs:
                warm[(name, seq_len)] = lambda c=compiled, extra=path.extra, xs=xs: c(extra, *xs)
        for (name, _), t in time_thunks(warm, repeats=1, warmup=0).items():
            last[name] = (seq_len, t.median_s)
            rows[(name, seq_len)]["warmup_s"] = t.median_s
        thunks.update(warm)
    print(f"bench_linear_family {mode}: timing {len(thunks)} (path, T) pairs, interleaved", flush=True)
    samples, faults, cpu = time_each_path(thunks, args.repeats, args.max_seconds)
    for row in rows.values():
        s = samples.get((row["path"], row["T"]))
        row["samples_s"] = s or []
        row["median_s"] = statistics.median(s) if s else None
        row["repeats"] = len(row["samples_s"])
        row["page_faults"] = faults.get((row["path"], row["T"]), [])
        row["cpu_samples_s"] = cpu.get((row["path"], row["T"]), [])
        row["cpu_median_s"] = statistics.median(row["cpu_samples_s"]) if row["cpu_samples_s"] else None
    for row in rows.values():
        base = rows.get((row["baseline"], row["T"]), {}).get("median_s")
        row["ratio_to_softmax"] = (row["median_s"] / base if row["median_s"] and base and row["kind"] != SOFTMAX
                                   else None)
    return list(rows.values())


def run(args: argparse.Namespace) -> list[dict]:
    """Every measurement, one mode after the other."""
    return [row for mode in args.modes for row in measure_mode(mode, args)]


def _find(rows: Sequence[dict], seq_len: int, mode: str, path: str) -> Optional[dict]:
    return next((r for r in rows if (r["T"], r["mode"], r["path"]) == (seq_len, mode, path)), None)


def targets(rows: Sequence[dict], fits: dict, args: argparse.Namespace) -> dict:
    """Per fast path and mode: the issue's bound, the slopes, whether each meets it, and the time ratio to its softmax
    baseline at the largest T (measured, or against softmax's predicted time when softmax was not run there)."""
    top = max(args.seq_lens)
    out = {}
    for path, by_mode in fits.items():
        first = next(r for r in rows if r["path"] == path)
        if first["kind"] == SOFTMAX:
            continue
        bound = TARGET_SLOPE[first["kind"]]
        out[path] = {}
        for mode, by_range in by_mode.items():
            row, base = _find(rows, top, mode, path), _find(rows, top, mode, first["baseline"])
            base_s = None if base is None else base["median_s"] if base["run"] else base["predicted_s"]
            slope, late = (None if fit is None else fit["slope"] for fit in (by_range["all"], by_range["from_min_len"]))
            out[path][mode] = {
                "kind": first["kind"], "bound": bound, "slope": slope, "slope_from_min_len": late,
                "met": None if slope is None else slope <= bound,
                "met_from_min_len": None if late is None else late <= bound,
                "T": top, "baseline": first["baseline"], "baseline_measured": base is not None and base["run"],
                "ratio_to_softmax": row["median_s"] / base_s if row["run"] and base_s else None,
            }
    return out


def _time_cell(row: dict, budget: float) -> str:
    if row["run"]:
        return f"{row['median_s'] * 1e3:.1f} ms (n={row['repeats']})"
    return f"not run (~{row['predicted_s']:.0f} s > {budget:g} s)"


def _verdict(met: Optional[bool]) -> str:
    return "not measured" if met is None else "met" if met else "**NOT met**"


def _ratio_cell(goal: dict) -> str:
    if goal["ratio_to_softmax"] is None:
        return "n/a"
    cell = f"{goal['ratio_to_softmax']:.3f}x"
    return cell if goal["baseline_measured"] else f"{cell} (of softmax's predicted time)"


def mode_table(rows: Sequence[dict], fits: dict, goals: dict, mode: str, args: argparse.Namespace) -> str:
    """One line per path in ``mode``: time at each T, slopes, ratio to its softmax at the largest T, target."""
    late = f"T >= {args.slope_min_len}"
    headers = ["path", *(f"T={t}" for t in args.seq_lens), "slope (all T)", f"slope ({late})",
               f"/ softmax at T={max(args.seq_lens)}", "target", "verdict (all T)", f"verdict ({late})"]
    lines = []
    for path, by_mode in fits.items():
        line = [path, *(_time_cell(_find(rows, t, mode, path), args.time_budget_s) for t in args.seq_lens),
                format_fit(by_mode[mode]["all"]), format_fit(by_mode[mode]["from_min_len"])]
        goal = goals.get(path, {}).get(mode)
        if goal is None:
            line += ["-", "none (softmax, about 2)", "-", "-"]
        else:
            line += [_ratio_cell(goal), f"<= {goal['bound']:g} ({goal['kind']})", _verdict(goal["met"]),
                     _verdict(goal["met_from_min_len"])]
        lines.append(line)
    return report.markdown_table(headers, lines)


def growth_table(rows: Sequence[dict], paths: Sequence[str], args: argparse.Namespace) -> str:
    """One line per (path, mode): time at each T over time at the previous T (x2 per doubling is linear, x4
    quadratic); where a path steps up shows whether its slope is a trend or one jump (a cache level, say)."""
    def cell(path: str, mode: str, i: int) -> str:
        now, before = _find(rows, args.seq_lens[i], mode, path), _find(rows, args.seq_lens[i - 1], mode, path)
        if not (now["run"] and before["run"]):
            return "-"
        return f"{now['median_s'] / before['median_s']:.2f}x"

    heads = [f"{a} -> {b}" for a, b in zip(args.seq_lens, args.seq_lens[1:])]
    lines = [[path, mode.replace("_", "+"), *(cell(path, mode, i) for i in range(1, len(args.seq_lens)))]
             for path in paths for mode in args.modes]
    return report.markdown_table(["path", "mode", *heads], lines)


def memory_table(rows: Sequence[dict], paths: Sequence[str], args: argparse.Namespace) -> str:
    """One line per (path, mode): compiled peak memory at each T."""
    lines = [[path, mode.replace("_", "+"),
              *(report.format_bytes(_find(rows, t, mode, path)["memory"]["peak"]) for t in args.seq_lens)]
             for path in paths for mode in args.modes]
    return report.markdown_table(["path", "mode", *(f"T={t}" for t in args.seq_lens)], lines)


def cpu_slopes(rows: Sequence[dict], paths: Sequence[str], args: argparse.Namespace) -> dict:
    """``path_slopes`` of the median process CPU time per run instead of the wall time."""
    as_cpu = [dict(row, median_s=row.get("cpu_median_s")) for row in rows]
    return path_slopes(as_cpu, paths, args.modes, args.slope_min_len)


def cpu_table(rows: Sequence[dict], fits: dict, args: argparse.Namespace) -> str:
    """One line per (path, mode): median CPU time per run at each T and its slopes."""
    def cell(row: dict) -> str:
        return "-" if row["cpu_median_s"] is None else f"{row['cpu_median_s'] * 1e3:.1f} ms"

    lines = [[path, mode.replace("_", "+"), *(cell(_find(rows, t, mode, path)) for t in args.seq_lens),
              format_fit(by_mode[mode]["all"]), format_fit(by_mode[mode]["from_min_len"])]
             for path, by_mode in fits.items() for mode in args.modes]
    return report.markdown_table(["path", "mode", *(f"T={t}" for t in args.seq_lens), "slope (all T)",
                                  f"slope (T >= {args.slope_min_len})"], lines)


def faults_table(rows: Sequence[dict], paths: Sequence[str], args: argparse.Namespace) -> str:
    """One line per (path, mode): median minor page faults per timed run at each T (4 KiB each)."""
    def cell(row: dict) -> str:
        return "-" if not row["page_faults"] else f"{statistics.median(row['page_faults']):.0f}"

    lines = [[path, mode.replace("_", "+"), *(cell(_find(rows, t, mode, path)) for t in args.seq_lens)]
             for path in paths for mode in args.modes]
    return report.markdown_table(["path", "mode", *(f"T={t}" for t in args.seq_lens)], lines)


def summary(goals: dict, args: argparse.Namespace) -> list[str]:
    """One bullet per fast path: its slopes against the bound in both modes and its ratio to softmax."""
    out = []
    for path, by_mode in goals.items():
        parts = []
        for mode, g in by_mode.items():
            slope = "n/a" if g["slope"] is None else f"{g['slope']:.3f}"
            late = "n/a" if g["slope_from_min_len"] is None else f"{g['slope_from_min_len']:.3f}"
            parts.append(f"{mode.replace('_', '+')} slope {slope} ({_verdict(g['met'])}; T >= {args.slope_min_len}: "
                         f"{late}), {_ratio_cell(g)} of {g['baseline']}")
        bound = next(iter(by_mode.values()))["bound"]
        out.append(f"- `{path}` (<= {bound:g}): " + "; ".join(parts))
    return out


def _mode_title(mode: str) -> str:
    return "forward" if mode == "fwd" else "forward + backward (gradients wrt q, k, v)"


def markdown_report(rows: list[dict], fits: dict, goals: dict, args: argparse.Namespace, device: dict,
                    cpu_fits: dict) -> str:
    """The markdown file: setup, one timing table per mode with slopes and verdicts, memory, summary."""
    sections = []
    for mode in args.modes:
        sections += [f"## {_mode_title(mode).capitalize()}", "",
                       mode_table(rows, fits, goals, mode, args), ""]
    return "\n".join([
        f"# The linear family (issue 17) vs blocked softmax: time vs T ({device['device_kind']})",
        "",
        f"Device: `{device['device_kind']}` ({device['platform']}, {device['cpu_model']}), "
        f"{device['cpu_count']} CPUs, jax {device['jax_version']}. B={args.batch}, H={args.heads}, "
        f"D={args.head_dim}, {args.dtype}. Image ops see the T tokens as a T/{args.image_width} x "
        f"{args.image_width} map; agent attention pools {args.agent_pool} x {args.agent_pool} agents; "
        f"ScatterFormer: T voxels at random distinct cells of a {' x '.join(map(str, args.voxel_grid))} grid, "
        f"windows {args.voxel_window} x {args.voxel_window} x {args.voxel_grid[2]}; causal Flow-Attention chunk "
        f"{args.chunk_size}; kernelized RPE: 64 PRF features, a random bias per offset. Baselines: "
        "`attnjax.attention(implementation=\"xla\")` (blocked softmax), without a mask for the non-causal paths and "
        "with `Causal()` for the causal ones.",
        "",
        "Times are medians of runs interleaved over every path and T of a mode (a change in the host's load shifts "
        "all lengths alike, not the slopes): each (path, T) runs once per round and leaves the rounds after "
        f"{args.repeats} runs or {args.max_seconds:g} s of its own runs (slow ones at large T get fewer repeats; "
        "every run's time is in the JSON). A path is timed at T only while its single-run time predicted from its "
        f"warm-up at the previous T stays under {args.time_budget_s:g} s. "
        "Slopes: least squares of log(time) on log(T) (1 linear, 2 quadratic). Targets (issue 17): slope <= "
        f"{TARGET_SLOPE[LINEAR]:g} for the linear paths, <= {TARGET_SLOPE[FFT]:g} for the FFT ones (kernelized RPE).",
        "",
        *(["CPU times are to be read as ratios and slopes only, not as absolute speeds.", ""]
          if device["platform"] == "cpu" else []),
        host.load_note(device["load_before"], device["load_after"]),
        "",
        *sections,
        "## Growth of time per step of T",
        "",
        growth_table(rows, list(fits), args),
        "",
        "## Peak memory (XLA compiled memory analysis: arguments + outputs + temporaries)",
        "",
        memory_table(rows, list(fits), args),
        "",
        "## Process CPU time per run (median, all threads) and its slopes",
        "",
        "Less disturbed than the wall time by other jobs on a shared host (still by their use of the caches).",
        "",
        cpu_table(rows, cpu_fits, args),
        "",
        "## Minor page faults per run (median; 4 KiB each)",
        "",
        "glibc maps every allocation of 32 MiB or more afresh and unmaps it when freed, so a program whose "
        "temporaries pass 32 MiB first-touches them on every run: a cost linear in the temporaries that starts at "
        "some T and steepens the slope fitted across it.",
        "",
        faults_table(rows, list(fits), args),
        "",
        "## Summary",
        "",
        *summary(goals, args),
        "",
    ])


def plot(rows: list[dict], fits: dict, args: argparse.Namespace, path: Path) -> Path:
    """Log-log time per mode with fitted lines (slopes in the legend), and peak memory in the last mode, vs T."""
    plt = plots.plt
    fig, axes = plt.subplots(1, len(args.modes) + 1, figsize=(6.7 * (len(args.modes) + 1), 6.5))
    time_axes, mem_ax = axes[:-1], axes[-1]
    colors = plt.cm.tab20(np.linspace(0, 1, 20))
    for i, name in enumerate(fits):
        color = colors[i % 20]
        style = "--" if name.startswith("softmax") else "-"
        for ax, mode in zip(time_axes, args.modes):
            timed = [(r["T"], r["median_s"]) for r in rows if r["path"] == name and r["mode"] == mode and r["run"]]
            if timed:
                ax.loglog(*zip(*timed), "o", color=color)
            fit = fits[name][mode]["all"]
            if fit:
                ax.loglog(*fitted_line(fit), style, color=color, label=f"{name}: slope {fit['slope']:.2f}")
        sel = [r for r in rows if r["path"] == name and r["mode"] == args.modes[-1]]
        mem_ax.loglog([r["T"] for r in sel], [r["memory"]["peak"] / GIB for r in sel], "o" + style, color=color,
                      label=name)
    for ax, mode in zip(time_axes, args.modes):
        ax.set(title=f"{_mode_title(mode)}: median time (points), fit (lines)", xlabel="T", ylabel="seconds")
    mem_ax.set(title=f"{_mode_title(args.modes[-1])}: peak memory (compiled)", xlabel="T", ylabel="GiB")
    return plots.finish_figure(
        fig, axes, args.seq_lens,
        f"linear family vs blocked softmax, B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, "
        f"{jax.devices()[0].device_kind}", path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; write JSON, markdown and PNG; print the report."""
    args = parse_args(argv)
    load_before = host.machine_load()
    rows = run(args)
    device = dict(host.device_info(), cpu_model=host.cpu_model(), load_before=load_before,
                  load_after=host.machine_load())
    paths = list(dict.fromkeys(r["path"] for r in rows))
    fits = path_slopes(rows, paths, args.modes, args.slope_min_len)
    goals = targets(rows, fits, args)
    cpu_fits = cpu_slopes(rows, paths, args)
    md = markdown_report(rows, fits, goals, args, device, cpu_fits)
    print(md)
    results = {"device": device, "settings": report.jsonable_args(args), "rows": rows, "slopes": fits,
               "cpu_slopes": cpu_fits, "targets": goals}
    report.save_benchmark(results, md, args, lambda p: plot(rows, fits, args, p))
    return results


if __name__ == "__main__":
    main()
