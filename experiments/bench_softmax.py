"""Softmax attention benchmark: memory and time of the ``xla`` path vs jax.nn and the reference.

In one run, for each sequence length T, forward and forward+backward (gradients of
``sum(out * w)`` wrt q, k, v), causal:

- ``attnjax/xla``: ``flash_attention_xla``, blocked, O(T) memory;
- ``jax.nn/xla``: ``jax.nn.dot_product_attention(implementation="xla")``, dense, O(T²);
- ``attnjax/reference``: the naive reference, dense, O(T²).

Peak memory comes from XLA's compiled memory analysis (compiling allocates nothing), so every
path reports what it needs at every T; a path is timed only where that peak fits
``--memory-budget-gib``. Times are medians of interleaved runs, reported as ratios to jax.nn.

    python -m experiments.bench_softmax --seq-lens 1k,2k,4k,8k,16k,32k --heads 8 --head-dim 64
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
from tqdm import tqdm

import attnjax
from attnjax import masks
from experiments.lib import cli, host, plots, report, workload
from experiments.lib.measure import GIB, Memory, compile_fn, memory_of, time_thunks

BASELINE = "jax.nn/xla"
PATHS = ("attnjax/xla", BASELINE, "attnjax/reference")
MODES = workload.MODES
MEMORY_TARGET_LEN, MEMORY_TARGET_GIB = 32768, 1.0
TIME_TARGET_LEN, TIME_TARGET_RATIO = 4096, 1.5

SMOKE = {"seq_lens": [256, 512], "heads": 2, "head_dim": 32, "repeats": 1, "max_seconds": 1.0}
"""``--smoke`` defaults: tiny sizes that check the benchmark runs, in seconds (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    default = attnjax.softmax.Softmax()
    p = cli.benchmark_parser(__doc__, [1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--paths", type=lambda s: s.split(","), default=list(PATHS), help=f"subset of {PATHS}")
    p.add_argument("--block-q", type=int, default=default.block_q, help="tile size of the xla path")
    p.add_argument("--block-kv", type=int, default=default.block_kv, help="tile size of the xla path")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="stop repeating a measurement after this many seconds (large T gets fewer repeats)")
    p.add_argument("--memory-budget-gib", type=float, default=8.0,
                   help="time a path only if its estimated peak memory is below this")
    cli.add_output_flags(p, "bench_softmax")
    return cli.parse_with_smoke(p, argv, SMOKE)


def path_fns(block_q: int, block_kv: int) -> dict[str, Callable]:
    """``(q, k, v) -> out`` for each benchmarked path, causal."""
    xla = attnjax.softmax.Softmax(block_q=block_q, block_kv=block_kv)
    causal = masks.Causal()
    return {
        "attnjax/xla": lambda q, k, v: attnjax.attention(q, k, v, mechanism=xla, mask=causal, implementation="xla"),
        BASELINE: lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
        "attnjax/reference": lambda q, k, v: attnjax.attention(q, k, v, mask=causal, implementation="reference"),
    }


def compile_path(fn: Callable, mode: str, args: tuple) -> jax.stages.Compiled:
    """The compiled forward, or forward+backward, of one path."""
    return compile_fn(workload.mode_fn(fn, mode), *args)


def memory_estimate(fn: Callable, mode: str, args: tuple) -> Memory:
    """Memory one path needs in one mode, from compilation alone (nothing is run)."""
    return memory_of(compile_path(fn, mode, args))


def measure(seq_len: int, mode: str, fns: dict[str, Callable], args: argparse.Namespace) -> list[dict]:
    """Memory of every path at one length and mode, and the time of those within the budget."""
    xs = workload.benchmark_inputs(seq_len, mode, args)
    rows, thunks = [], {}
    for path in args.paths:
        compiled = compile_path(fns[path], mode, xs)
        memory = memory_of(compiled)
        runs = memory.peak <= args.memory_budget_gib * GIB
        rows.append({"T": seq_len, "mode": mode, "path": path, "memory": memory.as_dict(), "run": runs})
        if runs:
            thunks[path] = lambda c=compiled: c(*xs)
    timings = time_thunks(thunks, repeats=args.repeats, max_seconds=args.max_seconds)
    base = timings.get(BASELINE)
    for row in rows:
        t = timings.get(row["path"])
        row["median_s"] = t.median_s if t else None
        row["repeats"] = t.repeats if t else 0
        row["ratio_to_jax_nn"] = t.median_s / base.median_s if t and base else None
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    """Every (T, mode) measurement, small T first."""
    fns = path_fns(args.block_q, args.block_kv)
    steps = [(t, m) for t in args.seq_lens for m in MODES]
    rows = []
    for seq_len, mode in tqdm(steps, desc="bench_softmax", unit="run"):
        rows += measure(seq_len, mode, fns, args)
    return rows


def _find(rows: list[dict], seq_len: int, mode: str, path: str) -> Optional[dict]:
    return next((r for r in rows if (r["T"], r["mode"], r["path"]) == (seq_len, mode, path)), None)


def targets(rows: list[dict]) -> dict:
    """The foundation issue's targets: xla extra memory at 32k, xla/jax.nn time ratio at 4k."""
    extra = {m: r["memory"]["extra"] / GIB for m in MODES
             if (r := _find(rows, MEMORY_TARGET_LEN, m, "attnjax/xla"))}
    ratio = {m: r["ratio_to_jax_nn"] for m in MODES if (r := _find(rows, TIME_TARGET_LEN, m, "attnjax/xla"))}
    return {
        "xla_extra_memory_gib": {"T": MEMORY_TARGET_LEN, "bound": MEMORY_TARGET_GIB, "value": extra,
                                 "met": all(v < MEMORY_TARGET_GIB for v in extra.values()) if extra else None},
        "xla_fwd_time_ratio": {"T": TIME_TARGET_LEN, "bound": TIME_TARGET_RATIO, "value": ratio,
                               "met": None if ratio.get("fwd") is None else ratio["fwd"] <= TIME_TARGET_RATIO},
    }


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Rows of the markdown table."""
    out = []
    for r in rows:
        mem = r["memory"]
        if r["run"]:
            time_cell, ratio = f"{r['median_s'] * 1e3:.1f} ms (n={r['repeats']})", r["ratio_to_jax_nn"]
        else:
            time_cell, ratio = f"not run (needs {report.format_bytes(mem['peak'])})", None
        out.append([r["T"], r["mode"].replace("_", "+"), r["path"], report.format_bytes(mem["peak"]),
                    report.format_bytes(mem["extra"]), time_cell, "n/a" if ratio is None else f"{ratio:.2f}x"])
    return out


def _verdict(met: Optional[bool]) -> str:
    return "**not measured**" if met is None else "met" if met else "**NOT met**"


def markdown_report(rows: list[dict], goals: dict, args: argparse.Namespace, device: dict) -> str:
    """The markdown file: setup, table, and targets."""
    mem, tim = goals["xla_extra_memory_gib"], goals["xla_fwd_time_ratio"]
    table = report.markdown_table(["T", "mode", "path", "peak memory", "extra memory", "median time",
                                   "time / jax.nn"], table_rows(rows))
    return "\n".join([
        f"# Softmax attention: attnjax xla vs jax.nn vs reference ({device['device_kind']})",
        "",
        f"Device: `{device['device_kind']}` ({device['platform']}), {device['cpu_count']} CPUs, "
        f"jax {device['jax_version']}. B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, causal; "
        f"xla tiles {args.block_q}x{args.block_kv}. Memory: XLA compiled memory analysis (peak = "
        f"arguments + outputs + temporaries; extra = temporaries). A path is timed only if its peak "
        f"is below {args.memory_budget_gib:g} GiB. Times are medians of interleaved runs; compare "
        "the ratios, not the absolute times.",
        "",
        table,
        "",
        "## Targets",
        "",
        f"- xla extra memory at T={mem['T']} < {mem['bound']:g} GiB: "
        + ", ".join(f"{m} {v:.3f} GiB" for m, v in mem["value"].items()) + f" -> {_verdict(mem['met'])}",
        f"- xla fwd time within {tim['bound']:g}x of jax.nn at T={tim['T']}: "
        + ", ".join(f"{m} {v:.2f}x" if v else f"{m} n/a" for m, v in tim["value"].items())
        + f" -> {_verdict(tim['met'])}",
        "",
    ])


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> Path:
    """Log-log time (timed paths) and estimated peak memory (every path) vs T."""
    plt = plots.plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, p in enumerate(args.paths):
        for mode, style in zip(MODES, ("-", "--")):
            sel = [r for r in rows if r["path"] == p and r["mode"] == mode]
            label, color = f"{p} {mode.replace('_', '+')}", f"C{i}"
            timed = [(r["T"], r["median_s"]) for r in sel if r["run"]]
            if timed:
                ax_t.loglog(*zip(*timed), "o" + style, color=color, label=label)
            ax_m.loglog([r["T"] for r in sel], [r["memory"]["peak"] / GIB for r in sel], "o" + style,
                        color=color, label=label)
    ax_m.axhline(args.memory_budget_gib, color="gray", lw=0.8, ls=":", label="run budget")
    ax_t.set(title="median time (timed paths only)", xlabel="T", ylabel="seconds")
    ax_m.set(title="estimated peak memory (compiled)", xlabel="T", ylabel="GiB")
    return plots.finish_figure(fig, (ax_t, ax_m), args.seq_lens,
                                f"causal softmax attention, H={args.heads}, D={args.head_dim}, {args.dtype}, "
                                f"{jax.devices()[0].device_kind}", path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; write JSON, markdown and PNG; print the table and targets."""
    args = parse_args(argv)
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        raise SystemExit(f"unknown --paths {sorted(unknown)}; choose from {PATHS}")
    device = host.device_info()
    rows = run(args)
    goals = targets(rows)
    md = markdown_report(rows, goals, args, device)
    print(md)
    results = {"device": device, "settings": report.jsonable_args(args), "rows": rows, "targets": goals}
    report.save_benchmark(results, md, args, lambda path: plot(rows, args, path))
    return results


if __name__ == "__main__":
    main()
