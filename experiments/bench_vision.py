"""Vision attention benchmark: window, shifted-window, grid, Halo, neighborhood and criss-cross attention
against dense softmax over all tokens, on square token maps.

In one run, for each map side ``S`` (``T = S²`` tokens), forward (``--mode fwd``) or forward and the
gradients wrt q, k, v (``--mode fwd_bwd``), inputs ``[B, S, S, heads, D]``:

- ``dense/jax.nn``: ``jax.nn.dot_product_attention(implementation="xla")`` over all ``T`` tokens, what a user
  would otherwise write: the baseline, with its ``[B, heads, T, T]`` logits;
- ``dense/attnjax``: ``attnjax.attention(implementation="xla")`` over all tokens: full attention, blocked
  (O(T·tile) memory), the exact-attention cost the local ops avoid;
- ``window PxP`` and ``shifted window PxP``: ``attnjax.vision.window.window_attention`` (Swin's W-MSA / SW-MSA);
- ``grid GxG``: ``attnjax.vision.window.grid_attention`` (MaxViT);
- ``halo b=B h=H``: ``attnjax.vision.halo.halo_attention`` (HaloNet);
- ``neighborhood KxK``: ``attnjax.local.neighborhood_attention`` (NA, on the block-sparse engine);
- ``criss-cross``: ``attnjax.vision.criss_cross.criss_cross_attention`` (CCNet, one pass).

Temporary memory comes from XLA's compiled memory analysis (compiling allocates nothing), so every path
reports it at every size; a path is timed only where its compiled peak fits ``--memory-budget-gib``. Times
are medians of interleaved runs, reported as ratios to the baseline in the same run.

    python -m experiments.bench_vision --sides 64,128
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from tqdm import tqdm

import attnjax
from attnjax.local import neighborhood_attention
from attnjax.vision.criss_cross import criss_cross_attention
from attnjax.vision.halo import halo_attention
from attnjax.vision.window import grid_attention, window_attention
from experiments.lib import cli, host, plots, report, workload
from experiments.lib.measure import GIB, measure_paths

BASELINE, BLOCKED = "dense/jax.nn", "dense/attnjax"

SMOKE = {"sides": [16], "heads": 2, "head_dim": 8, "repeats": 1, "max_seconds": 1.0, "window": 4, "halo_block": 4,
         "halo": 1, "kernel": 3}
"""``--smoke`` defaults: tiny sizes that check the benchmark runs, in seconds (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = cli.benchmark_parser(__doc__, [], heads=2, head_dim=32)
    p.add_argument("--sides", type=cli.parse_ints, default=[64, 128], help="map sides S (T = S² tokens)")
    p.add_argument("--mode", choices=workload.MODES, default="fwd")
    p.add_argument("--window", type=int, default=8, help="window P (Swin), grid G (MaxViT)")
    p.add_argument("--halo-block", type=int, default=8, help="HaloNet's query block b")
    p.add_argument("--halo", type=int, default=3, help="HaloNet's halo h")
    p.add_argument("--kernel", type=int, default=7, help="neighborhood attention's kernel K")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="stop repeating a measurement after this many seconds (large maps get fewer repeats)")
    p.add_argument("--memory-budget-gib", type=float, default=6.0,
                   help="time a path only if its compiled peak memory is below this")
    cli.add_output_flags(p, "bench_vision")
    return cli.parse_with_smoke(p, argv, SMOKE)


def path_fns(args: argparse.Namespace) -> dict[str, Callable]:
    """``(q, k, v) -> out`` on ``[B, S, S, heads, D]`` for each benchmarked path; the baseline first."""
    P, b, h, K = args.window, args.halo_block, args.halo, args.kernel

    def flat(fn: Callable) -> Callable:
        def on_tokens(q, k, v):
            B, S1, S2, H, D = q.shape
            out = fn(*(a.reshape(B, S1 * S2, H, a.shape[-1]) for a in (q, k, v)))
            return out.reshape(B, S1, S2, H, -1)
        return on_tokens

    return {
        BASELINE: flat(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")),
        BLOCKED: flat(lambda q, k, v: attnjax.attention(q, k, v, implementation="xla")),
        f"window {P}x{P}": lambda q, k, v: window_attention(q, k, v, window_size=P),
        f"shifted window {P}x{P}": lambda q, k, v: window_attention(q, k, v, window_size=P, shift_size=P // 2),
        f"grid {P}x{P}": lambda q, k, v: grid_attention(q, k, v, grid_size=P),
        f"halo b={b} h={h}": lambda q, k, v: halo_attention(q, k, v, block_size=b, halo_size=h),
        f"neighborhood {K}x{K}": lambda q, k, v: neighborhood_attention(q, k, v, kernel_size=K),
        "criss-cross": criss_cross_attention,
    }


def map_inputs(side: int, args: argparse.Namespace) -> tuple:
    """Standard-normal q, k, v ``[B, S, S, heads, D]`` (and the cotangent for ``fwd_bwd``)."""
    q, k, v = workload.random_qkv(jax.random.key(0), args.batch, side * side, args.heads, args.head_dim,
                                  jnp.dtype(args.dtype))
    grid = [a.reshape(args.batch, side, side, args.heads, args.head_dim) for a in (q, k, v)]
    return workload.mode_inputs(*grid, args.mode)


def logits_bytes(side: int, args: argparse.Namespace) -> int:
    """Bytes of one ``[B, heads, T, T]`` float32 logits array over all ``T = S²`` tokens."""
    return args.batch * args.heads * side ** 4 * 4


def measure(side: int, fns: dict[str, Callable], args: argparse.Namespace) -> list[dict]:
    """Memory of every path at one map size, and the time of those within the memory budget."""
    xs = map_inputs(side, args)
    measured = measure_paths({path: workload.mode_fn(fn, args.mode) for path, fn in fns.items()}, *xs,
                             budget_bytes=args.memory_budget_gib * GIB, repeats=args.repeats,
                             max_seconds=args.max_seconds)
    rows = [{"side": side, "T": side * side, "mode": args.mode, "path": path, "memory": memory.as_dict(),
             "run": timing is not None} for path, (memory, timing) in measured.items()]
    timings = {path: timing for path, (_, timing) in measured.items() if timing is not None}
    base = timings.get(BASELINE)
    base_temp = next(r for r in rows if r["path"] == BASELINE)["memory"]["temp"]
    for row in rows:
        t = timings.get(row["path"])
        row["median_s"] = t.median_s if t else None
        row["repeats"] = t.repeats if t else 0
        row["time_ratio_to_dense"] = t.median_s / base.median_s if t and base else None
        row["temp_ratio_to_dense"] = row["memory"]["temp"] / max(base_temp, 1)
        row["temp_fraction_of_logits"] = row["memory"]["temp"] / logits_bytes(side, args)
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    """Every size's measurements, small maps first."""
    fns = path_fns(args)
    rows = []
    bar = tqdm(args.sides, desc="bench_vision", unit="map")
    for side in bar:
        bar.set_postfix(S=side)
        rows += measure(side, fns, args)
    return rows


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Rows of the markdown table."""
    out = []
    for r in rows:
        mem = r["memory"]
        if r["run"]:
            time_cell = f"{r['median_s'] * 1e3:.1f} ms (n={r['repeats']})"
            ratio = "n/a" if r["time_ratio_to_dense"] is None else f"{r['time_ratio_to_dense']:.3f}x"
        else:
            time_cell, ratio = f"not run (needs {report.format_bytes(mem['peak'])})", "n/a"
        out.append([f"{r['side']}x{r['side']}", r["path"], report.format_bytes(mem["temp"]),
                    f"{r['temp_ratio_to_dense']:.3g}x", time_cell, ratio])
    return out


def markdown_report(rows: list[dict], args: argparse.Namespace, device: dict, load: str) -> str:
    """The markdown file: setup and table."""
    table = report.markdown_table(["map", "path", "temp memory", "temp / dense", "median time", "time / dense"],
                                  table_rows(rows))
    return "\n".join([
        f"# Vision attention vs dense softmax over all tokens ({device['device_kind']})",
        "",
        f"Device: `{device['device_kind']}` ({device['platform']}), {device['cpu_count']} CPUs, "
        f"jax {device['jax_version']}. B={args.batch}, heads={args.heads}, D={args.head_dim}, {args.dtype}, "
        f"mode {args.mode}; window/grid {args.window}, Halo b={args.halo_block} h={args.halo}, neighborhood "
        f"kernel {args.kernel}. Memory: XLA compiled memory analysis (temp = temporaries beyond arguments and "
        f"outputs). A path is timed only if its peak is below {args.memory_budget_gib:g} GiB. Times are medians "
        "of interleaved runs; compare the ratios, not the absolute times.",
        "",
        load,
        "",
        table,
        "",
    ])


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> Path:
    """Time (timed paths) and compiled temporary memory (every path) vs tokens, log-log."""
    plt = plots.plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    tokens = [s * s for s in args.sides]
    for i, p in enumerate(dict.fromkeys(r["path"] for r in rows)):
        sel = [r for r in rows if r["path"] == p]
        style = "s--" if p in (BASELINE, BLOCKED) else "o-"
        timed = [(r["T"], r["median_s"]) for r in sel if r["run"]]
        if timed:
            ax_t.loglog(*zip(*timed), style, color=f"C{i}", label=p)
        ax_m.loglog([r["T"] for r in sel], [max(r["memory"]["temp"], 1) / GIB for r in sel], style,
                    color=f"C{i}", label=p)
    ax_t.set(title="median time (timed paths only)", xlabel="tokens T = S²", ylabel="seconds")
    ax_m.set(title="temporary memory (compiled)", xlabel="tokens T = S²", ylabel="GiB")
    return plots.finish_figure(fig, (ax_t, ax_m), tokens,
                               f"vision attention, {args.mode}, heads={args.heads}, D={args.head_dim}, "
                               f"{jax.devices()[0].device_kind}", path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; write JSON, markdown and PNG; print the table."""
    args = parse_args(argv)
    device = host.device_info()
    before = host.machine_load()
    rows = run(args)
    load = host.load_note(before, host.machine_load())
    md = markdown_report(rows, args, device, load)
    print(md)
    results = {"device": device, "settings": report.jsonable_args(args), "load": load, "rows": rows}
    report.save_benchmark(results, md, args, lambda path: plot(rows, args, path))
    return results


if __name__ == "__main__":
    main()
