"""MoH benchmark: attention over each token's routed heads only against attention over all heads.

In one run, for each sequence length T, causal, forward only, B=1, H heads of dimension D:

- ``all heads``: ``attnjax.attention(q, k, v, mask=Causal(), implementation="xla")`` over every head, the
  blocked online-softmax forward (tiles ``bq × bk``; it skips the tiles above the diagonal): what multi-head
  attention costs, the baseline;
- ``moh f``: MoH (``attnjax.heads.moh``) with a fraction ``f`` of the heads active per token (``h_s`` shared +
  ``k`` routed, ``h_s + k = f·H``): the two-stage routing from router logits, then ``moh_attention``, which packs
  each token's active (head, token) query rows by (batch, KV head, position) and runs one blocked pass over them
  (the same engine and tiles), then unsorts and weights them. ``f = 1`` shows the packing's overhead.

Each path runs at every tile size of ``--blocks`` (square tiles); a ratio compares MoH with the all-heads pass at
the same tile size, and the target compares the best tile of each. Temporary memory is XLA's compiled memory
analysis. The issue's target: 50% of the heads active at T = 4k within 0.65x of all heads. The crossover is the
smallest measured T from which a fraction's best ratio stays below 1.

    python -m experiments.bench_heads --seq-lens 1k,2k,4k --fractions 0.25,0.5,0.75,1 --blocks 256,512
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
from tqdm import tqdm

import attnjax
from attnjax import masks
from attnjax.heads.moh import moh_attention, moh_routing
from attnjax.softmax import Softmax
from experiments.lib import cli, host, plots, report, workload
from experiments.lib.measure import compile_fn, memory_of, time_thunks

BASELINE = "all heads"
TARGET_LEN, TARGET_FRACTION, TARGET_RATIO = 4096, 0.5, 0.65

SMOKE = {"seq_lens": [128, 256], "heads": 4, "head_dim": 16, "fractions": [0.5, 1.0], "blocks": [64], "repeats": 1,
         "max_seconds": 1.0}
"""``--smoke`` defaults: tiny sizes that check the benchmark runs, in seconds (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = cli.benchmark_parser(__doc__, [1024, 2048, 4096], heads=8, head_dim=64)
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.25, 0.5, 0.75, 1.0],
                   help="fractions of the heads active per token (h_s + k = fraction * heads)")
    p.add_argument("--blocks", type=cli.parse_ints, default=[256, 512], help="square tile sizes of both paths")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop repeating a length's rounds after this long")
    cli.add_output_flags(p, "bench_heads")
    return cli.parse_with_smoke(p, argv, SMOKE)


def split_heads(fraction: float, heads: int) -> tuple[int, int]:
    """``(h_s, k)`` with ``h_s + k = round(fraction·heads)`` active heads, half of them shared (at least one
    routed head when any head is routed). ValueError when the fraction gives no head."""
    active = round(fraction * heads)
    if not 1 <= active <= heads:
        raise ValueError(f"fraction {fraction} of {heads} heads gives {active} active heads; need 1..{heads}")
    shared = active // 2
    return shared, active - shared


def moh_path(fraction: float, block: int, args: argparse.Namespace) -> Callable:
    """``(q, k, v, routed, shared, balance) -> out``: routing from the logits, then the packed routed-heads pass."""
    shared, top_k = split_heads(fraction, args.heads)

    def fn(q, k, v, routed, shared_logits, balance):
        r = moh_routing(routed, top_k, shared_logits=shared_logits, balance_logits=balance,
                        num_shared=None if shared > 1 else shared)
        return moh_attention(q, k, v, r.index, r.weights.astype(q.dtype), mask=masks.Causal(), block_q=block,
                             block_kv=block)

    return fn


def router_logits(seq_len: int, fraction: float, args: argparse.Namespace) -> tuple:
    """Standard-normal router logits ``(W_r x, W_s x or None, W_h x or None)`` for one fraction (every split
    of ``split_heads`` has routed heads)."""
    shared, _ = split_heads(fraction, args.heads)
    keys = jax.random.split(jax.random.PRNGKey(seq_len + 1), 3)
    shape = (args.batch, seq_len)
    routed = jax.random.normal(keys[0], (*shape, args.heads - shared))
    shared_logits = jax.random.normal(keys[1], (*shape, shared)) if shared > 1 else None
    balance = jax.random.normal(keys[2], (*shape, 2)) if shared else None
    return routed, shared_logits, balance


def path_name(fraction: float) -> str:
    """The name of a MoH path."""
    return f"moh {fraction:g}"


def measure(seq_len: int, args: argparse.Namespace) -> list[dict]:
    """Every path at every tile size at one length: memory, and times interleaved in one set of rounds."""
    q, k, v = workload.benchmark_inputs(seq_len, "fwd", args)
    rows, thunks = [], {}
    for block in args.blocks:
        mechanism = Softmax(block_q=block, block_kv=block)
        entries = [(BASELINE, 1.0, lambda q, k, v, m=mechanism: attnjax.attention(q, k, v, mechanism=m,
                                                                                 mask=masks.Causal(),
                                                                                 implementation="xla"), (q, k, v))]
        for f in args.fractions:
            entries.append((path_name(f), f, moh_path(f, block, args), (q, k, v, *router_logits(seq_len, f, args))))
        for path, fraction, fn, xs in entries:
            compiled = compile_fn(fn, *xs)
            shared, top_k = split_heads(fraction, args.heads) if path != BASELINE else (args.heads, 0)
            rows.append({"T": seq_len, "path": path, "block": block, "fraction": fraction, "shared_heads": shared,
                         "top_k": top_k, "memory": memory_of(compiled).as_dict()})
            thunks[(path, block)] = lambda c=compiled, xs=xs: c(*xs)
    timings = time_thunks({f"{p}@{b}": t for (p, b), t in thunks.items()}, repeats=args.repeats,
                          max_seconds=args.max_seconds)
    for row in rows:
        t = timings[f"{row['path']}@{row['block']}"]
        base = timings[f"{BASELINE}@{row['block']}"]
        row.update(median_s=t.median_s, repeats=t.repeats, ratio_to_all_heads=t.median_s / base.median_s)
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    """Every length's measurements, small T first."""
    rows = []
    bar = tqdm(args.seq_lens, desc="bench_heads", unit="T")
    for seq_len in bar:
        bar.set_postfix(T=seq_len)
        rows += measure(seq_len, args)
    return rows


def best_ratios(rows: list[dict]) -> dict[tuple[int, str], float]:
    """``(T, path) -> best time over the tile sizes / best all-heads time over the tile sizes``."""
    best: dict[tuple[int, str], float] = {}
    for r in rows:
        key = (r["T"], r["path"])
        best[key] = min(best.get(key, float("inf")), r["median_s"])
    return {(T, p): t / best[(T, BASELINE)] for (T, p), t in best.items()}


def crossover(rows: list[dict], args: argparse.Namespace) -> dict[str, Optional[int]]:
    """Per MoH path: the smallest measured T from which its best ratio stays below 1 (None if it never does)."""
    ratios, lengths = best_ratios(rows), sorted(args.seq_lens)
    out = {}
    for f in args.fractions:
        below = [ratios[(T, path_name(f))] < 1.0 for T in lengths]
        out[path_name(f)] = next((T for i, T in enumerate(lengths) if all(below[i:])), None)
    return out


def targets(rows: list[dict]) -> dict:
    """The issue's target: ``TARGET_FRACTION`` of the heads at ``TARGET_LEN``, best tile of each path; ``met`` is
    None where that length or fraction was not measured."""
    ratio = best_ratios(rows).get((TARGET_LEN, path_name(TARGET_FRACTION)))
    return {"T": TARGET_LEN, "fraction": TARGET_FRACTION, "bound": TARGET_RATIO, "ratio": ratio,
            "met": None if ratio is None else ratio <= TARGET_RATIO}


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Rows of the markdown table."""
    return [[r["T"], r["path"], r["block"], f"{r['shared_heads']} + {r['top_k']}",
             report.format_bytes(r["memory"]["temp"]), f"{r['median_s'] * 1e3:.0f} ms (n={r['repeats']})",
             f"{r['ratio_to_all_heads']:.2f}x"] for r in rows]


def markdown_report(rows: list[dict], goal: dict, cross: dict, args: argparse.Namespace, device: dict,
                    load: str) -> str:
    """The markdown file: setup, table, target, crossover."""
    table = report.markdown_table(["T", "path", "tile", "h_s + k", "temp memory", "median time",
                                   "time / all heads (same tile)"], table_rows(rows))
    ratios = best_ratios(rows)
    best = report.markdown_table(["T"] + [path_name(f) for f in args.fractions],
                                 [[T] + [f"{ratios[(T, path_name(f))]:.2f}x" for f in args.fractions]
                                  for T in sorted(args.seq_lens)])
    verdict = "**not measured**" if goal["met"] is None else "met" if goal["met"] else "**NOT met**"
    ratio = "n/a" if goal["ratio"] is None else f"{goal['ratio']:.2f}x"
    return "\n".join([
        f"# MoH: routed heads only vs all heads ({device['device_kind']})",
        "",
        f"Device: `{device['device_kind']}` ({device['platform']}), {device['cpu_count']} CPUs, "
        f"jax {device['jax_version']}. B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, causal, "
        f"forward only; square tiles {', '.join(map(str, args.blocks))}. `moh f`: h_s shared + k routed heads per "
        "token (random router logits), routing included in the time. Times are medians of interleaved runs; "
        "compare the ratios, not the absolute times.",
        "",
        load,
        "",
        table,
        "",
        "Best tile of each path over the best tile of all heads:",
        "",
        best,
        "",
        "## Target",
        "",
        f"- {goal['fraction']:.0%} of the heads active at T={goal['T']} within {goal['bound']:g}x of all heads: "
        f"{ratio} -> {verdict}",
        "",
        "## Crossover",
        "",
        *[f"- {p}: below 1x from T={T}" if T else f"- {p}: not below 1x at the largest measured T"
          for p, T in cross.items()],
        "",
        "The packed pass does the attention work of the active rows only (causal tiles of each (batch, KV head) "
        "group's rows sorted by position), so its ideal ratio is the active fraction; the overhead is the gathers, "
        "one sort of B·T·(h_s + k) keys, a copy of K and V laid end to end, the data-dependent tile schedule "
        "(EMPTY/PARTIAL/FULL from each row's key interval), the wider causal band of a tile when a head holds fewer "
        "rows (a query tile spans more positions), the padding that starts each group on a tile boundary, and the "
        "final scatter into [B, T, H, D].",
        "",
    ])


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> Path:
    """Best ratio to all heads vs T per fraction, and vs the fraction at the largest T (ideal: the fraction)."""
    plt = plots.plt
    ratios, lengths = best_ratios(rows), sorted(args.seq_lens)
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, f in enumerate(args.fractions):
        ax_t.semilogx(lengths, [ratios[(T, path_name(f))] for T in lengths], "o-", color=f"C{i}", label=path_name(f))
    ax_t.axhline(1.0, color="gray", ls=":", label="all heads")
    ax_t.plot([TARGET_LEN], [TARGET_RATIO], "k*", ms=10, label=f"target ({TARGET_FRACTION:g} at {TARGET_LEN})")
    ax_t.set(title="time / all heads (best tile of each)", xlabel="T", ylabel="ratio")
    plots.label_x(ax_t, lengths)
    fs = sorted(args.fractions)
    ax_f.plot(fs, [ratios[(lengths[-1], path_name(f))] for f in fs], "o-", label=f"measured, T={lengths[-1]}")
    ax_f.plot(fs, fs, "--", color="gray", label="ideal (active fraction)")
    ax_f.set(title=f"time / all heads at T={lengths[-1]}", xlabel="active fraction of the heads", ylabel="ratio")
    for ax in (ax_t, ax_f):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"MoH routed heads vs all heads, causal, H={args.heads}, D={args.head_dim}, "
                 f"{jax.devices()[0].device_kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; write JSON, markdown and PNG; print the table and the target."""
    args = parse_args(argv)
    for f in args.fractions:
        split_heads(f, args.heads)
    device = host.device_info()
    before = host.machine_load()
    rows = run(args)
    load = host.load_note(before, host.machine_load())
    goal, cross = targets(rows), crossover(rows, args)
    md = markdown_report(rows, goal, cross, args, device, load)
    print(md)
    results = {"device": device, "settings": report.jsonable_args(args), "load": load, "rows": rows, "target": goal,
               "crossover": cross}
    report.save_benchmark(results, md, args, lambda p: plot(rows, args, p))
    return results


if __name__ == "__main__":
    main()
