"""DiffQKV decode benchmark: one decode step with fewer V heads than K heads against GQA.

Lin et al., "Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models", 2025, claim
faster long-context inference than GQA by compressing V more than K. In one run, for each context length L,
``attnjax.nn.MultiHeadAttention.decode`` of one token against a cache filled with L − 1 tokens (B=1):

- ``gqa``: ``num_kv_heads = Hk`` keys and values (the baseline);
- ``diffqkv Hv=Hk/2``: the same Hk key heads, ``num_v_heads = Hk/2`` value heads.

Reported: the KV-cache bytes (``B·L·(Hk·D + Hv·Dv)·itemsize``) and the median decode-step time, as ratios to GQA.

    python -m experiments.bench_diff_qkv --seq-lens 4k,16k
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from attnjax.nn.attention import KVCache, MultiHeadAttention
from experiments.lib import cli, host, plots, report
from experiments.lib.measure import time_thunks

BASELINE = "gqa"

SMOKE = {"seq_lens": [64], "heads": 4, "head_dim": 8, "kv_heads": 2, "repeats": 1, "max_seconds": 1.0}
"""``--smoke`` defaults: tiny sizes that check the benchmark runs, in seconds (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = cli.benchmark_parser(__doc__, [4096, 16384], heads=16, head_dim=64)
    p.add_argument("--kv-heads", type=int, default=4, help="Hk, the key heads of both layers")
    p.add_argument("--repeats", type=int, default=20, help="timed decode steps per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=60.0)
    cli.add_output_flags(p, "bench_diff_qkv")
    return cli.parse_with_smoke(p, argv, SMOKE)


def layers(args: argparse.Namespace) -> dict[str, MultiHeadAttention]:
    """The two layers, same width, heads and key heads; the second keeps half the value heads."""
    common = dict(d_model=args.heads * args.head_dim, num_heads=args.heads, num_kv_heads=args.kv_heads,
                  head_dim=args.head_dim, dtype=jnp.dtype(args.dtype))
    return {BASELINE: MultiHeadAttention(**common, rngs=nnx.Rngs(0)),
            f"diffqkv Hv={args.kv_heads // 2}": MultiHeadAttention(**common, num_v_heads=args.kv_heads // 2,
                                                                     rngs=nnx.Rngs(0))}


def filled_cache(layer: MultiHeadAttention, context: int, dtype) -> KVCache:
    """The layer's cache with ``context − 1`` random tokens in it (the next token is the last)."""
    empty = layer.init_cache(1, context, dtype)
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal(a.shape, np.float32), dtype) for a in (empty.k, empty.v))
    return KVCache(k=k, v=v, length=jnp.asarray(context - 1, jnp.int32))


def cache_bytes(cache: KVCache) -> int:
    """Bytes of the cache's keys and values."""
    return cache.k.nbytes + cache.v.nbytes


def measure(context: int, args: argparse.Namespace) -> list[dict]:
    """Cache bytes and decode-step time of both layers at one context length."""
    dtype = jnp.dtype(args.dtype)
    x_t = jnp.ones((1, 1, args.heads * args.head_dim), dtype)
    step = nnx.jit(lambda layer, x, cache: layer.decode(x, cache)[0])
    rows, thunks = [], {}
    for path, layer in layers(args).items():
        cache = filled_cache(layer, context, dtype)
        rows.append({"L": context, "path": path, "cache_bytes": cache_bytes(cache)})
        thunks[path] = lambda layer=layer, cache=cache: step(layer, x_t, cache)
    timings = time_thunks(thunks, repeats=args.repeats, max_seconds=args.max_seconds)
    base = next(r for r in rows if r["path"] == BASELINE)
    for row in rows:
        t = timings[row["path"]]
        row.update(median_s=t.median_s, repeats=t.repeats,
                   time_ratio_to_gqa=t.median_s / timings[BASELINE].median_s,
                   cache_ratio_to_gqa=row["cache_bytes"] / base["cache_bytes"])
    return rows


def markdown_report(rows: list[dict], args: argparse.Namespace, device: dict, load: str) -> str:
    """The markdown file: setup and table."""
    table = report.markdown_table(
        ["L", "path", "KV cache", "cache / GQA", "decode step", "time / GQA"],
        [[r["L"], r["path"], report.format_bytes(r["cache_bytes"]), f"{r['cache_ratio_to_gqa']:.3f}x",
          f"{r['median_s'] * 1e3:.2f} ms (n={r['repeats']})", f"{r['time_ratio_to_gqa']:.3f}x"] for r in rows])
    return "\n".join([
        f"# DiffQKV decode step vs GQA ({device['device_kind']})", "",
        f"Device: `{device['device_kind']}` ({device['platform']}), {device['cpu_count']} CPUs, jax "
        f"{device['jax_version']}. B=1, {args.heads} query heads of D={args.head_dim}, Hk={args.kv_heads}, "
        f"{args.dtype}; one `MultiHeadAttention.decode` step (projections included) against a cache of L − 1 "
        "tokens. Times are medians of interleaved runs; compare the ratios, not the absolute times.", "",
        load, "", table, ""])


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> Path:
    """Decode-step time and cache bytes vs context length, per layer."""
    plt = plots.plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, p in enumerate(dict.fromkeys(r["path"] for r in rows)):
        sel = [r for r in rows if r["path"] == p]
        ax_t.loglog([r["L"] for r in sel], [r["median_s"] for r in sel], "o-", color=f"C{i}", label=p)
        ax_m.loglog([r["L"] for r in sel], [r["cache_bytes"] / 2 ** 20 for r in sel], "o-", color=f"C{i}", label=p)
    ax_t.set(title="decode step (median)", xlabel="context L", ylabel="seconds")
    ax_m.set(title="KV cache", xlabel="context L", ylabel="MiB")
    return plots.finish_figure(fig, (ax_t, ax_m), args.seq_lens,
                               f"DiffQKV vs GQA decode, Hk={args.kv_heads}, {jax.devices()[0].device_kind}", path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; write JSON, markdown and PNG; print the table."""
    args = parse_args(argv)
    device = host.device_info()
    before = host.machine_load()
    rows = [row for context in tqdm(args.seq_lens, desc="bench_diff_qkv", unit="L") for row in measure(context, args)]
    load = host.load_note(before, host.machine_load())
    md = markdown_report(rows, args, device, load)
    print(md)
    results = {"device": device, "settings": report.jsonable_args(args), "load": load, "rows": rows}
    report.save_benchmark(results, md, args, lambda path: plot(rows, args, path))
    return results


if __name__ == "__main__":
    main()
