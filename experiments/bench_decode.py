"""Decode-step benchmarks (issue 22), one section per comparison.

Sections (``--only NAME`` runs one; the others keep their last results in the JSON and markdown):

- ``paged``: one decode step of ``attnjax.nn.MultiHeadAttention`` (projections, RoPE, attention, output) with its
  contiguous ``KVCache`` (``layer.decode``) against the same layer through the page pool
  (``attnjax.inference.paged_decode``, attention by the xla path of ``attnjax.softmax.paged_attention``), at every
  ``--contexts`` and ``--batches``. The token sits at position context − 1 of a cache of ``context`` slots; the
  paged cache holds every sequence's ``context / page_size`` pages scattered at random over a pool of exactly
  that many pages. Both caches are donated to the step (updated in place) and reset to ``context − 1`` tokens
  inside it, so every run is the same step. All programs are timed interleaved, round by round, in one run.

- ``families``: one decode step of ``MultiHeadAttention(mechanism=X)`` (``layer.decode``, each mechanism's
  cache path, ``MultiHeadAttention.decode_path``) for one representative of each path, against the same layer
  with ``mechanism="softmax"``, at every ``--contexts`` with batch ``--family-batch``: softplus (the KV cache with
  ``Explicit(filled)``), stick_breaking (the cache rolled to end at the query), sparse_window (softmax over the
  key blocks of its pattern row) and lightning (a ``LinearCache`` state, independent of the context). Default
  configs, the token at position context − 1, caches donated, all programs interleaved in one run.

    python -m experiments.bench_decode                    # every section
    python -m experiments.bench_decode --only paged
    python -m experiments.bench_decode --only families
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from attnjax.inference import PagedKVCache, init_paged_cache, paged_decode
from attnjax.nn import KVCache, LinearCache, MultiHeadAttention
from attnjax.positional import RoPE
from experiments.lib import cli, host, report
from experiments.lib.measure import memory_of, time_thunks

FAMILY_REPRESENTATIVES = ("softplus", "stick_breaking", "sparse_window", "lightning")
"""``families``: one mechanism per ``MultiHeadAttention.decode_path`` other than softmax's."""

SMOKE = {"contexts": [64, 128], "batches": [1, 2], "heads": 2, "kv_heads": 1, "head_dim": 8, "page_size": 4,
         "repeats": 1, "max_seconds": 1.0}
"""``--smoke`` defaults: tiny sizes that check the benchmark runs, in seconds (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(SECTIONS), default=None, help="run one section (default: all)")
    p.add_argument("--contexts", type=cli.parse_ints, default=[4096, 16384],
                   help="context lengths (cache slots; the token decodes at position context - 1)")
    p.add_argument("--batches", type=cli.parse_ints, default=[1, 8], help="batch sizes")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16, help="paged: tokens per page")
    p.add_argument("--family-batch", type=int, default=1, help="families: batch size")
    p.add_argument("--mechanisms", type=lambda s: s.split(","), default=list(FAMILY_REPRESENTATIVES),
                   help="families: comma-separated mechanisms timed against softmax")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (median)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="the interleaved rounds stop once they pass this many seconds (at least one round)")
    cli.add_output_flags(p, "bench_decode")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    for ctx in args.contexts:
        if ctx % args.page_size:
            p.error(f"every context must be a multiple of --page-size {args.page_size}, got {ctx}")
    return args


def _layer(args: argparse.Namespace) -> MultiHeadAttention:
    return MultiHeadAttention(args.heads * args.head_dim, args.heads, num_kv_heads=args.kv_heads, rope=RoPE(),
                              dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0))


def _contiguous(layer: MultiHeadAttention, batch: int, ctx: int, rng: np.random.Generator, dtype) -> KVCache:
    cache = layer.init_cache(batch, ctx, dtype)
    return KVCache(*(jnp.asarray(rng.standard_normal(a.shape, np.float32), dtype) for a in (cache.k, cache.v)),
                   jnp.asarray(ctx - 1, jnp.int32))


def _paged(layer: MultiHeadAttention, batch: int, ctx: int, page_size: int, rng: np.random.Generator,
           dtype) -> PagedKVCache:
    """Every slot active with ``ctx − 1`` tokens on ``ctx / page_size`` pages drawn at random from the pool."""
    per_seq = ctx // page_size
    num_pages = batch * per_seq
    cache = init_paged_cache(layer, num_pages, page_size, batch, max_pages_per_seq=per_seq, dtype=dtype)
    return dataclasses.replace(
        cache,
        k_pages=jnp.asarray(rng.standard_normal(cache.k_pages.shape, np.float32), dtype),
        v_pages=jnp.asarray(rng.standard_normal(cache.v_pages.shape, np.float32), dtype),
        page_table=jnp.asarray(rng.permutation(num_pages).reshape(batch, per_seq), jnp.int32),
        lengths=jnp.full((batch,), ctx - 1, jnp.int32), active=jnp.ones((batch,), bool),
        num_free=jnp.asarray(0, jnp.int32))


def decode_programs(args: argparse.Namespace) -> tuple[dict, dict]:
    """``(path, context, batch) -> (step, inputs)`` with ``step(state, x_t, cache) -> (y_t, cache)``, and each cache's
    bytes; the cache is the last input (donated)."""
    layer = _layer(args)
    graphdef, state = nnx.split(layer)
    dtype = jnp.dtype(args.dtype)

    def contiguous(state, x_t, cache):
        cache = dataclasses.replace(cache, length=jnp.asarray(cache.k.shape[1] - 1, jnp.int32))
        return nnx.merge(graphdef, state).decode(x_t, cache)

    def paged(state, x_t, cache):
        ctx = cache.max_pages_per_seq * cache.page_size
        cache = dataclasses.replace(cache, lengths=jnp.full_like(cache.lengths, ctx - 1))
        return paged_decode(nnx.merge(graphdef, state), x_t, cache, implementation="xla")

    programs, cache_bytes = {}, {}
    for ctx in args.contexts:
        for batch in args.batches:
            rng = np.random.default_rng(ctx + batch)
            x_t = jnp.asarray(rng.standard_normal((batch, 1, layer.d_model), np.float32), dtype)
            caches = {"contiguous": (contiguous, _contiguous(layer, batch, ctx, rng, dtype)),
                      "paged": (paged, _paged(layer, batch, ctx, args.page_size, rng, dtype))}
            for path, (step, cache) in caches.items():
                programs[(path, ctx, batch)] = (step, (state, x_t, cache))
                cache_bytes[(path, ctx, batch)] = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    return programs, cache_bytes


def _thunk(compiled: Callable, inputs: tuple) -> Callable:
    """A zero-argument run of ``compiled`` that threads its donated cache from run to run."""
    held = list(inputs)

    def run():
        y, held[-1] = compiled(*held)
        return y
    return run


def paged_section(args: argparse.Namespace) -> dict:
    """The ``paged`` section: contiguous vs paged decode steps at every context and batch, interleaved."""
    load_before = host.machine_load()
    programs, cache_bytes = decode_programs(args)
    thunks, memory = {}, {}
    for key, (step, inputs) in tqdm(programs.items(), desc="paged: compile", unit="program"):
        compiled = jax.jit(step, donate_argnums=(2,)).lower(*inputs).compile()
        memory[key] = memory_of(compiled).as_dict()
        thunks[key] = _thunk(compiled, inputs)
    del programs
    timings = time_thunks(thunks, repeats=args.repeats, warmup=1, max_seconds=args.max_seconds)
    rows = [{"path": path, "context": ctx, "batch": batch, "median_s": t.median_s, "repeats": t.repeats,
             "cache_bytes": cache_bytes[(path, ctx, batch)], "memory": memory[(path, ctx, batch)]}
            for (path, ctx, batch), t in timings.items()]
    ratio = {f"{ctx}x{batch}": timings[("paged", ctx, batch)].median_s / timings[("contiguous", ctx, batch)].median_s
             for ctx in args.contexts for batch in args.batches}
    results = {"rows": rows, "paged_over_contiguous": ratio, "load_before": load_before,
               "load_after": host.machine_load()}
    results["markdown"] = paged_markdown(results, args)
    return results


def _family_cache(layer: MultiHeadAttention, batch: int, ctx: int, rng: np.random.Generator, dtype):
    """``layer.init_cache(batch, ctx)`` filled with random keys/values (or a random state) and ``ctx − 1`` tokens."""
    cache = layer.init_cache(batch, ctx, dtype)
    length = jnp.asarray(ctx - 1, jnp.int32)
    if isinstance(cache, LinearCache):
        return LinearCache(jnp.asarray(rng.standard_normal(cache.state.shape, np.float32), cache.state.dtype), length)
    return _contiguous(layer, batch, ctx, rng, dtype)


def families_section(args: argparse.Namespace) -> dict:
    """The ``families`` section: each mechanism's decode step against softmax's, at every context, interleaved."""
    load_before = host.machine_load()
    dtype = jnp.dtype(args.dtype)
    thunks, memory, cache_bytes, paths = {}, {}, {}, {}
    for mechanism in ["softmax", *args.mechanisms]:
        layer = MultiHeadAttention(args.heads * args.head_dim, args.heads, num_kv_heads=args.kv_heads, rope=RoPE(),
                                   mechanism=mechanism, dtype=dtype, rngs=nnx.Rngs(0))
        paths[mechanism] = layer.decode_path()
        graphdef, state = nnx.split(layer)
        for ctx in args.contexts:
            def step(state, x_t, cache, graphdef=graphdef, length=ctx - 1):
                """The decode step with the cache reset to ``context − 1`` tokens, so every run is the same step."""
                cache = dataclasses.replace(cache, length=jnp.asarray(length, jnp.int32))
                return nnx.merge(graphdef, state).decode(x_t, cache)

            rng = np.random.default_rng(ctx)
            x_t = jnp.asarray(rng.standard_normal((args.family_batch, 1, layer.d_model), np.float32), dtype)
            cache = _family_cache(layer, args.family_batch, ctx, rng, dtype)
            inputs = (state, x_t, cache)
            key = (mechanism, ctx)
            compiled = jax.jit(step, donate_argnums=(2,)).lower(*inputs).compile()
            memory[key] = memory_of(compiled).as_dict()
            cache_bytes[key] = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
            thunks[key] = _thunk(compiled, inputs)
    timings = time_thunks(thunks, repeats=args.repeats, warmup=1, max_seconds=args.max_seconds)
    rows = [{"mechanism": m, "decode_path": paths[m], "context": ctx, "median_s": t.median_s, "repeats": t.repeats,
             "cache_bytes": cache_bytes[(m, ctx)], "memory": memory[(m, ctx)]} for (m, ctx), t in timings.items()]
    ratio = {f"{m}@{ctx}": timings[(m, ctx)].median_s / timings[("softmax", ctx)].median_s
             for m in args.mechanisms for ctx in args.contexts}
    results = {"rows": rows, "over_softmax": ratio, "load_before": load_before, "load_after": host.machine_load()}
    results["markdown"] = families_markdown(results, args)
    return results


def paged_markdown(res: dict, args: argparse.Namespace) -> str:
    """The section's markdown: setup, a table of both step times per context and batch, and the ratios."""
    def row(path, ctx, batch):
        return next(r for r in res["rows"] if (r["path"], r["context"], r["batch"]) == (path, ctx, batch))

    table = report.markdown_table(
        ["context", "B", "contiguous KVCache", "paged (xla)", "paged / contiguous", "cache contiguous", "cache paged",
         "peak memory contiguous", "peak memory paged"],
        [[ctx, batch, f"{row('contiguous', ctx, batch)['median_s'] * 1e3:.2f} ms",
          f"{row('paged', ctx, batch)['median_s'] * 1e3:.2f} ms (n={row('paged', ctx, batch)['repeats']})",
          f"**{res['paged_over_contiguous'][f'{ctx}x{batch}']:.2f}x**",
          report.format_bytes(row("contiguous", ctx, batch)["cache_bytes"]),
          report.format_bytes(row("paged", ctx, batch)["cache_bytes"]),
          report.format_bytes(row("contiguous", ctx, batch)["memory"]["peak"]),
          report.format_bytes(row("paged", ctx, batch)["memory"]["peak"])]
         for ctx in args.contexts for batch in args.batches])
    return "\n".join([
        "## paged (paged KV cache vs contiguous KVCache, one decode step)",
        "",
        f"One decode step of `MultiHeadAttention(d_model={args.heads * args.head_dim}, num_heads={args.heads}, "
        f"num_kv_heads={args.kv_heads}, rope=RoPE())`, {args.dtype}, projections included: `layer.decode` with a "
        "contiguous `KVCache` of `context` slots against `attnjax.inference.paged_decode` (attention: "
        "`attnjax.softmax.paged_attention(implementation=\"xla\")`, pages gathered block by block) with pages of "
        f"{args.page_size} tokens scattered at random over the pool. The token sits at position context − 1. "
        f"Medians of up to {args.repeats} rounds, every program interleaved round by round in one run; the caches "
        "are donated (updated in place).",
        "",
        host.load_note(res["load_before"], res["load_after"]),
        "",
        table,
        "",
        "Peak memory: XLA's compiled memory analysis of the step (arguments + outputs + temporaries − aliased "
        "buffers; the donated cache is aliased). `layer.decode` (softmax, no position bias) reads the filled slots "
        "of its cache in place (`MultiHeadAttention._attend_filled`: an online softmax over blocks taken with "
        "`dynamic_slice`). Before, it ran `paged_attention`'s xla path on the cache reshaped into pages, and that "
        "was 1.4-3x slower than `paged_decode`: in the compiled step (`compiled.as_text()`) XLA fused the write of "
        "the new token into the reshape that fed the attention loop, so the write ran twice, out of place, with "
        "eight copies of the full K and V caches (temporaries 8.4 MB at 4096 slots, B=1; peak 14.5 MiB against "
        "7.0 MiB paged, 386.6 MiB against 134.8 MiB at 16384, B=8). Reading the updated cache in its own layout "
        "leaves one in-place write (temporaries 0.5 MB, peak equal to the paged step's). The paged path reads the "
        "pool in place, gathering one block of pages per step of its scan.",
        "",
    ])


def families_markdown(res: dict, args: argparse.Namespace) -> str:
    """The section's markdown: setup, then per mechanism and context the step time and its ratio to softmax's."""
    def row(mechanism, ctx):
        return next(r for r in res["rows"] if (r["mechanism"], r["context"]) == (mechanism, ctx))

    table = report.markdown_table(
        ["mechanism", "decode path", "context", "step", "/ softmax", "cache", "peak memory"],
        [[m, row(m, ctx)["decode_path"], ctx, f"{row(m, ctx)['median_s'] * 1e3:.2f} ms (n={row(m, ctx)['repeats']})",
          "1.00x" if m == "softmax" else f"**{res['over_softmax'][f'{m}@{ctx}']:.2f}x**",
          report.format_bytes(row(m, ctx)["cache_bytes"]), report.format_bytes(row(m, ctx)["memory"]["peak"])]
         for m in ["softmax", *args.mechanisms] for ctx in args.contexts])
    return "\n".join([
        "## families (one decode step per mechanism family vs softmax)",
        "",
        f"One decode step of `MultiHeadAttention(d_model={args.heads * args.head_dim}, num_heads={args.heads}, "
        f"num_kv_heads={args.kv_heads}, rope=RoPE(), mechanism=X)` (registry default config), {args.dtype}, "
        f"batch {args.family_batch}, projections included, with the cache `init_cache` gives X "
        "(`MultiHeadAttention.decode_path`): a `KVCache` of `context` slots holding context − 1 tokens, or "
        "lightning's `LinearCache` state (its size and step do not depend on the context). "
        f"Medians of up to {args.repeats} rounds, every program interleaved round by round in one run; caches donated.",
        "",
        host.load_note(res["load_before"], res["load_after"]),
        "",
        table,
        "",
        "Paths: softmax reads the filled slots in place (an online softmax over blocks of the cache); softplus reads "
        "the whole cache with `Explicit(filled)`; stick_breaking first rolls the cache so the filled slots end at "
        "the query (a copy of K and V per step); sparse_window reads only the key blocks its pattern row lists "
        "(the same in-place online softmax over those blocks, `MultiHeadAttention._listed_blocks`), so its step "
        "does not grow with the context past its window; lightning is one state update.",
        "",
    ])


SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "paged": paged_section,
    "families": families_section,
}
"""Section name -> ``fn(args) -> results`` (a JSON-ready dict with a ``"markdown"`` entry), in report order."""


def markdown_report(sections: dict, device: dict) -> str:
    """The markdown file: the device, then each section's markdown in ``SECTIONS`` order."""
    body = [sections[name]["markdown"] for name in SECTIONS if name in sections]
    return "\n".join([
        f"# Decode step benchmarks (issue 22) ({device['device_kind']})",
        "",
        f"Device: `{device['device_kind']}` ({device['platform']}, {device['cpu_model']}), {device['cpu_count']} "
        f"CPUs, jax {device['jax_version']}. Sections may come from different runs (`--only`); each states its "
        "host load.",
        "",
        *(["CPU times are to be read as ratios only, not as absolute speeds.", ""]
          if device["platform"] == "cpu" else []),
        *body,
    ])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the selected sections; merge them into ``<out>/<name>.json`` (keeping the other sections' last results)
    and rewrite ``<out>/<name>.md``; print the report."""
    args = parse_args(argv)
    names = [args.only] if args.only else list(SECTIONS)
    out = Path(args.out)
    path = out / f"{args.name}.json"
    previous = json.loads(path.read_text())["sections"] if path.exists() else {}
    sections = {name: previous[name] for name in SECTIONS if name in previous}
    for name in names:
        sections[name] = dict(SECTIONS[name](args), settings=report.jsonable_args(args))
    device = dict(host.device_info(), cpu_model=host.cpu_model())
    md = markdown_report(sections, device)
    print(md)
    report.write_json({"device": device, "sections": sections}, f"{args.name}.json", out)
    (out / f"{args.name}.md").write_text(md)
    print(f"wrote {out / args.name}.{{json,md}}")
    return {"device": device, "sections": sections}


if __name__ == "__main__":
    main()
