"""Full-attention stand-ins against dense blocked softmax: Combiner, CCA-Attention and HyperAttention.

At each sequence length T, in one run, the forward time of

- **combiner_fixed**, **combiner_logsparse**, **combiner_axial** (Ren et al. 2021; ``xla`` path, region
  size ``⌈√T⌉`` for fixed and axial), every key reachable in one layer;
- **core_context** (CCA-Attention, Chen et al. 2024; ``xla`` path, groups of ``--group-size``, window
  ``--window``, the public code's defaults 16 and 1024);
- **hyper** (HyperAttention, Han et al. 2024; ``xla`` path, the official defaults: 7 hyperplanes, sortLSH
  blocks of 256, 256 sampled keys, exact below ``--hyper-min-seq-len`` = 4096), with the causal recursion of
  its Algorithm 4. It approximates softmax attention itself, so the report adds its error against the exact
  output (``spectral_error``: an upper bound on Eq. 2's spectral ``ε``, and the relative Frobenius error), and
  its time ratio tests
  the paper's claim of 5× over exact causal attention at T = 131k (at the lengths a CPU reaches),

all causal, against **dense** ``flash_attention_xla`` with ``mask=Causal()``, as a ratio ``path / dense``
(below 1 is faster). The paths are timed interleaved (``experiments.lib.measure.measure_paths``).

    python -m experiments.bench_factorized --seq-lens 8k,16k,32k --heads 4 --head-dim 64
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from attnjax import masks
from attnjax.api import attention
from attnjax.softmax import flash_attention_xla
from attnjax.sparse import CombinerAxial, CombinerFixed, CombinerLogsparse, CoreContext, Hyper
from experiments.lib import cli, host, measure, plots, report, workload

SMOKE = {"seq_lens": [256, 512], "heads": 2, "head_dim": 16, "repeats": 1, "max_seconds": 1.0, "window": 64,
         "hyper_min_seq_len": 128}
"""``--smoke`` defaults: tiny sizes, checks that it runs (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = cli.benchmark_parser(__doc__, [8192, 16384, 32768], heads=4)
    p.add_argument("--group-size", type=int, default=16, help="CCA-Attention tokens per core token")
    p.add_argument("--window", type=int, default=1024, help="CCA-Attention exact recent tokens (at least)")
    p.add_argument("--hyper-min-seq-len", type=int, default=4096,
                   help="HyperAttention's exact-attention length (its recursion stops at or below it)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="stop repeating a measurement after this")
    p.add_argument("--memory-budget-gib", type=float, default=8.0,
                   help="time a path only if its compiled peak memory is below this")
    cli.add_output_flags(p, "bench_factorized")
    return cli.parse_with_smoke(p, argv, SMOKE)


def path_fns(args: argparse.Namespace) -> dict[str, Callable]:
    """``(q, k, v) -> out`` of each mechanism (causal, xla) and the dense baseline."""
    configs = {"combiner_fixed": CombinerFixed(), "combiner_logsparse": CombinerLogsparse(),
               "combiner_axial": CombinerAxial(), "core_context": CoreContext(group_size=args.group_size,
                                                                              window=args.window),
               "hyper": Hyper(min_seq_len=args.hyper_min_seq_len)}
    fns = {name: (lambda q, k, v, c=c: attention(q, k, v, mechanism=c, mask=masks.Causal(), implementation="xla"))
           for name, c in configs.items()}
    fns["dense"] = lambda q, k, v: flash_attention_xla(q, k, v, mask=masks.Causal())
    return fns


def run(args: argparse.Namespace) -> list[dict]:
    """One row per T: seconds and peak memory per path, and each path's time over dense."""
    fns = path_fns(args)
    rows = []
    for T in tqdm(args.seq_lens, desc="bench_factorized", unit="T"):
        q, k, v = workload.host_random_qkv(T, args.batch, T, args.heads, args.head_dim, args.dtype)
        measured = measure.measure_paths(fns, q, k, v, budget_bytes=args.memory_budget_gib * measure.GIB,
                                         repeats=args.repeats, max_seconds=args.max_seconds)
        seconds = {p: (t.median_s if t is not None else None) for p, (_, t) in measured.items()}
        dense = seconds["dense"]
        rows.append({"T": T, "seconds": seconds, "peak_bytes": {p: m.peak for p, (m, _) in measured.items()},
                     "hyper_error": spectral_error(fns["hyper"], fns["dense"], q, k, v),
                     "ratio_to_dense": {p: (s / dense if s is not None and dense else None)
                                        for p, s in seconds.items() if p != "dense"}})
    return rows


def spectral_error(approx: Callable, exact: Callable, q, k, v) -> dict[str, float]:
    """HyperAttention's error in the paper's terms (Eq. 2), per (batch, head), worst case over them.

    ``ε ≤ ‖out − exact‖_op / ‖V‖_op``: Eq. 2 divides by ``‖D⁻¹A‖_op·‖V‖_op`` and a row-stochastic ``D⁻¹A`` has
    ``‖D⁻¹A‖_op ≥ 1``, so this is an upper bound on the paper's ``ε`` (``"spectral"``); ``"frobenius"`` is
    ``‖out − exact‖_F / ‖exact‖_F``, which is large whenever the exact rows average many values to near zero.
    """
    a, e = (np.asarray(jax.jit(f)(q, k, v), np.float64) for f in (approx, exact))
    vv = np.repeat(np.asarray(v, np.float64), q.shape[2] // v.shape[2], axis=2)
    spectral = max(np.linalg.norm(a[b, :, h] - e[b, :, h], 2) / np.linalg.norm(vv[b, :, h], 2)
                   for b in range(a.shape[0]) for h in range(a.shape[2]))
    return {"spectral": float(spectral), "frobenius": float(np.linalg.norm(a - e) / np.linalg.norm(e))}


def markdown(rows: Sequence[dict], args: argparse.Namespace, device: dict, load: tuple[dict, dict]) -> str:
    """The report: settings and one table row per (T, mechanism)."""
    table = report.markdown_table(
        ["T", "mechanism", "time", "dense xla", "time / dense", "peak memory", "ε bound (Eq. 2)", "rel. F error"],
        [[r["T"], p, _ms(r["seconds"][p]), _ms(r["seconds"]["dense"]),
          "-" if ratio is None else f"{ratio:.2f}x", report.format_bytes(r["peak_bytes"][p]),
          *((f"{r['hyper_error']['spectral']:.4f}", f"{r['hyper_error']['frobenius']:.3f}") if p == "hyper"
            else ("-", "-"))]
         for r in rows for p, ratio in r["ratio_to_dense"].items()])
    return "\n".join([
        f"# Combiner, CCA-Attention and HyperAttention vs dense blocked softmax ({device['platform']})", "",
        f"Device: `{device['device_kind']}`, {device['cpu_count']} CPUs, jax {device['jax_version']}. "
        f"B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, random normal inputs, forward only, "
        "causal. Combiner fixed/axial use region size ⌈√T⌉; CCA-Attention groups of "
        f"{args.group_size}, window {args.window}; HyperAttention the official defaults (7 hyperplanes, blocks "
        f"of 256, 256 samples), exact at T <= {args.hyper_min_seq_len}; its error against the exact output: "
        "ε bound = max over heads of ‖out − exact‖_op / ‖V‖_op, an upper bound on Eq. 2's ε (‖D⁻¹A‖_op ≥ 1), and "
        "the relative Frobenius error (large on near-uniform maps, whose exact rows average to near zero). Dense: `flash_attention_xla(mask=Causal())`. Paths timed "
        "interleaved in one run; the ratio is path time / dense time (below 1: faster).",
        "", host.load_note(*load), "", "CPU times are to be read as ratios only, not as absolute speeds.", "",
        table, ""])


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f} ms"


def plot(rows: Sequence[dict], path) -> None:
    """Time over dense against T, one line per mechanism."""
    plt = plots.plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, name in enumerate(rows[0]["ratio_to_dense"]):
        pts = [(r["T"], r["ratio_to_dense"][name]) for r in rows if r["ratio_to_dense"][name] is not None]
        if pts:
            ax.semilogx(*zip(*pts), "o-", color=f"C{i % 10}", label=name)
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="dense xla")
    ax.set(xlabel="T", ylabel="time / dense causal xla", title="full-attention stand-ins, forward")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; write JSON, markdown and PNG; print the table."""
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
