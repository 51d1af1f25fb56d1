"""Block-sparse benchmark: each selector's density and its time against dense blocked softmax.

For every registered selector (family "sparse", default config: block selectors and token
selectors), for 2-D neighbourhood attention and for the token-bucket engine on random buckets
(``buckets``: ``--buckets`` equal-probability buckets per head, not causal, density ``1/--buckets``;
issue 18's target: at most 0.35× the dense time at density 1/8), at each sequence length T, in one run:

- **density**: the tiles the lists visit, as a fraction of the tiles the dense baseline computes
  (the lower triangle of the ``block × block`` tile grid for causal selectors; all tiles for
  neighbourhood attention, which is not causal);
- **engine** time: ``block_sparse_attention(..., implementation=--implementation)`` on lists
  computed beforehand (what a kernel costs at that density); token selectors run
  ``token_sparse_attention`` on their selection (its ``xla`` path);
- **selected** time: the whole mechanism, ``attnjax.attention(mechanism=config)``, selection
  included (content-based selectors score blocks first; the oracle ``seer`` even runs a dense
  pass);
- **baseline**: dense blocked softmax ``flash_attention_xla`` with the same mask, as a ratio
  ``baseline / engine`` (the speedup). Target (issue 7): speedup ≥ 0.7 × (1 / density) wherever
  density ≤ 0.25.

Inputs are random normal, so content-based selectors (XAttention, Seer, MoBA, …) choose from
unstructured attention; their density here is what their default thresholds give on such data.
Causal selectors run with ``mask=Causal()``. Neighbourhood attention runs on a 2-D grid
(``--na-kernel``) of ``T`` tokens, as square as ``T`` allows.

    python -m experiments.bench_sparse --seq-lens 8k,16k,32k --heads 4 --head-dim 64

``--key-lists`` runs a separate comparison instead (``bench_sparse_<backend>_key_lists``): per-query key
lists of ``T / f`` keys for each ``f`` in ``--key-fractions``, under ``Causal()``, from DMA
(``dynamic_mask_lists``), SPT (``Spt(top_l=K)``), Sparsifiner (``connectivity_lists``), uniform random
lists (the block path's worst case) and each query's ``K`` latest keys (``local``, its best case), each
run by the token engine's block path (``key_path="blocks"``: block union + bitmask), its gather path
(``"gather"``) and dense causal ``flash_attention_xla``, timed interleaved round by round (selection
excluded: both paths run the same lists). The selectors see random-but-structured inputs
(``structured_qkv``: q, k and v share a stationary latent that drifts along the sequence, so nearby
tokens are similar), with untrained predictor weights (DMA: random ``W_Δ``; Sparsifiner: random channel
reductions and a token basis that averages contiguous segments of ``--segment`` keys, the smooth basis
a distilled predictor approaches).

    python -m experiments.bench_sparse --key-lists --seq-lens 4k,8k
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from attnjax import masks, registry
from attnjax.api import attention
from attnjax.local import Neighborhood, NeighborhoodMask
from attnjax.softmax import flash_attention_xla
from attnjax.sparse import (BlockSelector, BlockSparse, Buckets, KeyLists, TokenSelector, block_sparse_attention,
                            connectivity_lists, connectivity_scores, density, dynamic_mask_bias, dynamic_mask_lists,
                            pair_density, token_sparse_attention)
from attnjax.sparse.spt import Spt
from attnjax.sparse.tokens import GATHER_COST_RATIO, choose_key_path, key_list_blocks
from experiments.lib import cli, flops, host, measure, plots, report, workload

TARGET_FACTOR, TARGET_DENSITY = 0.7, 0.25
SMOKE = {"seq_lens": [512, 1024], "heads": 2, "head_dim": 16, "repeats": 1, "max_seconds": 1.0,
         "mechanisms": ["sparse_window", "moba"]}
"""``--smoke`` defaults: tiny sizes and two selectors, checks that it runs (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = cli.benchmark_parser(__doc__, [8192, 16384, 32768], heads=4)
    p.add_argument("--mechanisms", type=lambda s: s.split(","), default=None,
                   help="comma-separated selectors and/or 'neighborhood' (default: every sparse selector and "
                        "neighborhood)")
    p.add_argument("--implementation", default="xla", choices=["xla", "pallas"], help="engine path to time")
    p.add_argument("--buckets", type=int, default=8, help="buckets per head of the random-bucket engine case")
    p.add_argument("--na-kernel", type=int, default=13, help="neighbourhood kernel size per axis (2-D grid)")
    p.add_argument("--block", type=int, default=None,
                   help="block size for every selector (block_q = block_kv; their other fields keep their defaults) "
                        "and 8 x (block/8) neighbourhood tiles (default: each one's own default, 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="stop repeating a measurement after this")
    p.add_argument("--memory-budget-gib", type=float, default=8.0,
                   help="run a path only if its compiled peak memory is below this")
    p.add_argument("--time-budget-s", type=float, default=30.0,
                   help="time a path at the next T only while its predicted single run (linear in T·density·T) fits")
    p.add_argument("--key-lists", action="store_true",
                   help="run the key-list comparison (block path vs gather path vs dense) instead")
    p.add_argument("--key-fractions", type=cli.parse_ints, default=[8, 32],
                   help="--key-lists: keys per query K = T / f for each f (comma-separated)")
    p.add_argument("--latent-span", type=float, default=256.0,
                   help="--key-lists: correlation length (tokens) of the structured inputs' latent")
    p.add_argument("--segment", type=int, default=64, help="--key-lists: Sparsifiner's token-basis segment")
    cli.add_output_flags(p, "bench_sparse")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    if args.key_lists and args.name == p.get_default("name"):
        args.name = f"{args.name}_key_lists"
    return args


def grid_2d(T: int) -> tuple[int, int]:
    """The most square ``(rows, cols)`` with ``rows · cols == T``."""
    rows = max(r for r in range(1, math.isqrt(T) + 1) if T % r == 0)
    return rows, T // rows


def cases(args: argparse.Namespace) -> dict[str, registry.Mechanism]:
    """Mechanism name -> config to benchmark: every sparse selector's default (block and token selectors;
    with ``--block``, at that block size), 2-D neighbourhood and random buckets. The factorized sparse
    mechanisms (Combiner, CCA) have no selection to time apart; ``experiments.bench_factorized`` times them."""
    selectors = {e.name: e.config() for e in registry.entries()
                 if e.family == "sparse" and issubclass(e.config, (BlockSelector, TokenSelector))}
    names = args.mechanisms or list(selectors) + ["neighborhood", "buckets"]
    unknown = set(names) - set(selectors) - {"neighborhood", "buckets"}
    if unknown:
        raise SystemExit(f"unknown --mechanisms {sorted(unknown)}; choose from {sorted(selectors)}, neighborhood "
                         "or buckets")
    if args.block:
        selectors = {n: dataclasses.replace(c, block_q=args.block, block_kv=args.block) if hasattr(c, "block_q") else c
                     for n, c in selectors.items()}
    return {n: selectors.get(n) for n in names}


def na_tile(args: argparse.Namespace) -> Optional[tuple[int, int]]:
    """The 2-D neighbourhood tile: ``8 × (block / 8)`` under ``--block``, else the default."""
    return (8, args.block // 8) if args.block else None


def setup(name: str, config, q, k, T: int, args: argparse.Namespace):
    """``(config, mask, lists)`` of one case at length ``T``; neighbourhood gets its 2-D grid here."""
    if name == "neighborhood":
        grid, tile = grid_2d(T), na_tile(args)
        return (Neighborhood(kernel_size=args.na_kernel, grid=grid, tile_shape=tile), None,
                NeighborhoodMask(grid, args.na_kernel, tile_shape=tile).block_lists())
    mask = masks.Causal()
    if name == "buckets":
        mask = None
        B, H = q.shape[0], q.shape[2]
        ids = np.random.default_rng(T).integers(0, args.buckets, (2, B, H, T)).astype(np.int32)
        return None, mask, Buckets(jnp.asarray(ids[0]), jnp.asarray(ids[1]), args.buckets)
    return config, mask, config.select(q, k, mask=mask)


def relative_density(selection, causal: bool) -> float:
    """Block lists: visited tiles over the tiles the dense baseline computes (lower triangle when
    causal). A token selection (``Buckets``, ``KeyLists``): selected pairs over the baseline's pairs."""
    if not isinstance(selection, BlockSparse):
        T, S = selection_lengths(selection)
        return pair_density(selection, T, S, causal=causal)
    blocks = selection
    nq, nk = blocks.num_q_blocks, blocks.num_kv_blocks
    baseline = (nk * (nk + 1) / 2 - (nk - nq) * (nk - nq + 1) / 2) if causal else nq * nk
    return float(density(blocks)) * nq * nk / baseline


def selection_lengths(selection) -> tuple[int, int]:
    """``(T, S)`` of a token selection (the bench is self-attention, so ``S = T``)."""
    ids = getattr(selection, "q_ids", None)
    T = ids.shape[-1] if ids is not None else selection.indices.shape[2]
    return T, T


def mechanism_fn(config, mask, implementation: str) -> Callable:
    """``(q, k, v) -> out``: ``attnjax.attention`` with this mechanism, mask and implementation."""
    return lambda q, k, v: attention(q, k, v, mechanism=config, mask=mask, implementation=implementation)


def path_fns(name: str, config, mask, blocks: BlockSparse, implementation: str) -> dict[str, Callable]:
    """``(q, k, v) -> out`` of the engine on given lists, the whole mechanism, and the dense baseline.

    Neighbourhood attention's lists are static and free to build, so its engine path is the mechanism itself.
    The random buckets' functions take the bucket ids as two more arguments (``bucket_ids``), so that their sorts
    run in the timed call rather than being folded into the compiled constants.
    """
    if name == "buckets":
        def engine(q, k, v, q_ids, kv_ids):
            return token_sparse_attention(q, k, v, Buckets(q_ids, kv_ids, blocks.num_buckets), mask=mask,
                                          implementation="xla")
        return {"engine": engine, "selected": engine,
                "dense": lambda q, k, v, *_: flash_attention_xla(q, k, v, mask=mask)}
    selected = mechanism_fn(config, mask, implementation)
    if name == "neighborhood":
        engine = selected
    elif not isinstance(blocks, BlockSparse):
        tiles = {f: getattr(config, f) for f in ("block_q", "block_kv") if hasattr(config, f)}

        def engine(q, k, v):
            return token_sparse_attention(q, k, v, blocks, mask=mask, implementation=implementation, **tiles)
    else:
        def engine(q, k, v):
            return block_sparse_attention(q, k, v, blocks, mask=mask, implementation=implementation)
    return {"engine": engine, "selected": selected, "dense": lambda q, k, v: flash_attention_xla(q, k, v, mask=mask)}


def bucket_ids(selection) -> tuple:
    """``(q_ids, kv_ids)`` of a ``Buckets`` selection (the extra arguments of its functions), else ``()``."""
    return (selection.q_ids, selection.kv_ids) if isinstance(selection, Buckets) else ()


def run(args: argparse.Namespace) -> list[dict]:
    """One case per (mechanism, T): density, times per path, speedups and the target verdict."""
    configs = cases(args)
    rows, last = [], {}
    dense_times: dict[tuple, float] = {}
    bar = tqdm(total=len(args.seq_lens) * len(configs), desc="bench_sparse", unit="case")
    for T in args.seq_lens:
        q, k, v = workload.host_random_qkv(T, args.batch, T, args.heads, args.head_dim, args.dtype)
        for name, config in configs.items():
            bar.set_postfix(T=T, mechanism=name)
            cfg, mask, blocks = setup(name, config, q, k, T, args)
            fns = path_fns(name, cfg, mask, blocks, args.implementation)
            inputs = (q, k, v) + bucket_ids(blocks)
            row = {"mechanism": name, "T": T, "causal": mask is not None,
                   "density_of_all_tiles": float(density(blocks)) if isinstance(blocks, BlockSparse) else None,
                   "density": relative_density(blocks, causal=mask is not None), "seconds": {}}
            for path, fn in fns.items():
                key = (name if path != "dense" else f"dense/{row['causal']}", path)
                predicted = None if key not in last else last[key][1] * (T / last[key][0]) ** 2
                if predicted is not None and predicted > args.time_budget_s:
                    row["seconds"][path] = None
                    continue
                if path == "dense" and (T, row["causal"]) in dense_times:
                    row["seconds"][path] = dense_times[T, row["causal"]]
                    continue
                compiled = measure.compile_fn(fn, *inputs)
                peak = measure.memory_of(compiled).peak
                if peak > args.memory_budget_gib * measure.GIB:
                    row["seconds"][path] = None
                    row.setdefault("not_run", {})[path] = f"needs {report.format_bytes(peak)}"
                    continue
                timing = measure.time_thunks({path: lambda: compiled(*inputs)}, repeats=args.repeats,
                                            max_seconds=args.max_seconds)[path]
                row["seconds"][path] = timing.median_s
                last[key] = (T, timing.median_s)
                if path == "dense":
                    dense_times[T, row["causal"]] = timing.median_s
            rows.append(finish_row(row))
            bar.update()
    bar.close()
    return rows


def finish_row(row: dict) -> dict:
    """Add speedups (dense / path) and the target verdict to a row of times."""
    sec = row["seconds"]
    for path in ("engine", "selected"):
        row[f"speedup_{path}"] = sec["dense"] / sec[path] if sec.get("dense") and sec.get(path) else None
    row["target_speedup"] = TARGET_FACTOR / row["density"] if row["density"] > 0 else None
    if row["density"] > TARGET_DENSITY:
        row["target"] = "n/a (density > 0.25)"
    elif row["speedup_engine"] is None:
        row["target"] = "not timed"
    else:
        row["target"] = "met" if row["speedup_engine"] >= row["target_speedup"] else "missed"
    return row


def timing_rows(cases: Sequence[dict], args: argparse.Namespace) -> list[dict]:
    """One row per timed (mechanism, T, path), in the shape ``experiments.bench`` reads: ``T``, ``mode``,
    ``path``, ``median_s``, ``causal`` and ``flops`` (the FLOPs of the tiles the path computes: dense
    causal or full for the baseline, ``density`` times that for the sparse paths)."""
    rows = []
    for c in cases:
        dense_flops = flops.attention_flops(args.batch, args.heads, c["T"], c["T"], args.head_dim, causal=c["causal"],
                                             mode="fwd")
        for path, seconds in c["seconds"].items():
            if seconds is None:
                continue
            label = "dense/xla" if path == "dense" else f"{c['mechanism']}/{path}"
            work = dense_flops if path == "dense" else dense_flops * c["density"]
            rows.append({"T": c["T"], "mode": "fwd", "path": label, "median_s": seconds, "causal": c["causal"],
                         "flops": work})
    return list({(r["T"], r["path"]): r for r in rows}.values())


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f} ms"


def _x(ratio: Optional[float]) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def markdown(rows: Sequence[dict], args: argparse.Namespace, device: dict, load: tuple[dict, dict]) -> str:
    """The report: settings, one table row per (mechanism, T), and the target summary."""
    table = report.markdown_table(
        ["mechanism", "T", "density", "engine", "selected", "dense xla", "speedup (engine)", "speedup (selected)",
         "target 0.7/density", "verdict"],
        [[r["mechanism"], r["T"], f"{r['density']:.3f}", _ms(r["seconds"]["engine"]), _ms(r["seconds"]["selected"]),
          _ms(r["seconds"]["dense"]), _x(r["speedup_engine"]), _x(r["speedup_selected"]),
          _x(r["target_speedup"]), r["target"]] for r in rows])
    judged = [r for r in rows if r["target"] in ("met", "missed")]
    met = [r for r in judged if r["target"] == "met"]
    return "\n".join([
        f"# Block-sparse engine vs dense blocked softmax ({device['platform']})", "",
        f"Device: `{device['device_kind']}`, {device['cpu_count']} CPUs, jax {device['jax_version']}. "
        f"B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, random normal inputs; engine path "
        f"`{args.implementation}`; each selector's default config at block {args.block or 64}; causal selectors "
        "under `Causal()`, "
        f"neighbourhood attention on a 2-D grid with kernel {args.na_kernel} (not causal). Density: visited tiles / "
        "tiles the dense baseline computes (token selectors: selected pairs / pairs it computes). Speedup: dense `flash_attention_xla` time / path time, in this run.",
        "", host.load_note(*load), "",
        "CPU times are to be read as ratios only, not as absolute speeds.", "", table, "",
        f"Target (speedup of the engine ≥ 0.7 × 1/density wherever density ≤ 0.25): met in {len(met)} of "
        f"{len(judged)} judged cases.", ""])


def plot(rows: Sequence[dict], args: argparse.Namespace, path) -> None:
    """Speedup of the engine against 1/density, with the target line."""
    plt = plots.plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, name in enumerate(dict.fromkeys(r["mechanism"] for r in rows)):
        pts = [(1 / r["density"], r["speedup_engine"]) for r in rows
               if r["mechanism"] == name and r["speedup_engine"] and r["density"] > 0]
        if pts:
            ax.loglog(*zip(*pts), "o-", color=f"C{i % 10}", label=name)
    xs = np.array([1.0, max([1 / r["density"] for r in rows if r["density"] > 0] + [4.0])])
    ax.loglog(xs, TARGET_FACTOR * xs, "k--", lw=0.8, label="target 0.7/density")
    ax.loglog(xs, xs, "k:", lw=0.8, label="ideal 1/density")
    ax.set(xlabel="1 / density", ylabel="speedup over dense xla",
           title=f"block-sparse engine ({args.implementation}), T in {list(args.seq_lens)}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- --key-lists

KEY_LIST_SOURCES = ("dma", "spt", "sparsifiner", "uniform", "local")
KEY_PATHS_TIMED = ("blocks", "gather", "dense")
SELECTORS = ("dma", "spt", "sparsifiner")
"""Key-list sources that are selectors (their selection is timed too); "uniform" and "local" are fixed lists."""


def structured_qkv(seed: int, B: int, T: int, H: int, D: int, span: float) -> tuple[jax.Array, ...]:
    """q, k, v = ``z + noise`` with ``z`` a stationary Gaussian process along the sequence (AR(1),
    correlation ``exp(-1/span)`` per token, unit variance per feature, independent per head): tokens
    within about ``span`` positions are similar, so top-k selections are local but not contiguous."""
    rng = np.random.default_rng(seed)
    rho = math.exp(-1.0 / span)
    eps = rng.standard_normal((T, B, H, D)).astype(np.float32)
    z = np.empty_like(eps)
    z[0] = eps[0]
    for t in range(1, T):
        z[t] = rho * z[t - 1] + math.sqrt(1 - rho * rho) * eps[t]
    z = z.transpose(1, 0, 2, 3)
    return tuple(jnp.asarray(z + rng.standard_normal(z.shape).astype(np.float32)) for _ in range(3))


def key_lists_of(source: str, q, k, v, K: int, args: argparse.Namespace) -> KeyLists:
    """Causal key lists of ``K`` keys per query from one selector, or uniform random over each query's
    past (the worst case for the block path), or each query's ``K`` latest keys (``local``: its best case)."""
    B, T, H, D = q.shape
    rng = np.random.default_rng(T)
    if source == "dma":
        bias = dynamic_mask_bias(v, jnp.asarray(rng.standard_normal((H * D, H)) / math.sqrt(H * D), jnp.float32),
                                 jnp.ones((H,), jnp.float32))
        return dynamic_mask_lists(bias, K, num_heads=H, T=T, causal=True)
    if source == "spt":
        return Spt(top_l=K).select(q, k, mask=masks.Causal())
    if source == "sparsifiner":
        c = D // 4
        w_q, w_k = (jnp.asarray(rng.standard_normal((D, c)) / math.sqrt(D), jnp.float32) for _ in range(2))
        basis = jnp.asarray(np.arange(T)[:, None] // args.segment == np.arange(-(-T // args.segment))[None, :],
                            jnp.float32) / args.segment
        scores = connectivity_scores(q, k, w_q, None, w_k, None, basis, basis)
        return connectivity_lists(scores, K, mask=masks.Causal())
    if source == "local":
        return KeyLists(jnp.broadcast_to(jnp.arange(T)[:, None] - jnp.arange(K), (B, H, T, K)).astype(jnp.int32))
    past = np.arange(T)[:, None] + 1
    return KeyLists(jnp.asarray((rng.random((B, H, T, K)) * past).astype(np.int32)))


def run_key_lists(args: argparse.Namespace) -> list[dict]:
    """One row per (T, K, source): densities, the interleaved times of the block path, the gather path
    and dense causal ``flash_attention_xla``, their ratios, and the path ``key_path="auto"`` takes."""
    mask, rows = masks.Causal(), []
    cases = [(T, f, source) for T in args.seq_lens for f in args.key_fractions for source in KEY_LIST_SOURCES]
    inputs = {}
    for T, fraction, source in tqdm(cases, desc="bench_sparse key lists", unit="case"):
        if T not in inputs:
            inputs = {T: structured_qkv(T, args.batch, T, args.heads, args.head_dim, args.latent_span)}
        q, k, v = inputs[T]
        K = max(1, T // fraction)
        sel = jax.block_until_ready(key_lists_of(source, q, k, v, K, args))
        blocks, _ = key_list_blocks(sel, T, T, mask=mask, block_q=64, block_kv=64)
        nk = blocks.num_kv_blocks
        fns = {path: jax.jit(lambda q, k, v, sel, path=path: token_sparse_attention(
                   q, k, v, sel, mask=mask, implementation="xla", key_path=path)) for path in KEY_PATHS_TIMED[:2]}
        fns["dense"] = jax.jit(lambda q, k, v, sel: flash_attention_xla(q, k, v, mask=mask))
        if source in SELECTORS:
            fns["selection"] = jax.jit(lambda q, k, v, sel, source=source: key_lists_of(source, q, k, v, K, args))
        compiled = {path: fn.lower(q, k, v, sel).compile() for path, fn in fns.items()}
        timing = measure.time_thunks({path: (lambda c=c: c(q, k, v, sel)) for path, c in compiled.items()},
                                     repeats=args.repeats, max_seconds=args.max_seconds)
        sec = {path: timing[path].median_s for path in compiled}
        auto = choose_key_path(K, T, T, shared=False, mask=mask, block_q=64, block_kv=64)
        if auto == "runtime":
            listed = float(jnp.sum(blocks.counts)) * 64 * 64
            auto = "blocks" if listed <= GATHER_COST_RATIO * args.batch * args.heads * T * K else "gather"
            auto += " (run time)"
        end_to_end = sec["selection"] + sec[auto.split()[0]] if "selection" in sec else None
        rows.append({"source": source, "T": T, "K": K, "causal": True,
                     "pair_density": pair_density(sel, T, T, causal=True),
                     "union_density": float(jnp.sum(blocks.counts)) / (args.batch * args.heads * nk * (nk + 1) / 2),
                     "auto": auto,
                     "seconds": sec, "blocks_over_dense": sec["blocks"] / sec["dense"],
                     "gather_over_dense": sec["gather"] / sec["dense"],
                     "gather_over_blocks": sec["gather"] / sec["blocks"],
                     "end_to_end_over_dense": None if end_to_end is None else end_to_end / sec["dense"]})
    return rows


def markdown_key_lists(rows: Sequence[dict], args: argparse.Namespace, device: dict, load: tuple[dict, dict]) -> str:
    """The key-list report: settings, one row per (source, T), and what it says."""
    table = report.markdown_table(
        ["lists", "T", "K", "pair density", "union density", "blocks", "gather", "dense xla", "blocks / dense",
         "gather / dense", "gather / blocks", "auto", "selection", "selection + auto / dense"],
        [[r["source"], r["T"], r["K"], f"{r['pair_density']:.3f}", f"{r['union_density']:.3f}",
          _ms(r["seconds"]["blocks"]), _ms(r["seconds"]["gather"]), _ms(r["seconds"]["dense"]),
          _x(r["blocks_over_dense"]), _x(r["gather_over_dense"]), _x(r["gather_over_blocks"]), r["auto"],
          _ms(r["seconds"].get("selection")), "-" if r["end_to_end_over_dense"] is None
          else _x(r["end_to_end_over_dense"])]
         for r in rows])
    return "\n".join([
        f"# Token engine key lists: block path vs gather path vs dense ({device['platform']})", "",
        f"Device: `{device['device_kind']}`, {device['cpu_count']} CPUs, jax {device['jax_version']}. "
        f"B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, forward only, `Causal()`, "
        f"K = T/f keys per query for f in {args.key_fractions}, 64 × 64 tiles. Inputs: `structured_qkv` (latent span "
        f"{args.latent_span:g} tokens); Sparsifiner's token basis averages segments of {args.segment}. "
        "Pair density: listed causal pairs / causal pairs. Union density: tiles the block path visits / causal "
        "tiles. Times: median of interleaved rounds; the paths run the same lists, selection excluded; "
        "selection: the selector computing its lists (DMA, SPT, Sparsifiner; untrained weights), and the end-to-end "
        "ratio adds it to the path `key_path=\"auto\"` takes; ratios are time / time in this run (below 1 = "
        "faster than the denominator).", "",
        host.load_note(*load), "",
        "CPU times are to be read as ratios only, not as absolute speeds.", "", table, "",
        f"Block path faster than the gather path in {sum(r['gather_over_blocks'] > 1 for r in rows)} of {len(rows)} "
        f"cases; faster than dense in {sum(r['blocks_over_dense'] < 1 for r in rows)}: "
        + (", ".join(f"{r['source']} T={r['T']} K={r['K']} (union {r['union_density']:.2f}, "
                     f"{r['blocks_over_dense']:.2f}x)" for r in rows if r["blocks_over_dense"] < 1) or "none")
        + ". The block path computes every pair of the union's tiles, so it can beat dense only when the union "
          "density is well below 1; top-k lists with far picks make the 64-row union dense.", ""])


def plot_key_lists(rows: Sequence[dict], args: argparse.Namespace, path) -> None:
    """Time over dense against union density, for both key-list paths."""
    plt = plots.plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, source in enumerate(KEY_LIST_SOURCES):
        pts = [r for r in rows if r["source"] == source]
        ax.semilogy([r["union_density"] for r in pts], [r["blocks_over_dense"] for r in pts], "o", color=f"C{i}",
                    label=f"{source}: blocks")
        ax.semilogy([r["union_density"] for r in pts], [r["gather_over_dense"] for r in pts], "x", color=f"C{i}",
                    label=f"{source}: gather")
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="dense causal xla")
    ax.set(xlabel="block union density (of causal tiles)", ylabel="time / dense time",
           title=f"key lists, K = T/f, f in {args.key_fractions}, T in {list(args.seq_lens)}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; write JSON, markdown and PNG; print the table."""
    args = parse_args(argv)
    device, load_before = host.device_info(), host.machine_load()
    if args.key_lists:
        cases = run_key_lists(args)
        md = markdown_key_lists(cases, args, device, (load_before, host.machine_load()))
        print(md)
        results = {"device": device, "settings": report.jsonable_args(args), "cases": cases}
        report.save_benchmark(results, md, args, lambda path: plot_key_lists(cases, args, path))
        return results
    cases = run(args)
    md = markdown(cases, args, device, (load_before, host.machine_load()))
    print(md)
    results = {"device": device, "settings": report.jsonable_args(args), "cases": cases,
               "rows": timing_rows(cases, args)}
    report.save_benchmark(results, md, args, lambda path: plot(cases, args, path))
    return results


if __name__ == "__main__":
    main()
