"""Positional bias rules in the blocked ``xla`` softmax path: time and memory against no bias.

Issue 15's target: at T = 8k, each bias rule evaluated per tile costs at most 1.3x the same path with no bias,
and no ``[T, S]`` buffer appears in the compiled memory. In one run, for each length T, causal self-attention
``attnjax.attention(q, k, v, mask=Causal(), bias=rule, implementation="xla")`` with q, k, v ``[B, T, heads, D]``,
forward (``fwd``) and forward plus the gradients wrt q, k, v and the rule's learned tables (``fwd_bwd``):

- ``none``: no bias, causal (the baseline of the causal rules); ``none (non-causal)``: no bias over all pairs (the
  baseline of the grid rules);
- ``alibi``: ``attnjax.positional.ALiBi`` (Press et al. 2022);
- ``t5``: ``attnjax.positional.T5Bias``, 32 buckets, max distance 128 (Raffel et al. 2020);
- ``relative``: ``attnjax.positional.relative.RelativeEmbeddingBias``, learned relative embeddings read by the
  queries (Shaw et al. 2018; Music Transformer, Huang et al. 2018);
- ``transformer-xl``: ``attnjax.positional.transformer_xl.TransformerXLBias`` (Dai et al. 2019);
- ``grid``: ``attnjax.positional.grid.RelativeGridBias`` over a ``T/W x W`` token grid (CrossFormer's DPB
  table; Wang et al. 2022), non-causal;
- ``gpsa-position``: ``attnjax.positional.gpsa_position.GPSAPositionBias`` on the same grid (ConViT's
  ``v_pos·r_ij``; d'Ascoli et al. 2021), non-causal;
- ``polyline``: ``attnjax.relative.polyline.PolylineBias``, one direction of PPMA's log mask on the same grid
  (Zhao et al. 2025), non-causal.

Reported: the median time as a ratio to the no-bias path with the same mask in the same run and mode, and the
compiled temporaries
(XLA memory analysis) against one float32 ``[B, heads, T, T]`` logits array.

    python -m experiments.bench_positional --seq-lens 8k
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import attnjax
from attnjax import masks
from attnjax.positional import ALiBi, T5Bias, alibi_slopes
from attnjax.positional.gpsa_position import GPSAPositionBias
from attnjax.positional.grid import RelativeGridBias
from attnjax.positional.relative import RelativeEmbeddingBias
from attnjax.positional.transformer_xl import TransformerXLBias
from attnjax.relative.polyline import PolylineBias
from experiments.lib import cli, host, plots, report, workload
from experiments.lib.measure import GIB, measure_paths

BASELINE, FULL_BASELINE = "none", "none (non-causal)"
TARGET = 1.3

SMOKE = {"seq_lens": [128], "heads": 2, "head_dim": 8, "repeats": 1, "max_seconds": 1.0, "grid_width": 8,
         "max_distance": 16}
"""``--smoke`` defaults: tiny sizes that check the benchmark runs, in seconds (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = cli.benchmark_parser(__doc__, [8192], heads=4, head_dim=64)
    p.add_argument("--grid-width", type=int, default=64, help="tokens per row of the grid rules' 2-D layout")
    p.add_argument("--max-distance", type=int, default=256,
                   help="the clipping distance of the relative embeddings (table rows: max distance + 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--memory-budget-gib", type=float, default=8.0,
                   help="time a path only if its compiled peak memory is below this")
    cli.add_output_flags(p, "bench_positional")
    return cli.parse_with_smoke(p, argv, SMOKE)


def rules(T: int, args: argparse.Namespace) -> dict[str, tuple[Optional[attnjax.Bias], bool]]:
    """``name -> (rule, causal)`` at length ``T``, with random learned tables."""
    H, D = args.heads, args.head_dim
    rng = np.random.default_rng(0)

    def table(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.1)

    W = args.grid_width
    if T % W:
        raise ValueError(f"--grid-width {W} must divide every length, got T={T}")
    grid = (T // W, W)
    log_decays = -jnp.abs(table(args.batch, T, H))
    return {
        BASELINE: (None, True),
        FULL_BASELINE: (None, False),
        "alibi": (ALiBi(jnp.asarray(alibi_slopes(H))), True),
        "t5": (T5Bias(table(32, H), bidirectional=False, max_distance=128), True),
        "relative": (RelativeEmbeddingBias(table(args.max_distance + 1, H, D), causal=True), True),
        "transformer-xl": (TransformerXLBias(table(H, H * D, D), table(H, D)), True),
        "grid": (RelativeGridBias(table((2 * grid[0] - 1) * (2 * W - 1), H), grid=grid), False),
        "gpsa-position": (GPSAPositionBias(table(H, 3), width=W), False),
        "polyline": (PolylineBias.from_log_decays(log_decays, log_decays, grid=grid), False),
    }


def path_fn(rule: Optional[attnjax.Bias], causal: bool) -> Callable:
    """``(q, k, v) -> out`` of the blocked softmax path with ``rule`` (tables closed over: their gradients are
    still computed by the path's backward)."""
    mask = masks.Causal() if causal else None
    return lambda q, k, v: attnjax.attention(q, k, v, mask=mask, bias=rule, implementation="xla")


def logits_bytes(T: int, args: argparse.Namespace) -> int:
    """Bytes of one float32 ``[B, heads, T, T]`` logits array."""
    return args.batch * args.heads * T * T * 4


def measure(T: int, mode: str, args: argparse.Namespace) -> list[dict]:
    """Memory and time of every rule at one length and mode."""
    q, k, v = workload.random_qkv(jax.random.key(T), args.batch, T, args.heads, args.head_dim,
                                  jnp.dtype(args.dtype))
    xs = workload.mode_inputs(q, k, v, mode)
    fns = {name: workload.mode_fn(path_fn(rule, causal), mode) for name, (rule, causal) in rules(T, args).items()}
    measured = measure_paths(fns, *xs, budget_bytes=args.memory_budget_gib * GIB, repeats=args.repeats,
                             max_seconds=args.max_seconds)
    causal = {name: c for name, (_, c) in rules(T, args).items()}
    rows = []
    for name, (memory, timing) in measured.items():
        base = measured[BASELINE if causal[name] else FULL_BASELINE][1]
        rows.append({"T": T, "mode": mode, "rule": name, "causal": causal[name], "memory": memory.as_dict(),
                     "median_s": timing.median_s if timing else None, "repeats": timing.repeats if timing else 0,
                     "time_ratio_to_none": timing.median_s / base.median_s if timing and base else None,
                     "temp_fraction_of_logits": memory.temp / logits_bytes(T, args)})
    return rows


def markdown_report(rows: list[dict], args: argparse.Namespace, device: dict, load: str) -> str:
    """The markdown file: setup and table."""
    table = report.markdown_table(
        ["T", "mode", "rule", "mask", "temp memory", "temp / [B,H,T,T] f32", "median time", "time / none",
         f"<= {TARGET}x"],
        [[r["T"], r["mode"], r["rule"], "causal" if r["causal"] else "none", report.format_bytes(r["memory"]["temp"]),
          f"{r['temp_fraction_of_logits']:.3f}",
          "not run" if r["median_s"] is None else f"{r['median_s']:.3f} s (n={r['repeats']})",
          "n/a" if r["time_ratio_to_none"] is None else f"{r['time_ratio_to_none']:.3f}x",
          "n/a" if r["time_ratio_to_none"] is None else ("yes" if r["time_ratio_to_none"] <= TARGET else "NO")]
         for r in rows])
    return "\n".join([
        f"# Positional bias rules in the blocked xla path vs no bias ({device['device_kind']})", "",
        f"Device: `{device['device_kind']}` ({device['platform']}), {device['cpu_count']} CPUs, jax "
        f"{device['jax_version']}. B={args.batch}, heads={args.heads}, D={args.head_dim}, {args.dtype}; causal "
        "self-attention (the grid rules: non-causal over a 2-D token grid; each rule's ratio is to no bias with the same "
        "mask), `attnjax.attention(..., "
        "implementation=\"xla\")` with 512-wide tiles. fwd_bwd also computes the rule's table gradients. Memory: "
        "XLA compiled memory analysis (temp = temporaries beyond arguments and outputs). Times are medians of "
        "interleaved runs; compare the ratios, not the absolute times.", "",
        load, "", table, ""])


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> Path:
    """Time ratio to no bias per rule and mode, at the largest length."""
    plt = plots.plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    T = max(r["T"] for r in rows)
    names = list(dict.fromkeys(r["rule"] for r in rows))
    for offset, mode in ((-0.2, "fwd"), (0.2, "fwd_bwd")):
        sel = {r["rule"]: r["time_ratio_to_none"] or 0.0 for r in rows if r["T"] == T and r["mode"] == mode}
        ax.bar(np.arange(len(names)) + offset, [sel.get(n, 0.0) for n in names], width=0.4, label=mode)
    ax.axhline(TARGET, color="k", linestyle="--", linewidth=1, label=f"target {TARGET}x")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set(ylabel="time / no bias", title=f"bias rules at T={T}, {jax.devices()[0].device_kind}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; write JSON, markdown and PNG; print the table."""
    args = parse_args(argv)
    device = host.device_info()
    before = host.machine_load()
    rows = [row for T in tqdm(args.seq_lens, desc="bench_positional", unit="T") for mode in workload.MODES
            for row in measure(T, mode, args)]
    load = host.load_note(before, host.machine_load())
    md = markdown_report(rows, args, device, load)
    print(md)
    results = {"device": device, "settings": report.jsonable_args(args), "load": load, "rows": rows}
    report.save_benchmark(results, md, args, lambda path: plot(rows, args, path))
    return results


if __name__ == "__main__":
    main()
