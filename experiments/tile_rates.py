"""Attention tile throughput: how the tile shape alone limits blocked attention on this machine.

One step of blocked attention on a tile of ``M`` query rows and ``W`` keys (head dim ``D``)::

    s = q·kᵀ,  p = exp(s − max s),  o = (p·v) / Σp          (4·M·W·D matmul FLOPs)

is timed over many independent tiles (a ``lax.map`` over fresh tiles, about ``--logits-per-step``
logits per map step, as the block-sparse engine chunks its work). The rate is the matmul FLOPs per
second; every rate is also given relative to the 512 × 512 tile of the dense blocked softmax
(``flash_attention_xla``'s default).

Why it matters: at block 64 the block-sparse engine (``attnjax.sparse``) multiplies 64-row query
tiles against ``slots·64`` gathered keys, the dense baseline 512 × 512 tiles. The ratio
``rate(64, W) / rate(512, 512)`` is an upper bound on the engine's efficiency (its speedup over
the dense path times the density) before any gather, mask or loop overhead.

    python -m experiments.tile_rates
"""

from __future__ import annotations

import argparse
import itertools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments.lib import cli, host, measure, plots, report

REFERENCE = (512, 512)
"""The dense baseline's tile (``flash_attention_xla``'s ``block_q × block_kv``)."""

SMOKE = {"rows": [16, 32], "keys": [16, 48], "flops": 2e6, "repeats": 1, "head_dim": 16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=cli.parse_ints, default=[64, 128, 256, 512], help="tile rows M")
    p.add_argument("--keys", type=cli.parse_ints, default=[64, 192, 512, 1024], help="tile keys W")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--flops", type=float, default=2e9, help="matmul FLOPs per timed call")
    p.add_argument("--logits-per-step", type=int, default=2 ** 18, help="logits of the tiles one map step works on")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per shape (median)")
    cli.add_output_flags(p, "tile_rates")
    return cli.parse_with_smoke(p, argv, SMOKE)


def tile_step(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention of ``n`` independent tiles: ``q [n, M, D]``, ``k, v [n, W, D]`` -> ``[n, M, D]``."""
    s = jnp.einsum("nqd,nkd->nqk", q, k)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    return jnp.einsum("nqk,nkd->nqd", p, v) / p.sum(-1, keepdims=True)


def tiles_call(rows: int, keys: int, args: argparse.Namespace):
    """``(fn, inputs, flops)``: ``lax.map`` of ``tile_step`` over about ``args.flops`` of fresh tiles."""
    D = args.head_dim
    per_step = max(1, args.logits_per_step // (rows * keys))
    steps = max(1, round(args.flops / (4 * rows * keys * D * per_step)))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((steps, per_step, n, D), np.float32))
               for n in (rows, keys, keys))
    fn = jax.jit(lambda q, k, v: lax.map(lambda x: tile_step(*x), (q, k, v)))
    return fn, (q, k, v), 4.0 * rows * keys * D * per_step * steps


def run(args: argparse.Namespace) -> list[dict]:
    """One row per tile shape: seconds, GFLOP/s and the rate relative to the reference tile."""
    shapes = list(itertools.product(args.rows, args.keys))
    shapes += [REFERENCE] if REFERENCE not in shapes and not args.smoke else []
    calls = {shape: tiles_call(*shape, args) for shape in shapes}
    timings = measure.time_thunks({f"{m}x{w}": (lambda c=c: c[0](*c[1])) for (m, w), c in calls.items()},
                                 repeats=args.repeats)
    rows = [{"rows": m, "keys": w, "seconds": timings[f"{m}x{w}"].median_s,
             "gflops": calls[m, w][2] / timings[f"{m}x{w}"].median_s / 1e9} for m, w in shapes]
    reference = next((r["gflops"] for r in rows if (r["rows"], r["keys"]) == REFERENCE), max(r["gflops"] for r in rows))
    for r in rows:
        r["relative"] = r["gflops"] / reference
    return rows


def markdown(rows: Sequence[dict], args: argparse.Namespace, device: dict, load: tuple[dict, dict]) -> str:
    """The report: settings and one table row per tile shape."""
    table = report.markdown_table(["rows M", "keys W", "GFLOP/s", "relative to 512x512"],
                                  [[r["rows"], r["keys"], f"{r['gflops']:.1f}", f"{r['relative']:.2f}"] for r in rows])
    return "\n".join([
        f"# Attention tile throughput ({device['platform']})", "",
        f"Device: `{device['device_kind']}`, {device['cpu_count']} CPUs, jax {device['jax_version']}. One step of "
        f"softmax attention (q·kᵀ, exp, p·v) on M × W tiles, D={args.head_dim}, float32, ~{args.flops:.0e} matmul "
        f"FLOPs per timed call, ~{args.logits_per_step} logits per map step; median of {args.repeats}.", "",
        host.load_note(*load), "", table, ""])


def plot(rows: Sequence[dict], path) -> None:
    """Rate against keys W, one line per row count M."""
    fig, ax = plots.plt.subplots(figsize=(6, 4))
    for i, m in enumerate(sorted({r["rows"] for r in rows})):
        pts = sorted((r["keys"], r["gflops"]) for r in rows if r["rows"] == m)
        ax.semilogx(*zip(*pts), "o-", color=f"C{i}", label=f"M = {m}")
    ax.set(xlabel="keys per tile W", ylabel="GFLOP/s (matmul FLOPs)")
    plots.finish_figure(fig, [ax], sorted({r["keys"] for r in rows}), "attention tile throughput", path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run; write JSON, markdown and PNG; print the table."""
    args = parse_args(argv)
    device, load_before = host.device_info(), host.machine_load()
    rows = run(args)
    md = markdown(rows, args, device, (load_before, host.machine_load()))
    print(md)
    results = {"device": device, "settings": report.jsonable_args(args), "rows": rows}
    report.save_benchmark(results, md, args, lambda path: plot(rows, path))
    return results


if __name__ == "__main__":
    main()
