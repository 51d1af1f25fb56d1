"""Issue 21's memory mechanisms: time vs T of their fast paths, one section per mechanism.

Sections (``--only NAME`` runs one; the others keep their last results in the JSON and markdown):

- ``neural_memory``: Titans' linear neural memory, ``attnjax.memory.neural_memory`` (chunk-parallel "xla" path),
  forward + backward (gradients of ``sum(out * w)`` wrt q, k, v and the three gates), B=1, H=2, Dk=Dv=64 by default.
  First the chunk sizes ``--nm-chunk-sizes`` are timed at ``--nm-reference-len`` and the fastest is kept; then the
  chunked path is timed at every ``--seq-lens`` and the token-by-token ``neural_memory_reference`` (same chunk size)
  at ``--nm-reference-len``, all interleaved round by round (a change in the host's load shifts every T alike). It
  reports the log-log slope of time vs T (``experiments.lib.slopes``; the issue's target: at most 1.15), the
  reference's time over the chunked path's at ``--nm-reference-len``, and XLA's compiled peak memory.
- ``rat``: RAT, ``attnjax.memory.rat`` at ``--rat-chunk-size`` (16, the paper's headline setting) against causal
  softmax ``attnjax.attention(..., implementation="xla")``: forward + backward (gradients wrt q, k, v and RAT's gate)
  at every ``--rat-seq-lens``, and one decode step at position ``--rat-decode-context`` − 1 of ``nn.memory.RAT``
  against ``nn.MultiHeadAttention`` (same d_model and heads); the speedups, measured in one interleaved run, beside
  the paper's 7x (training, 100K tokens) and 9x (generation, 4K position).

    python -m experiments.bench_memory                     # every section
    python -m experiments.bench_memory --only neural_memory
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from attnjax import attention, masks
from attnjax.memory import neural_memory, neural_memory_reference, rat
from attnjax.nn import MultiHeadAttention
from attnjax.nn.memory import RAT
from experiments.lib import cli, host, report
from experiments.lib.measure import compile_fn, memory_of
from experiments.lib.slopes import fit_slope, format_fit

NM_TARGET_SLOPE = 1.15
"""Issue 21's bound on the chunked neural memory's log-log slope of time vs T."""

SMOKE = {"seq_lens": [64, 128], "heads": 2, "head_dim": 8, "repeats": 1, "max_seconds": 1.0,
         "nm_chunk_sizes": [8, 16], "nm_reference_len": 64,
         "rat_seq_lens": [64, 128], "rat_decode_context": 128}
"""``--smoke`` defaults: tiny sizes that check the benchmark runs, in seconds (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = cli.benchmark_parser(__doc__, [1024, 2048, 4096, 8192, 16384], heads=2, head_dim=64)
    p.add_argument("--only", choices=list(SECTIONS), default=None, help="run one section (default: all)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="a section's interleaved rounds stop once they pass this many seconds (at least one round)")
    p.add_argument("--nm-chunk-sizes", type=cli.parse_ints, default=[16, 32, 64, 128],
                   help="neural_memory: candidate chunk sizes, timed at --nm-reference-len; the fastest is used")
    p.add_argument("--nm-reference-len", type=int, default=4096,
                   help="neural_memory: T where the token recurrence is timed against the chunked path (one of "
                        "--seq-lens)")
    p.add_argument("--rat-seq-lens", type=cli.parse_ints, default=[4096, 16384],
                   help="rat: sequence lengths of the forward + backward comparison with causal softmax")
    p.add_argument("--rat-chunk-size", type=int, default=16, help="rat: the chunk size L")
    p.add_argument("--rat-decode-context", type=int, default=4096,
                   help="rat: context length of the decode-step comparison (position context − 1, caches that size)")
    cli.add_output_flags(p, "bench_memory")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    if args.nm_reference_len not in args.seq_lens:
        p.error(f"--nm-reference-len {args.nm_reference_len} must be one of --seq-lens {args.seq_lens}")
    return args


def memory_inputs(seq_len: int, args: argparse.Namespace) -> tuple:
    """q, k, v ``[B, T, H, D]`` (k ℓ2-normalized, as Titans normalizes keys), gates θ, η, α ``[B, T, H]`` (θ ~ 0.1,
    η in (0.5, 1), α ~ 0.02 so that the memory stays bounded), and the cotangent ``w``; seeded by ``seq_len``."""
    rng = np.random.default_rng(seq_len)
    B, H, D = args.batch, args.heads, args.head_dim
    q, k, v = (rng.standard_normal((B, seq_len, H, D)).astype(np.float32) for _ in range(3))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    gates = [c * sig(rng.standard_normal((B, seq_len, H))).astype(np.float32) for c in (0.2, 1.0, 0.04)]
    gates[1] = 0.5 + 0.5 * gates[1]
    dtype = jnp.dtype(args.dtype)
    return (*(jnp.asarray(a, dtype) for a in (q, k, v, *gates)), jnp.ones((B, seq_len, H, D), jnp.float32))


def memory_grads(fn: Callable) -> Callable:
    """``(q, k, v, lr, momentum, decay, w) -> gradients of sum(fn(...) * w)`` wrt the six inputs."""
    def loss(*xs):
        return jnp.sum(fn(*xs[:6]).astype(jnp.float32) * xs[6])
    return jax.grad(loss, argnums=tuple(range(6)))


def interleaved(thunks: dict, repeats: int, max_seconds: float) -> dict:
    """``{key: {"wall": [seconds, ...], "cpu": [seconds, ...]}}``: rounds of one run per warmed-up thunk, up to
    ``repeats`` rounds or until the rounds pass ``max_seconds`` of wall time (at least one round). ``cpu`` is this
    process's CPU time over the run (every thread): on a shared host it grows with the work done, not with the time
    other jobs held the cores, so its slope is a cross-check of the wall-time slope."""
    samples = {key: {"wall": [], "cpu": []} for key in thunks}
    spent = 0.0
    for _ in range(max(repeats, 1)):
        for key, thunk in thunks.items():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(thunk())
            samples[key]["wall"].append(time.perf_counter() - wall)
            samples[key]["cpu"].append(time.process_time() - cpu)
            spent += samples[key]["wall"][-1]
        if spent > max_seconds:
            break
    return samples


def _compile_and_warm(programs: dict, desc: str) -> tuple[dict, dict]:
    """Compile each ``key -> (fn, args)`` and run it once; returns the thunks and each one's compiled memory."""
    thunks, memory = {}, {}
    for key, (fn, xs) in tqdm(programs.items(), desc=desc, unit="program"):
        compiled = compile_fn(fn, *xs)
        memory[key] = memory_of(compiled).as_dict()
        thunks[key] = lambda c=compiled, xs=xs: c(*xs)
        jax.block_until_ready(thunks[key]())
    return thunks, memory


def neural_memory_section(args: argparse.Namespace) -> dict:
    """The ``neural_memory`` section: chunk-size pick, chunked times at every T, the token recurrence at one T."""
    load_before = host.machine_load()
    ref_len = args.nm_reference_len

    def chunked(c):
        return memory_grads(functools.partial(neural_memory, chunk_size=c, implementation="xla"))

    xs_ref = memory_inputs(ref_len, args)
    thunks, _ = _compile_and_warm({c: (chunked(c), xs_ref) for c in args.nm_chunk_sizes},
                                  "neural_memory: chunk sizes")
    pick = {c: statistics.median(s["wall"]) for c, s in interleaved(thunks, args.repeats, args.max_seconds).items()}
    chunk = min(pick, key=pick.get)

    programs = {("xla", t): (chunked(chunk), memory_inputs(t, args)) for t in args.seq_lens}
    programs[("reference", ref_len)] = (
        memory_grads(functools.partial(neural_memory_reference, chunk_size=chunk)), xs_ref)
    thunks, memory = _compile_and_warm(programs, f"neural_memory: chunk {chunk}, every T")
    samples = interleaved(thunks, args.repeats, args.max_seconds)
    rows = [{"T": t, "mode": "fwd_bwd", "path": path, "run": True, "median_s": statistics.median(s["wall"]),
             "cpu_median_s": statistics.median(s["cpu"]), "samples_s": s["wall"], "cpu_samples_s": s["cpu"],
             "repeats": len(s["wall"]), "memory": memory[(path, t)]} for (path, t), s in samples.items()]
    fit = fit_slope([(r["T"], r["median_s"]) for r in rows if r["path"] == "xla"])
    cpu_fit = fit_slope([(r["T"], r["cpu_median_s"]) for r in rows if r["path"] == "xla"])
    times = {(r["path"], r["T"]): r["median_s"] for r in rows}
    ratio = times[("reference", ref_len)] / times[("xla", ref_len)]
    results = {
        "chunk_size": chunk, "chunk_size_times_s": {str(c): s for c, s in pick.items()}, "rows": rows, "slope": fit,
        "cpu_time_slope": cpu_fit,
        "target_slope": NM_TARGET_SLOPE, "met": None if fit is None else fit["slope"] <= NM_TARGET_SLOPE,
        "reference_len": ref_len, "reference_over_chunked": ratio,
        "load_before": load_before, "load_after": host.machine_load(),
    }
    results["markdown"] = neural_memory_markdown(results, args)
    return results


def neural_memory_markdown(res: dict, args: argparse.Namespace) -> str:
    """The section's markdown: setup, chunk-size pick, times and memory per T, slope verdict, ratio."""
    chunked = sorted((r for r in res["rows"] if r["path"] == "xla"), key=lambda r: r["T"])
    ref = next(r for r in res["rows"] if r["path"] == "reference")
    times_cpu = next(r["cpu_median_s"] for r in chunked if r["T"] == res["reference_len"])
    slope = res["slope"]
    verdict = "not measured" if res["met"] is None else "met" if res["met"] else "**NOT met**"
    headers = ["path", *(f"T={r['T']}" for r in chunked)]
    times = report.markdown_table(headers, [
        [f"xla (chunk {res['chunk_size']})", *(f"{r['median_s'] * 1e3:.1f} ms (n={r['repeats']})" for r in chunked)],
        ["process CPU time", *(f"{r['cpu_median_s'] * 1e3:.1f} ms" for r in chunked)],
        ["peak memory", *(report.format_bytes(r["memory"]["peak"]) for r in chunked)],
        ["growth vs previous T", "-", *(f"{b['median_s'] / a['median_s']:.2f}x" for a, b in zip(chunked, chunked[1:]))],
    ])
    picks = report.markdown_table(["chunk size", *res["chunk_size_times_s"]],
                                  [[f"time at T={res['reference_len']}",
                                    *(f"{s * 1e3:.1f} ms" for s in res["chunk_size_times_s"].values())]])
    return "\n".join([
        "## neural_memory (Titans linear memory, chunk-parallel)",
        "",
        f"Forward + backward (gradients of sum(out * w) wrt q, k, v, lr, momentum, decay), B={args.batch}, "
        f"H={args.heads}, Dk=Dv={args.head_dim}, {args.dtype}; keys ℓ2-normalized, θ ≈ 0.1, η in (0.5, 1), "
        f"α ≈ 0.02. Medians of up to {args.repeats} runs interleaved over every T and the reference.",
        "",
        host.load_note(res["load_before"], res["load_after"]),
        "",
        f"Chunk size: the fastest of {', '.join(res['chunk_size_times_s'])} at T={res['reference_len']} "
        f"(forward + backward; the chunk size also changes the model, Titans Section 3.2):",
        "",
        picks,
        "",
        times,
        "",
        f"- Slope of the chunked path, T={chunked[0]['T']}-{chunked[-1]['T']}: {format_fit(slope)}; target <= "
        f"{res['target_slope']:g}: {verdict}. Slope of the process CPU time (all threads; less sensitive to the other "
        f"jobs on the host): {format_fit(res['cpu_time_slope'])}.",
        f"- Token recurrence (`neural_memory_reference`, same chunk size) at T={res['reference_len']}: "
        f"{ref['median_s'] * 1e3:.1f} ms (n={ref['repeats']}), **{res['reference_over_chunked']:.3g}x** the chunked "
        f"path's time ({report.format_bytes(ref['memory']['peak'])} peak memory; process CPU time "
        f"{ref['cpu_median_s'] / times_cpu:.3g}x).",
        "",
    ])


RAT_PAPER_CLAIMS = {"train": 7.0, "train_len": 100_000, "decode": 9.0, "decode_len": 4096, "chunk_size": 16}
"""Wei et al. 2025 (abstract): with chunk size 16, the RAT layer trains 7x faster than
attention at 100K tokens and generates 9x faster at the 4K position (official benchmark
``src/benchmark_eff/rat_eff.py``: d_model 2048, 16 heads of 128, bf16, torch.compile, on a GPU)."""


def rat_train_programs(seq_len: int, args: argparse.Namespace) -> dict:
    """``path -> (fn, inputs)`` for forward + backward at ``seq_len``: RAT (gradients wrt q, k, v and the gate) and
    causal softmax ``attnjax.attention(..., implementation="xla")`` (wrt q, k, v), on the same q, k, v."""
    rng = np.random.default_rng(seq_len)
    B, H, D = args.batch, args.heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    q, k, v, g = (jnp.asarray(rng.standard_normal((B, seq_len, H, D)), dtype) for _ in range(4))
    gate = jax.nn.sigmoid(g + 1.5)
    w = jnp.asarray(rng.standard_normal((B, seq_len, H, D)), jnp.float32)

    def grads(fn: Callable, n: int) -> Callable:
        def loss(*xs):
            return jnp.sum(fn(*xs[:n]).astype(jnp.float32) * xs[n])
        return jax.grad(loss, argnums=tuple(range(n)))

    chunked = functools.partial(rat, chunk_size=args.rat_chunk_size)
    softmax = functools.partial(attention, mask=masks.Causal(), implementation="xla")
    return {("rat", seq_len): (grads(chunked, 4), (q, k, v, gate, w)),
            ("softmax", seq_len): (grads(softmax, 3), (q, k, v, w))}


def rat_decode_programs(args: argparse.Namespace) -> tuple[dict, dict]:
    """One decode step at position ``--rat-decode-context − 1`` of a ``RAT`` layer and of a
    ``MultiHeadAttention`` layer (same d_model = heads · head_dim, same heads, no RoPE), each with a cache for
    ``--rat-decode-context`` tokens filled with random states; returns the programs and each cache's bytes."""
    B, H, D, ctx = args.batch, args.heads, args.head_dim, args.rat_decode_context
    d_model, dtype = H * D, jnp.dtype(args.dtype)
    layers = {"rat": RAT(d_model, H, chunk_size=args.rat_chunk_size, rngs=nnx.Rngs(0)),
              "softmax": MultiHeadAttention(d_model, H, rngs=nnx.Rngs(0))}
    rng = np.random.default_rng(ctx)
    x_t = jnp.asarray(rng.standard_normal((B, 1, d_model)), dtype)
    programs, cache_bytes = {}, {}
    for path, layer in layers.items():
        cache = layer.init_cache(B, ctx, dtype)
        cache = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype)
                             if jnp.issubdtype(a.dtype, jnp.floating) else a, cache)
        cache = dataclasses.replace(cache, length=jnp.asarray(ctx - 1, jnp.int32))
        graphdef, state = nnx.split(layer)

        def step(state, x_t, cache, graphdef=graphdef):
            return nnx.merge(graphdef, state).decode(x_t, cache)

        programs[("decode", path)] = (step, (state, x_t, cache))
        cache_bytes[path] = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    return programs, cache_bytes


def rat_section(args: argparse.Namespace) -> dict:
    """The ``rat`` section: RAT vs causal softmax, forward + backward at every ``--rat-seq-lens`` and one decode
    step at ``--rat-decode-context``, all interleaved in one run."""
    load_before = host.machine_load()
    programs = {}
    for t in args.rat_seq_lens:
        programs.update(rat_train_programs(t, args))
    decode, cache_bytes = rat_decode_programs(args)
    programs.update(decode)
    thunks, memory = _compile_and_warm(programs, f"rat: chunk {args.rat_chunk_size}")
    samples = interleaved(thunks, args.repeats, args.max_seconds)
    wall = {key: statistics.median(s["wall"]) for key, s in samples.items()}
    cpu = {key: statistics.median(s["cpu"]) for key, s in samples.items()}

    def row(key, mode, path, t, **extra):
        return {"T": t, "mode": mode, "path": path, "median_s": wall[key], "median_cpu_s": cpu[key],
                "samples_s": samples[key]["wall"], "samples_cpu_s": samples[key]["cpu"],
                "repeats": len(samples[key]["wall"]), "memory": memory[key], **extra}

    rows = [row(key, "fwd_bwd", key[0], key[1]) for key in samples if key[0] != "decode"]
    rows += [row(key, "decode", key[1], args.rat_decode_context, cache_bytes=cache_bytes[key[1]])
             for key in samples if key[0] == "decode"]
    speedup = {clock: {str(t): times[("softmax", t)] / times[("rat", t)] for t in args.rat_seq_lens}
               for clock, times in (("wall", wall), ("cpu", cpu))}
    results = {
        "chunk_size": args.rat_chunk_size, "rows": rows, "train_speedup": speedup["wall"],
        "train_speedup_cpu": speedup["cpu"],
        "decode_speedup": wall[("decode", "softmax")] / wall[("decode", "rat")],
        "decode_speedup_cpu": cpu[("decode", "softmax")] / cpu[("decode", "rat")],
        "paper": RAT_PAPER_CLAIMS, "load_before": load_before, "load_after": host.machine_load(),
    }
    results["markdown"] = rat_markdown(results, args)
    return results


def rat_markdown(res: dict, args: argparse.Namespace) -> str:
    """The section's markdown: setup, forward + backward and decode times with the speedups, the paper's claims."""
    def row(mode, path, t):
        return next(r for r in res["rows"] if r["mode"] == mode and r["path"] == path and r["T"] == t)

    def cell(r):
        return f"{r['median_s'] * 1e3:.2f} ms (n={r['repeats']})"

    train = report.markdown_table(
        ["T", "RAT (chunk %d)" % res["chunk_size"], "softmax xla causal", "softmax / RAT (wall)",
         "softmax / RAT (CPU time)", "peak memory RAT", "peak memory softmax"],
        [[t, cell(row("fwd_bwd", "rat", t)), cell(row("fwd_bwd", "softmax", t)),
          f"**{res['train_speedup'][str(t)]:.2f}x**", f"{res['train_speedup_cpu'][str(t)]:.2f}x",
          report.format_bytes(row("fwd_bwd", "rat", t)["memory"]["peak"]),
          report.format_bytes(row("fwd_bwd", "softmax", t)["memory"]["peak"])] for t in args.rat_seq_lens])
    ctx = args.rat_decode_context
    rat_dec, mha_dec = row("decode", "rat", ctx), row("decode", "softmax", ctx)
    decode = report.markdown_table(
        ["context", "RAT.decode", "MultiHeadAttention.decode", "MHA / RAT (wall)", "MHA / RAT (CPU time)",
         "cache RAT", "cache MHA"],
        [[ctx, cell(rat_dec), cell(mha_dec), f"**{res['decode_speedup']:.2f}x**", f"{res['decode_speedup_cpu']:.2f}x",
          report.format_bytes(rat_dec["cache_bytes"]), report.format_bytes(mha_dec["cache_bytes"])]])
    paper = res["paper"]
    return "\n".join([
        "## rat (RAT: recurrence within chunks, attention across chunks)",
        "",
        f"Training: forward + backward of the functional core, gradients of sum(out * w) wrt q, k, v (and RAT's "
        f"gate), `attnjax.memory.rat(..., chunk_size={res['chunk_size']})` against "
        f"`attnjax.attention(..., implementation=\"xla\", mask=Causal())`, B={args.batch}, H={args.heads}, "
        f"D={args.head_dim}, {args.dtype}. Decode: one step of the layers (projections included) at position "
        f"{ctx - 1}, `attnjax.nn.memory.RAT` (cache of {-(-ctx // res['chunk_size'])} chunk states) against "
        f"`attnjax.nn.MultiHeadAttention` (KV cache of {ctx} tokens), d_model={args.heads * args.head_dim}, "
        f"{args.heads} heads, B={args.batch}, no RoPE. Medians of up to {args.repeats} runs, every program interleaved "
        "round by round in one run; wall time, and this process's CPU time as a cross-check on a shared host.",
        "",
        host.load_note(res["load_before"], res["load_after"]),
        "",
        train,
        "",
        decode,
        "",
        f"The paper's claims at chunk {paper['chunk_size']}: **{paper['train']:g}x** faster training at "
        f"{paper['train_len'] // 1000}K tokens and **{paper['decode']:g}x** faster generation at the "
        f"{paper['decode_len'] // 1024}K position, for the whole layer on a GPU (official benchmark: d_model 2048, "
        "16 heads of 128, bf16, torch.compile; generation at batch 64). This CPU run is not that setting: far "
        "shorter sequences for training (the gap grows with T, since softmax is O(T²) and RAT O(T²/L)), tiny "
        "heads, batch 1, where the projections and per-op overheads weigh more than the attention itself.",
        "",
    ])


SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "neural_memory": neural_memory_section,
    "rat": rat_section,
}
"""Section name -> ``fn(args) -> results`` (a JSON-ready dict with a ``"markdown"`` entry), in report order."""


def markdown_report(sections: dict, device: dict) -> str:
    """The markdown file: the device, then each section's markdown in ``SECTIONS`` order."""
    body = [sections[name]["markdown"] for name in SECTIONS if name in sections]
    return "\n".join([
        f"# Memory mechanisms (issue 21): time vs T ({device['device_kind']})",
        "",
        f"Device: `{device['device_kind']}` ({device['platform']}, {device['cpu_model']}), {device['cpu_count']} "
        f"CPUs, jax {device['jax_version']}. Sections may come from different runs (`--only`); each states its "
        "host load.",
        "",
        *(["CPU times are to be read as ratios and slopes only, not as absolute speeds.", ""]
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
