"""E1: multi-query associative recall (MQAR), from Zoology (Arora et al. 2023).

"Zoology: Measuring and Improving Recall in Efficient Language Models", Sec. 3 and Fig. 2. A sequence
holds ``N`` key–value pairs ``k_1 v_1 … k_N v_N`` and then, in the rest of the sequence, each key once
more, in random order, at positions drawn with a power-law gap distribution; the model must output the
key's value right after the key. Only those answer positions are scored. Attention solves it at small
width; a fixed-size recurrent state must grow with ``N``.

Study: train a small 2-block ``experiments.lib.model.LanguageModel`` per (mechanism, d_model, N) on fresh
samples every step, then report answer accuracy on a held-out test set, with each model's decoding
state size (``model.decode_state_size``), as a markdown table, JSON and a plot (the runs are
``experiments.lib.mqar_runs``, the data ``experiments.lib.mqar_data``).

    python -m experiments.mqar                  # CPU default: 12 runs, about 15 minutes on 2 cores
    python -m experiments.mqar --mechanisms softmax,lightning,based_linear,linear \\
        --d-models 64,128,256 --kv-pairs 8,16,32,64 --seq-len 256 --vocab-size 8192 --steps 4000
    python -m experiments.mqar --mechanisms softmax,baseconv,zoology_hybrid --kv-pairs 8

The last compares Zoology's gated convolution (block ``baseconv``) with its Sec. 5 hybrid of gated
convolutions and input-dependent sparse attention (block ``zoology_hybrid``, ``attnjax.nn.zoology``);
every name in ``attnjax.nn.BLOCKS`` is a ``--mechanisms`` option.

Deviations from the paper's setup, for CPU budgets (flags restore most of it): a vocabulary of 256
instead of 8192; a few hundred steps on fresh samples instead of 64 epochs over 100k examples; RoPE
instead of learned absolute positions; and a short causal convolution before each block
(``--short-conv 3``, as in the H3/BASED hybrids Zoology also trains), which spares every mechanism
the slow emergence of a previous-token head, so that a short run measures associative memory rather
than optimization luck (``--short-conv 0`` removes it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from experiments.lib import cli, host, mqar_runs, plots, report
from experiments.lib.model import mixer_names
from experiments.lib.mqar_runs import MQARSettings

DEFAULT = MQARSettings()
SMOKE = dict(d_models=[16], kv_pairs=[2, 4], seq_len=16, vocab_size=32, num_layers=1, steps=3, batch_size=4,
             warmup_steps=1, test_examples=8)
"""Defaults under ``--smoke`` (explicit flags still win): tiny models, a few steps, for tests."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults (``MQARSettings``) take about 15 minutes on a 2-core CPU."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", type=lambda s: s.split(","), default=list(DEFAULT.mechanisms),
                   help=f"comma-separated mixers, each optionally name:head_dim: {', '.join(mixer_names())}")
    p.add_argument("--d-models", type=cli.parse_ints, default=list(DEFAULT.d_models), help="model widths")
    p.add_argument("--kv-pairs", type=cli.parse_ints, default=list(DEFAULT.kv_pairs),
                   help="key-value pairs per sequence")
    p.add_argument("--seq-len", type=int, default=DEFAULT.seq_len)
    p.add_argument("--vocab-size", type=int, default=DEFAULT.vocab_size)
    p.add_argument("--power-a", type=float, default=DEFAULT.power_a)
    p.add_argument("--random-non-queries", action="store_true", help="random filler tokens instead of 0")
    p.add_argument("--num-layers", type=int, default=DEFAULT.num_layers)
    p.add_argument("--head-dim", type=int, default=DEFAULT.head_dim,
                   help="features per head (heads = d_model / head_dim); a mechanism given as name:D uses D")
    p.add_argument("--mlp-ratio", type=int, default=DEFAULT.mlp_ratio, help="0: no MLP (Zoology's MQAR models)")
    p.add_argument("--short-conv", type=int, default=DEFAULT.short_conv,
                   help="causal conv kernel before each block (0: none)")
    cli.add_training_flags(p, DEFAULT)
    p.add_argument("--seed", type=int, default=DEFAULT.seed)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    cli.add_output_flags(p, "mqar")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    unknown = {mqar_runs.parse_mechanism(m)[0] for m in args.mechanisms} - set(mixer_names())
    if unknown:
        p.error(f"unknown mechanisms {sorted(unknown)}; known: {mixer_names()}")
    return args


def plot(rows: Sequence[dict], path: Path) -> None:
    """Accuracy against pairs (one panel per d_model) and against decoding state size (last panel)."""
    plt = plots.plt
    d_models = sorted({r["d_model"] for r in rows})
    mechanisms = list(dict.fromkeys(r["mechanism"] for r in rows))
    fig, axes = plt.subplots(1, len(d_models) + 1, figsize=(4 * (len(d_models) + 1), 3.4), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(mechanisms)}
    for ax, d_model in zip(axes[0], d_models):
        for mechanism in mechanisms:
            sel = sorted((r for r in rows if r["mechanism"] == mechanism and r["d_model"] == d_model),
                         key=lambda r: r["num_kv_pairs"])
            ax.plot([r["num_kv_pairs"] for r in sel], [r["accuracy"] for r in sel], "o-", color=colors[mechanism],
                    label=mechanism)
        ax.set_xscale("log", base=2)
        plots.label_x(ax, sorted({r["num_kv_pairs"] for r in rows}))
        ax.set(title=f"d_model = {d_model}", xlabel="key-value pairs", ylabel="test accuracy", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    for mechanism in mechanisms:
        sel = [r for r in rows if r["mechanism"] == mechanism and r["state_size"] is not None]
        ax.scatter([r["state_size"] for r in sel], [r["accuracy"] for r in sel], color=colors[mechanism],
                   label=mechanism, s=[12 * r["num_kv_pairs"] ** 0.5 for r in sel])
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set(title="accuracy vs decoding state (size ~ pairs)", xlabel="state floats per sequence",
           ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: Sequence[dict], args: argparse.Namespace, argv: Sequence[str], run_info: dict) -> str:
    """The markdown page: command, settings, machine and load, the accuracy table, and how to read it."""
    solved = []
    for mechanism, d_model in dict.fromkeys((r["mechanism"], r["d_model"]) for r in rows):
        ok = [r["num_kv_pairs"] for r in rows if (r["mechanism"], r["d_model"]) == (mechanism, d_model)
              and r["accuracy"] >= 0.9]
        solved.append(f"{mechanism} (d_model {d_model}): {max(ok) if ok else 'none'}")
    return "\n".join([
        f"# MQAR (Zoology) — {run_info['device']['platform']}", "",
        "`" + " ".join(["python -m experiments.mqar", *argv]) + "`", "",
        f"T = {args.seq_len}, vocab {args.vocab_size}, {args.num_layers} blocks, MLP ratio {args.mlp_ratio}, "
        f"short conv {args.short_conv}, {args.steps} AdamW steps of {args.batch_size} fresh sequences (lr {args.lr}, "
        f"warmup {args.warmup_steps}, cosine), random non-queries: {args.random_non_queries}; accuracy on the answer "
        f"tokens of {args.test_examples} held-out sequences. Heads = d_model / head_dim (head_dim {args.head_dim}, "
        f"or D in `name:D`). State floats: what the model keeps per sequence to decode the next token "
        f"(KV cache at T for softmax; the fixed-size state of linear attention), summed over blocks.", "",
        f"Machine: {run_info['device']['device_kind']}, {run_info['device']['cpu_count']} cores, jax "
        f"{run_info['device']['jax_version']}; load average {run_info['load_start']:.1f} at start, "
        f"{run_info['load_end']:.1f} at end (shared with other jobs); {run_info['wall_seconds'] / 60:.1f} min.", "",
        mqar_runs.table(rows), "",
        "Largest N with accuracy >= 0.9: " + "; ".join(solved) + ".", ""])


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Run the sweep, print the table, write ``<name>.json``, ``<name>.md`` and ``<name>.png`` to ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    rows = mqar_runs.sweep(cli.settings_from(MQARSettings, args))
    run_info = {"device": host.device_info(), "wall_seconds": time.perf_counter() - start,
                "load_start": load_start, "load_end": os.getloadavg()[0]}
    md = markdown(rows, args, argv, run_info)
    print(md)
    report.write_json({"args": report.jsonable_args(args), **run_info, "results": rows}, f"{args.name}.json",
                      args.out)
    (Path(args.out) / f"{args.name}.md").write_text(md)
    plot(rows, Path(args.out) / f"{args.name}.png")
    return rows


if __name__ == "__main__":
    main()
