"""Softmax alternatives benchmark: every softmax-family mechanism against softmax, as ratios.

Every registry entry of family "softmax" other than "softmax" itself (sigmoid, softplus, and
whatever else ``attnjax.softmax`` registers) is benchmarked through ``attnjax.attention`` with
its ``xla`` path and, with ``--with-pallas``, its ``pallas`` path, against softmax at the same
shapes in the same run: B=1, causal, forward and forward+backward (gradients of ``sum(out * w)``
wrt q, k, v). Reported per path:

- ``time / softmax xla``: median time over ``softmax/xla``'s (FlashAttention-2 in XLA);
- ``time / softmax same``: over the softmax path of the same implementation (an alternative's
  ``pallas`` path against the softmax Pallas flash kernel; FlashSigmoid's claim is 17% faster
  than FlashAttention-2 on H100);
- ``peak memory / softmax xla``: XLA's compiled memory analysis, at every T.

A path that can't serve the request is listed as unsupported with its NotImplementedError. Pallas
on CPU runs in interpret mode, whose times mean nothing: ``--with-pallas`` is off there by default
(on by default on GPU/TPU).

    python -m experiments.bench_alternatives --seq-lens 1k,2k,4k
    python -m experiments.bench_alternatives --seq-lens 8k --head-dim 128 --dtype bfloat16   # GPU
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
from tqdm import tqdm

import attnjax
from attnjax import masks, registry
from experiments.lib import cli, host, plots, report, workload
from experiments.lib.measure import GIB, compile_fn, memory_of, time_thunks

FAMILY = "softmax"
BASELINE = "softmax/xla"
MODES = workload.MODES
IMPLEMENTATIONS = ("xla", "pallas")
SMOKE = {"seq_lens": [128], "heads": 2, "head_dim": 16, "repeats": 1, "max_seconds": 1.0}
"""``--smoke`` defaults: tiny sizes that check the benchmark runs, in seconds (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = cli.benchmark_parser(__doc__, [1024, 2048, 4096])
    p.add_argument("--mechanisms", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated subset of the {FAMILY!r}-family alternatives (default: all registered)")
    p.add_argument("--skip", type=lambda s: s.split(","), default=[],
                   help="comma-separated alternatives to leave out (say why with --note)")
    p.add_argument("--note", default="", help="a sentence for the markdown report (e.g. why a mechanism is skipped)")
    cli.add_pallas_flag(p, "the pallas paths")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop repeating a measurement after this many seconds (large T gets fewer repeats)")
    p.add_argument("--memory-budget-gib", type=float, default=8.0,
                   help="time a path only if its estimated peak memory is below this")
    cli.add_output_flags(p, "bench_alternatives")
    return cli.parse_with_smoke(p, argv, SMOKE)


def alternatives() -> list[registry.Entry]:
    """Every registered mechanism of family ``FAMILY`` except softmax, after importing every module
    of ``attnjax.softmax`` (so a mechanism registers even before the package exports it)."""
    for module in pkgutil.iter_modules(attnjax.softmax.__path__):
        importlib.import_module(f"attnjax.softmax.{module.name}")
    return [e for e in registry.entries() if e.family == FAMILY and e.name != "softmax"]


def path_fns(entries: Sequence[registry.Entry], with_pallas: bool) -> dict[str, Callable]:
    """``(q, k, v) -> out`` for softmax and each alternative, per implementation, causal."""
    implementations = IMPLEMENTATIONS if with_pallas else IMPLEMENTATIONS[:1]
    softmax = next(e for e in registry.entries() if e.name == "softmax")
    causal = masks.Causal()
    fns = {}
    for entry in [softmax, *entries]:
        for impl in implementations:
            if impl in entry.implementations:
                fns[f"{entry.name}/{impl}"] = (lambda q, k, v, name=entry.name, impl=impl:
                                               attnjax.attention(q, k, v, mechanism=name, mask=causal,
                                                                 implementation=impl))
    return fns


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return value / base if value is not None and base else None


def measure(seq_len: int, mode: str, fns: dict[str, Callable], args: argparse.Namespace) -> list[dict]:
    """Memory of every path at one length and mode, and the interleaved times of those within budget."""
    xs = workload.benchmark_inputs(seq_len, mode, args)
    rows, thunks = [], {}
    for path, fn in fns.items():
        mechanism, implementation = path.split("/")
        row = {"T": seq_len, "S": seq_len, "causal": True, "mode": mode, "path": path, "mechanism": mechanism,
               "implementation": implementation}
        try:
            compiled = compile_fn(workload.mode_fn(fn, mode), *xs)
        except NotImplementedError as e:
            rows.append(dict(row, unsupported=str(e), run=False, memory=None))
            continue
        memory = memory_of(compiled)
        runs = memory.peak <= args.memory_budget_gib * GIB
        rows.append(dict(row, unsupported=None, run=runs, memory=memory.as_dict()))
        if runs:
            thunks[path] = lambda c=compiled: c(*xs)
    timings = time_thunks(thunks, repeats=args.repeats, max_seconds=args.max_seconds)
    by_path = {r["path"]: r for r in rows}
    for row in rows:
        t = timings.get(row["path"])
        row["median_s"] = t.median_s if t else None
        row["repeats"] = t.repeats if t else 0
    for row in rows:
        base = by_path.get(BASELINE)
        same = by_path.get(f"softmax/{row['implementation']}")
        row["ratio_to_softmax_xla"] = _ratio(row["median_s"], base and base["median_s"])
        row["ratio_to_softmax_same"] = _ratio(row["median_s"], same and same["median_s"])
        row["memory_ratio_to_softmax_xla"] = _ratio(row["memory"] and row["memory"]["peak"],
                                                    base and base["memory"] and base["memory"]["peak"])
    return rows


def run(args: argparse.Namespace, fns: dict[str, Callable]) -> list[dict]:
    """Every (T, mode) measurement, small T first."""
    rows = []
    bar = tqdm([(t, m) for t in args.seq_lens for m in MODES], desc="bench_alternatives", unit="run")
    for seq_len, mode in bar:
        bar.set_postfix(T=seq_len, mode=mode)
        rows += measure(seq_len, mode, fns, args)
    return rows


def _x(ratio: Optional[float]) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _first_sentence(text: str, limit: int = 100) -> str:
    """The first sentence of an error, at most ``limit`` characters (the JSON keeps all of it)."""
    first = text.split(". ")[0]
    return first if len(first) <= limit else first[:limit - 1] + "…"


def table(rows: list[dict]) -> str:
    """One line per (T, mode, path)."""
    lines = []
    for r in rows:
        if r["unsupported"]:
            lines.append([r["T"], r["mode"].replace("_", "+"), r["path"], "-", "-",
                          f"unsupported: {_first_sentence(r['unsupported'])}", "-", "-"])
            continue
        time_cell = (f"{r['median_s'] * 1e3:.1f} ms (n={r['repeats']})" if r["run"]
                     else f"not run (needs {report.format_bytes(r['memory']['peak'])})")
        lines.append([r["T"], r["mode"].replace("_", "+"), r["path"], report.format_bytes(r["memory"]["peak"]),
                      _x(r["memory_ratio_to_softmax_xla"]), time_cell, _x(r["ratio_to_softmax_xla"]),
                      _x(r["ratio_to_softmax_same"])])
    return report.markdown_table(["T", "mode", "path", "peak memory", "memory / softmax xla", "median time",
                                  "time / softmax xla", "time / softmax same impl"], lines)


def pallas_note(with_pallas: bool) -> str:
    """What the output says about the pallas paths."""
    backend = jax.default_backend()
    if backend in cli.ACCELERATORS:
        return f"Pallas paths compiled for {backend}." if with_pallas else "Pallas paths left out (--no-with-pallas)."
    if with_pallas:
        return (f"Pallas paths ran in Pallas interpret mode on {backend}: their times are NOT meaningful "
                "(only that they run).")
    return (f"Pallas paths not timed: on {backend} they run only in interpret mode, which is meaningless to time "
            "(pass --with-pallas to include them anyway; on by default on GPU/TPU).")


def markdown_report(rows: list[dict], entries: Sequence[registry.Entry], args: argparse.Namespace, device: dict,
                    load: str) -> str:
    """The markdown file: setup, mechanisms, table."""
    papers = "; ".join(f"`{e.name}`: {e.paper}" for e in entries)
    return "\n".join([
        f"# Softmax alternatives vs softmax: time and memory ratios ({device['device_kind']})",
        "",
        f"Device: `{device['device_kind']}` ({device['platform']}), {device['cpu_count']} CPUs, "
        f"jax {device['jax_version']}. B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, causal, "
        "self-attention (S = T); default config of each mechanism, through `attnjax.attention(mechanism=..., "
        "implementation=...)`. Forward+backward = gradients wrt q, k, v. Times are medians of runs interleaved "
        "over every path at one (T, mode); memory is XLA's compiled memory analysis (arguments + outputs + "
        f"temporaries). A path is timed only if its peak is below {args.memory_budget_gib:g} GiB.",
        "",
        load,
        "",
        *([args.note, ""] if args.note else []),
        *([f"Skipped (--skip): {', '.join(f'`{n}`' for n in args.skip)}.", ""] if args.skip else []),
        pallas_note(args.with_pallas),
        "",
        f"Mechanisms: {papers}.",
        "",
        table(rows),
        "",
    ])


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> Path:
    """Time and peak-memory ratios to softmax xla vs T, one line per path and mode."""
    plt = plots.plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 4.8))
    paths = [p for p in dict.fromkeys(r["path"] for r in rows) if p != BASELINE]
    for i, p in enumerate(paths):
        for mode, style in zip(MODES, ("-", "--")):
            sel = [r for r in rows if r["path"] == p and r["mode"] == mode and not r["unsupported"]]
            label, color = f"{p} {mode.replace('_', '+')}", f"C{i}"
            timed = [(r["T"], r["ratio_to_softmax_xla"]) for r in sel if r["ratio_to_softmax_xla"]]
            if timed:
                ax_t.semilogx(*zip(*timed), "o" + style, color=color, label=label)
            mem = [(r["T"], r["memory_ratio_to_softmax_xla"]) for r in sel if r["memory_ratio_to_softmax_xla"]]
            if mem:
                ax_m.semilogx(*zip(*mem), "o" + style, color=color, label=label)
    ax_t.set(title="median time / softmax xla", xlabel="T", ylabel="ratio")
    ax_m.set(title="peak memory (compiled) / softmax xla", xlabel="T", ylabel="ratio")
    for ax in (ax_t, ax_m):
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    return plots.finish_figure(fig, (ax_t, ax_m), args.seq_lens,
                                f"softmax alternatives, causal, B={args.batch}, H={args.heads}, D={args.head_dim}, "
                                f"{args.dtype}, {jax.devices()[0].device_kind}", path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; write JSON, markdown and PNG; print the table."""
    args = parse_args(argv)
    entries = alternatives()
    unknown = (set(args.mechanisms or []) | set(args.skip)) - {e.name for e in entries}
    if unknown:
        raise SystemExit(f"unknown mechanisms {sorted(unknown)}; registered: {[e.name for e in entries]}")
    entries = [e for e in entries if (args.mechanisms is None or e.name in args.mechanisms) and e.name not in args.skip]
    device = host.device_info()
    before = host.machine_load()
    rows = run(args, path_fns(entries, args.with_pallas))
    after = host.machine_load()
    load = host.load_note(before, after)
    md = markdown_report(rows, entries, args, device, load)
    print(md)
    results = {"device": device, "settings": report.jsonable_args(args), "load": {"before": before, "after": after},
               "pallas": pallas_note(args.with_pallas),
               "mechanisms": [{"name": e.name, "paper": e.paper, "implementations": list(e.implementations)}
                              for e in entries],
               "rows": rows}
    report.save_benchmark(results, md, args, lambda path: plot(rows, args, path))
    return results


if __name__ == "__main__":
    main()
