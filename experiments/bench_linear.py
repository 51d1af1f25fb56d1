"""Lightning attention benchmark: time vs T of the chunked linear path against blocked softmax.

In one run, for each sequence length T, forward and forward+backward (gradients of
``sum(out * w)`` wrt q, k, v), causal:

- ``lightning/xla``: ``linear_attention(..., decay="alibi", implementation="xla")``, chunked
  (Lightning Attention-2), O(T) time;
- ``softmax/xla``: ``flash_attention_xla(..., mask=Causal())``, blocked, O(T²) time;
- ``lightning/pallas`` (``--with-pallas``; default on GPU/TPU only): the Pallas Lightning kernel.
  On CPU it runs in interpret mode, whose times mean nothing.

The log-log slope of time vs T (least squares of log time on log T) is fitted per path and mode,
over every T the path ran and over ``T >= --slope-min-len``; the target is a Lightning slope of at
most 1.1 (softmax: about 2). A path is timed at the next T only while its predicted single-run
time (last time × (T / last T)^order, order 2 for softmax, 1 for Lightning) fits
``--time-budget-s``; peak memory (XLA's compiled memory analysis) is reported at every T.

    python -m experiments.bench_linear --seq-lens 1k,2k,4k,8k,16k,32k,64k --heads 8 --head-dim 64
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
from tqdm import tqdm

import attnjax
from attnjax import masks
from attnjax.linear import linear_attention
from experiments.lib import cli, host, plots, report, workload
from experiments.lib.measure import GIB, compile_fn, memory_of, time_thunks
from experiments.lib.slopes import extrapolate, fitted_line, format_fit, path_slopes

LIGHTNING, SOFTMAX, PALLAS = "lightning/xla", "softmax/xla", "lightning/pallas"
ORDER = {LIGHTNING: 1, SOFTMAX: 2, PALLAS: 1}
"""Expected growth exponent of each path's time in T, used only to predict whether the next T fits the budget."""
MODES = workload.MODES
TARGET_SLOPE = 1.1

SMOKE = {"seq_lens": [256, 512], "heads": 2, "head_dim": 32, "repeats": 1, "max_seconds": 1.0,
         "slope_min_len": 256}
"""``--smoke`` defaults: tiny sizes that check the benchmark runs, in seconds (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = cli.benchmark_parser(__doc__, [1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--chunk-size", type=int, default=64, help="chunk length of the Lightning paths")
    cli.add_pallas_flag(p, "the Pallas Lightning kernel")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop repeating a measurement after this many seconds (large T gets fewer repeats)")
    p.add_argument("--time-budget-s", type=float, default=20.0,
                   help="time a path at T only if its predicted single-run time is below this")
    p.add_argument("--slope-min-len", type=int, default=4096,
                   help="also fit the slope over T >= this, where fixed overheads matter less")
    cli.add_output_flags(p, "bench_linear")
    return cli.parse_with_smoke(p, argv, SMOKE)


def path_fns(chunk_size: int, with_pallas: bool) -> dict[str, Callable]:
    """``(q, k, v) -> out`` for each benchmarked path, causal."""
    causal = masks.Causal()

    def lightning(implementation: str) -> Callable:
        return lambda q, k, v: linear_attention(q, k, v, decay="alibi", chunk_size=chunk_size,
                                                implementation=implementation)

    fns = {LIGHTNING: lightning("xla"),
           SOFTMAX: lambda q, k, v: attnjax.softmax.flash_attention_xla(q, k, v, mask=causal)}
    if with_pallas:
        fns[PALLAS] = lightning("pallas")
    return fns


def pallas_note(with_pallas: bool) -> str:
    """What the output says about the Pallas Lightning kernel."""
    backend = jax.default_backend()
    if backend in cli.ACCELERATORS:
        return f"`{PALLAS}` is compiled for {backend}." if with_pallas else f"`{PALLAS}` left out (--no-with-pallas)."
    if with_pallas:
        return (f"`{PALLAS}` ran in Pallas interpret mode on {backend}: its times are NOT meaningful "
                "(only that it runs).")
    return (f"`{PALLAS}` not timed: on {backend} the Pallas kernel runs only in interpret mode, which is "
            "meaningless to time (pass --with-pallas to include it anyway; it is on by default on GPU/TPU).")


def predicted_seconds(path: str, seq_len: int, last: Optional[tuple[int, float]]) -> Optional[float]:
    """One run's time at ``seq_len`` extrapolated from the path's last timed ``(T, seconds)``."""
    return extrapolate(last, seq_len, ORDER[path])


def measure(seq_len: int, mode: str, fns: dict[str, Callable], last: dict[tuple[str, str], tuple[int, float]],
            args: argparse.Namespace) -> list[dict]:
    """Memory of every path at one length and mode, and the time of those predicted within the budget.

    ``last`` maps ``(path, mode)`` to its last timed ``(T, seconds)`` and is updated in place.
    """
    xs = workload.benchmark_inputs(seq_len, mode, args)
    rows, thunks = [], {}
    for path, fn in fns.items():
        compiled = compile_fn(workload.mode_fn(fn, mode), *xs)
        predicted = predicted_seconds(path, seq_len, last.get((path, mode)))
        runs = predicted is None or predicted <= args.time_budget_s
        rows.append({"T": seq_len, "mode": mode, "path": path, "memory": memory_of(compiled).as_dict(),
                     "run": runs, "predicted_s": predicted})
        if runs:
            thunks[path] = lambda c=compiled: c(*xs)
    timings = time_thunks(thunks, repeats=args.repeats, max_seconds=args.max_seconds)
    base = timings.get(SOFTMAX)
    for row in rows:
        t = timings.get(row["path"])
        row["median_s"] = t.median_s if t else None
        row["repeats"] = t.repeats if t else 0
        row["ratio_to_softmax"] = t.median_s / base.median_s if t and base else None
        if t:
            last[(row["path"], mode)] = (seq_len, t.median_s)
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    """Every (T, mode) measurement, small T first."""
    fns = path_fns(args.chunk_size, args.with_pallas)
    last: dict[tuple[str, str], tuple[int, float]] = {}
    rows = []
    bar = tqdm([(t, m) for t in args.seq_lens for m in MODES], desc="bench_linear", unit="run")
    for seq_len, mode in bar:
        bar.set_postfix(T=seq_len, mode=mode)
        rows += measure(seq_len, mode, fns, last, args)
    return rows


def slopes(rows: list[dict], paths: Sequence[str], min_len: int) -> dict:
    """``{path: {mode: {"all": fit, "from_min_len": fit}}}`` over the lengths each path was timed at."""
    return path_slopes(rows, paths, MODES, min_len)


def target(fits: dict) -> dict:
    """The issue's target: every Lightning xla slope (both modes, both ranges) at most ``TARGET_SLOPE``."""
    values = {f"{mode}/{rng}": fit["slope"] for mode, by_range in fits[LIGHTNING].items()
              for rng, fit in by_range.items() if fit}
    return {"path": LIGHTNING, "bound": TARGET_SLOPE, "value": values,
            "met": all(v <= TARGET_SLOPE for v in values.values()) if values else None}


def _find(rows: list[dict], seq_len: int, mode: str, path: str) -> Optional[dict]:
    return next((r for r in rows if (r["T"], r["mode"], r["path"]) == (seq_len, mode, path)), None)


def _time_cell(row: dict, budget: float) -> str:
    if row["run"]:
        return f"{row['median_s'] * 1e3:.1f} ms (n={row['repeats']})"
    return f"not run (~{row['predicted_s']:.0f} s > {budget:g} s)"


def _growth_cell(row: dict, previous: Optional[dict]) -> str:
    """Time over the same path's time at the previous T (2x per doubling is linear, 4x quadratic)."""
    if not (row["run"] and previous and previous["run"]):
        return "-"
    return f"{row['median_s'] / previous['median_s']:.2f}x"


def table(rows: list[dict], paths: Sequence[str], args: argparse.Namespace) -> str:
    """One line per (T, mode): per path time, growth vs the previous T and peak memory; Lightning/softmax."""
    headers = ["T", "mode"]
    for path in paths:
        headers += [f"{path} time", f"{path} vs prev T", f"{path} peak mem"]
    headers.append(f"{LIGHTNING} / {SOFTMAX}")
    lines = []
    for i, seq_len in enumerate(args.seq_lens):
        for mode in MODES:
            line = [seq_len, mode.replace("_", "+")]
            for path in paths:
                row = _find(rows, seq_len, mode, path)
                prev = _find(rows, args.seq_lens[i - 1], mode, path) if i else None
                line += [_time_cell(row, args.time_budget_s), _growth_cell(row, prev),
                         report.format_bytes(row["memory"]["peak"])]
            ratio = _find(rows, seq_len, mode, LIGHTNING)["ratio_to_softmax"]
            line.append("n/a" if ratio is None else f"{ratio:.3f}x")
            lines.append(line)
    return report.markdown_table(headers, lines)


def slope_table(fits: dict, min_len: int) -> str:
    """One line per (path, mode): slope over every timed T, and over T >= ``min_len``."""
    lines = [[path, mode.replace("_", "+"), format_fit(by_mode["all"]), format_fit(by_mode["from_min_len"])]
             for path, modes in fits.items() for mode, by_mode in modes.items()]
    return report.markdown_table(["path", "mode", "slope (all timed T)", f"slope (T >= {min_len})"], lines)


def _verdict(met: Optional[bool]) -> str:
    return "**not measured**" if met is None else "met" if met else "**NOT met**"


def markdown_report(rows: list[dict], fits: dict, goal: dict, args: argparse.Namespace, device: dict) -> str:
    """The markdown file: setup, timing table, slopes and target."""
    paths = list(fits)
    return "\n".join([
        f"# Lightning attention vs blocked softmax: time vs T ({device['device_kind']})",
        "",
        f"Device: `{device['device_kind']}` ({device['platform']}, {device['cpu_model']}), "
        f"{device['cpu_count']} CPUs, jax {device['jax_version']}. B={args.batch}, H={args.heads}, "
        f"D={args.head_dim}, {args.dtype}, causal; Lightning: ALiBi decay, chunk {args.chunk_size}; softmax: "
        "`flash_attention_xla`, `Causal()` mask. Forward+backward = gradients wrt q, k, v. Times are medians "
        "of interleaved runs (fewer repeats at large T); a path is timed at T only while its predicted "
        f"single-run time stays under {args.time_budget_s:g} s. Peak memory: XLA compiled memory analysis "
        "(arguments + outputs + temporaries), at every T.",
        "",
        *(["CPU times are to be read as ratios and slopes only, not as absolute speeds.", ""]
          if device["platform"] == "cpu" else []),
        pallas_note(args.with_pallas),
        "",
        table(rows, paths, args),
        "",
        "## Log-log slopes of time vs T",
        "",
        "Least squares of log(time) on log(T): 1 is linear, 2 quadratic.",
        "",
        slope_table(fits, args.slope_min_len),
        "",
        "## Target",
        "",
        f"- {goal['path']} slope <= {goal['bound']:g} (softmax about 2): "
        + ", ".join(f"{k} {v:.3f}" for k, v in goal["value"].items()) + f" -> {_verdict(goal['met'])}",
        "",
    ])


def _fit_label(path: str, mode: str, by_range: dict, min_len: int) -> str:
    parts = [f"{path} {mode.replace('_', '+')}"]
    if by_range["all"]:
        parts.append(f"slope {by_range['all']['slope']:.2f}")
    if by_range["from_min_len"]:
        parts.append(f"T>={min_len}: {by_range['from_min_len']['slope']:.2f}")
    return ", ".join(parts)


def plot(rows: list[dict], fits: dict, args: argparse.Namespace, path: Path) -> Path:
    """Log-log time with fitted lines (slopes in the legend), and peak memory, vs T."""
    plt = plots.plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, name in enumerate(fits):
        for mode, style in zip(MODES, ("-", "--")):
            sel = [r for r in rows if r["path"] == name and r["mode"] == mode]
            color, by_range = f"C{i}", fits[name][mode]
            timed = [(r["T"], r["median_s"]) for r in sel if r["run"]]
            if timed:
                ax_t.loglog(*zip(*timed), "o", color=color)
            if by_range["all"]:
                ax_t.loglog(*fitted_line(by_range["all"]), style, color=color,
                            label=_fit_label(name, mode, by_range, args.slope_min_len))
            ax_m.loglog([r["T"] for r in sel], [r["memory"]["peak"] / GIB for r in sel], "o" + style,
                        color=color, label=f"{name} {mode.replace('_', '+')}")
    ax_t.set(title="median time (points) and least-squares fit (lines)", xlabel="T", ylabel="seconds")
    ax_m.set(title="peak memory (compiled memory analysis)", xlabel="T", ylabel="GiB")
    return plots.finish_figure(
        fig, (ax_t, ax_m), args.seq_lens,
        f"causal attention, B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, "
        f"{jax.devices()[0].device_kind}: Lightning (chunk {args.chunk_size}) vs blocked softmax", path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; write JSON, markdown and PNG; print the report."""
    args = parse_args(argv)
    device = dict(host.device_info(), cpu_model=host.cpu_model())
    rows = run(args)
    fits = slopes(rows, list(dict.fromkeys(r["path"] for r in rows)), args.slope_min_len)
    goal = target(fits)
    md = markdown_report(rows, fits, goal, args, device)
    print(md)
    results = {"device": device, "settings": report.jsonable_args(args), "pallas": pallas_note(args.with_pallas),
               "rows": rows, "slopes": fits, "target": goal}
    report.save_benchmark(results, md, args, lambda path: plot(rows, fits, args, path))
    return results


if __name__ == "__main__":
    main()
