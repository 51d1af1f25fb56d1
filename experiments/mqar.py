"""E1: multi-query associative recall (MQAR) across every family, from Zoology (Arora et al. 2023).

"Zoology: Measuring and Improving Recall in Efficient Language Models", Sec. 3 and Fig. 2/3. A sequence
holds ``N`` key–value pairs ``k_1 v_1 … k_N v_N`` and then, in the rest of the sequence, each key once
more, in random order, at positions drawn with a power-law gap distribution; the model must output the
key's value right after the key. Only those answer positions are scored. Zoology's claim: attention
solves MQAR at small width, while a model with a fixed-size recurrent state needs that state to grow with
``N`` (their Fig. 2: accuracy against model width; Fig. 3: against recurrent state size).

Study: per model and width, a small 2-block language model (``experiments.lib.model``) trains on batches that
mix every pair count of ``--kv-pairs`` (as Zoology trains on a mixture of configurations), then is scored on
held-out sequences of each pair count. Models: registry mechanisms (``--mechanisms``, through
``MultiHeadAttention``; names of ``attnjax.nn.BLOCKS`` are accepted there too), causal registered layers
(``--layers``: the memory layers Titans MAC/MAG/MAL, the neural memory, RAT, and every other causal layer), or
``--all``: every registered mechanism, layer and block with a causal form. The x-axis is each model's decoding
state in floats per sequence (``experiments.lib.mqar_runs.state_size``: its ``init_cache`` at ``T``), the
y-axis test accuracy, one panel per (family, pair count). The table lists the models left out and why.

    python -m experiments.mqar                  # CPU default: five models, d_model 64, about 3 minutes
    python -m experiments.mqar --mechanisms softmax --layers neural_memory,rat --name mqar_families_memory_cpu
    python -m experiments.mqar --mechanisms softmax,lightning,based_linear:8,baseconv --d-models 32,64,128 \\
        --name mqar_families_widths_cpu         # the kept runs: memory layers (2.4 min), widths (5 min)
    python -m experiments.mqar --all --d-models 64 --num-layers 1 --steps 150 --name mqar_families_all_cpu
                                                # the kept --all run: 76 models, 52 min on 2 shared cores
    python -m experiments.mqar --mechanisms softmax,lightning,based_linear --layers titans_mac,rat \\
        --d-models 64,128,256 --kv-pairs 8,16,32,64 --seq-len 256 --vocab-size 8192 --steps 4000

Deviations from the paper's setup, for CPU budgets (flags restore most of it): a vocabulary of 128
instead of 8192; T = 32 and N up to 8 instead of T up to 512 and N up to 64; 200 steps on fresh
samples instead of 64 epochs over 100k examples; RoPE instead of learned absolute positions; and a short
causal convolution before each block (``--short-conv 3``, as in the H3/BASED hybrids Zoology also trains),
which spares every mechanism the slow emergence of a previous-token head, so that a short run measures
associative memory rather than optimization luck (``--short-conv 0`` removes it).

Reading ``--all`` at T = 32: most block-sparse mechanisms' default blocks (64 tokens or more) cover the whole
sequence, so they compute dense causal attention (their accuracies equal softmax's to three digits in the kept
run); only ``sparse_window`` is given 8-token blocks (``mqar_runs.OPTIONS``). A KV-cache model that fails there
(sigmoid, stick-breaking, the Combiner variants) keeps every pair, so its failure is optimization at this budget,
not state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.lines import Line2D
from scipy import stats

from experiments.lib import cli, host, mqar_runs, plots, report
from experiments.lib.model import LAYER_PREFIX, causal_layer_names, mixer_names
from experiments.lib.mqar_runs import MQARSettings

DEFAULT = MQARSettings()
SMOKE = dict(mechanisms=["softmax"], layers=[], d_models=[16], kv_pairs=[2, 4], seq_len=16, vocab_size=32,
             num_layers=1, head_dim=8, steps=24, batch_size=8, warmup_steps=3, lr=2e-2, test_examples=16)
"""Defaults under ``--smoke`` (explicit flags still win): one tiny softmax model, 24 steps, for tests."""

ZOOLOGY_CLAIM = ("Zoology (Arora et al. 2023, Sec. 3, Fig. 2/3): attention solves MQAR at every width they try, "
                 "while gated-convolution and other fixed-state models need a model dimension (state size) that "
                 "grows with the number of key-value pairs; accuracy follows state size.")


def mechanism_names() -> list[str]:
    """What ``--mechanisms`` takes: the ``ModelConfig.mixer`` names but the layers (those go to ``--layers``)."""
    return [n for n in mixer_names() if not n.startswith(LAYER_PREFIX)]


def name_list(text: str) -> list[str]:
    """``"softmax,lightning"`` -> ``["softmax", "lightning"]``; ``""`` -> ``[]``."""
    return [n for n in text.split(",") if n]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults (``MQARSettings``) take about 3 minutes on a 2-core CPU."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", type=name_list, default=list(DEFAULT.mechanisms),
                   help=f"registry mechanisms (name or name:head_dim) or blocks: {', '.join(mechanism_names())}")
    p.add_argument("--layers", type=name_list, default=list(DEFAULT.layers),
                   help=f"registered causal layers: {', '.join(causal_layer_names())}")
    p.add_argument("--options", type=json.loads, default=dict(DEFAULT.options),
                   help="registry-config or constructor kwargs per model name, as JSON, replacing the default "
                        f"{json.dumps(dict(DEFAULT.options))}")
    p.add_argument("--all", action="store_true",
                   help="every registered mechanism, layer and block with a causal form (overrides the lists)")
    p.add_argument("--d-models", type=cli.parse_ints, default=list(DEFAULT.d_models), help="model widths")
    p.add_argument("--kv-pairs", type=cli.parse_ints, default=list(DEFAULT.kv_pairs),
                   help="key-value pair counts, mixed in training and scored one by one")
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
    cli.add_output_flags(p, "mqar_families")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    if args.all:
        chosen = [c for c in mqar_runs.candidates() if c.skip is None]
        args.mechanisms = [c.name for c in chosen if c.kind != "layer"]
        args.layers = [c.name for c in chosen if c.kind == "layer"]
    unknown = ({mqar_runs.parse_mechanism(m)[0] for m in args.mechanisms} - set(mechanism_names())) | (
        set(args.layers) - set(causal_layer_names()))
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; mechanisms and blocks: {mechanism_names()}; "
                f"causal layers: {causal_layer_names()}")
    if not (args.mechanisms or args.layers):
        p.error("no model: give --mechanisms, --layers or --all")
    return args


MAX_LINES = 8
"""Most models a family panel draws as lines with a legend; a run with more (``--all``) is drawn by family."""


def plot(rows: Sequence[dict], path: Path) -> None:
    """Accuracy against decoding state size (log x), saved to ``path``.

    Up to ``MAX_LINES`` models per family: small multiples, one row of panels per pair count, one column per
    family, one line per model (its widths). More (``--all``): one panel per pair count, every model a point
    coloured by family, a circle where the state grows with T (a KV cache), a square where it is fixed."""
    plt = plots.plt
    rows = [r for r in rows if r["state_size"] is not None]
    pairs = sorted({r["num_kv_pairs"] for r in rows})
    families = [f for f in mqar_runs.FAMILIES if any(r["family"] == f for r in rows)]
    if max(len({r["mechanism"] for r in rows if r["family"] == f}) for f in families) > MAX_LINES:
        return plot_by_family(rows, pairs, families, path)
    fig, axes = plt.subplots(len(pairs), len(families), figsize=(3.3 * len(families), 2.7 * len(pairs) + 0.6),
                             squeeze=False, sharex=True, sharey=True)
    for i, n in enumerate(pairs):
        for j, family in enumerate(families):
            ax = axes[i][j]
            models = list(dict.fromkeys(r["mechanism"] for r in rows if r["family"] == family))
            for k, model in enumerate(models):
                sel = sorted((r for r in rows if r["mechanism"] == model and r["num_kv_pairs"] == n),
                             key=lambda r: r["state_size"])
                ax.plot([r["state_size"] for r in sel], [r["accuracy"] for r in sel], "o-", color=f"C{k}",
                        label=model, ms=5)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(family, fontsize=10)
                ax.legend(fontsize=7, loc="best")
            if j == 0:
                ax.set_ylabel(f"N = {n} pairs\ntest accuracy")
            if i == len(pairs) - 1:
                ax.set_xlabel("decoding state (floats / sequence)")
    fig.suptitle("MQAR accuracy against decoding state size (Zoology Fig. 3 style)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_by_family(rows: Sequence[dict], pairs: Sequence[int], families: Sequence[str], path: Path) -> None:
    """``plot`` for many models: one panel per pair count, a point per (model, width), colour = family, marker =
    whether the state grows with T."""
    plt = plots.plt
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.4 * len(pairs), 4.2), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], pairs):
        for j, family in enumerate(families):
            for grows, marker in ((True, "o"), (False, "s")):
                sel = [r for r in rows
                       if r["num_kv_pairs"] == n and r["family"] == family and r["state_grows"] == grows]
                ax.scatter([r["state_size"] for r in sel], [r["accuracy"] for r in sel], marker=marker, s=22,
                           color=f"C{j}", alpha=0.7, edgecolors="none")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.set_title(f"N = {n} pairs", fontsize=10)
        ax.set_xlabel("decoding state (floats / sequence)")
    axes[0][0].set_ylabel("test accuracy")
    handles = [Line2D([], [], ls="", marker="o", color=f"C{j}", label=f) for j, f in enumerate(families)]
    handles += [Line2D([], [], ls="", marker=m, color="0.4", label=t)
                for m, t in (("o", "state grows with T (KV cache)"), ("s", "fixed-size state"))]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(f"MQAR accuracy against decoding state size, {len({r['mechanism'] for r in rows})} models "
                 "(Zoology Fig. 3 style)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def left_out(args: argparse.Namespace, failed: Sequence[dict]) -> str:
    """Markdown: the registered models that have no causal form (unless this run named them), those that failed
    to train here, and (unless ``--all``) the names not in this run's lists."""
    run = {mqar_runs.parse_mechanism(m)[0] for m in args.mechanisms} | {f"layer:{n}" for n in args.layers}
    run |= {f"block:{n}" for n in args.mechanisms}
    lines = [[c.label, c.family, c.skip] for c in mqar_runs.candidates() if c.skip is not None and c.label not in run]
    lines += [[f["mechanism"], f["family"], f"failed at d_model {f['d_model']}: {f['reason']}"] for f in failed]
    not_run = [c.label for c in mqar_runs.candidates() if c.skip is None and c.label not in run]
    parts = [report.markdown_table(["model", "family", "why left out"], lines)]
    if not_run:
        parts += ["", f"Not in this run's lists ({len(not_run)}; `--all` trains them): " + ", ".join(not_run) + "."]
    return "\n".join(parts)


def reading(rows: Sequence[dict]) -> str:
    """One generated sentence: accuracy at the largest N, for the models whose state grows with T (KV caches)
    and for the fixed-state ones ordered by state size, so the claim can be read against this run."""
    n = max(r["num_kv_pairs"] for r in rows)
    last = [r for r in rows if r["num_kv_pairs"] == n]

    def listing(sel):
        sel = sorted(sel, key=lambda r: (r["state_size"] is None, r["state_size"] or 0))
        return ", ".join(f"{r['mechanism']} (d {r['d_model']}, {r['state_size'] or '?'} floats) "
                         f"{r['accuracy']:.2f}" for r in sel) or "none"

    grows = [r for r in last if r["state_grows"]]
    fixed = [r for r in last if not r["state_grows"] and r["state_size"] is not None]
    return (f"This run at N = {n}: state growing with T (a KV cache): {listing(grows)}; "
            f"fixed-size state, by size: {listing(fixed)}.\n\n" + summary(grows, fixed, n))


def summary(grows: Sequence[dict], fixed: Sequence[dict], n: int) -> str:
    """One sentence at pair count ``n``: median accuracy and the count at >= 0.9 of the KV-cache and the fixed-state
    models, and the Spearman rank correlation of state size with accuracy over the fixed-state models."""
    def part(sel, what):
        if not sel:
            return f"no {what} models"
        accuracy = [r["accuracy"] for r in sel]
        return (f"{len(sel)} {what} models, median accuracy {np.median(accuracy):.2f}, "
                f"{sum(a >= 0.9 for a in accuracy)} at >= 0.9")
    rho = (stats.spearmanr([r["state_size"] for r in fixed], [r["accuracy"] for r in fixed])[0]
           if len(fixed) > 2 else float("nan"))
    return (f"At N = {n}: {part(grows, 'KV-cache')}; {part(fixed, 'fixed-state')}; over the fixed-state models, "
            f"Spearman rank correlation of state size with accuracy {rho:.2f}.")


def markdown(rows: Sequence[dict], failed: Sequence[dict], args: argparse.Namespace, argv: Sequence[str],
             run_info: dict) -> str:
    """The markdown page: command, settings, machine and load, the accuracy table, the models left out."""
    solved = []
    for mechanism, d_model in dict.fromkeys((r["mechanism"], r["d_model"]) for r in rows):
        ok = [r["num_kv_pairs"] for r in rows if (r["mechanism"], r["d_model"]) == (mechanism, d_model)
              and r["accuracy"] >= 0.9]
        solved.append(f"{mechanism} (d_model {d_model}): {max(ok) if ok else 'none'}")
    return "\n".join([
        f"# MQAR across families (Zoology) — {run_info['device']['platform']}", "",
        "`" + " ".join(["python -m experiments.mqar", *argv]) + "`", "",
        f"T = {args.seq_len}, vocab {args.vocab_size}, {args.num_layers} blocks, MLP ratio {args.mlp_ratio}, "
        f"short conv {args.short_conv}, {args.steps} AdamW steps of {args.batch_size} fresh sequences mixing "
        f"N = {', '.join(map(str, args.kv_pairs))} in equal parts (lr {args.lr}, warmup {args.warmup_steps}, "
        f"cosine), random non-queries: {args.random_non_queries}; accuracy on the answer tokens of "
        f"{args.test_examples} held-out sequences per N. Heads = d_model / head_dim (head_dim {args.head_dim}, or "
        f"D in `name:D`); options {json.dumps(args.options)}. State floats: the floating leaves of each block's "
        f"`init_cache(1, T)`, summed over blocks (`mqar_runs.state_size`: a KV cache is 2·T·H_kv·D per block, "
        f"a linear state H·D_k'·D_v; \"(kv)\": a mechanism without decode, given its keys and values). A cache "
        f"holds what the module's decode keeps: sparse_window's is the whole KV cache, though each query reads "
        f"only its window.", "",
        host.machine_line(run_info), "",
        mqar_runs.table(rows), "",
        "Largest N with accuracy >= 0.9: " + "; ".join(solved) + ".", "",
        "Claim: " + ZOOLOGY_CLAIM, "", reading(rows), "",
        "## Left out", "", left_out(args, failed), ""])


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Run the study, print the page, write ``<name>.json``, ``<name>.md`` and ``<name>.png`` to ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = host.start_run()
    failed: list[dict] = []
    rows = mqar_runs.sweep(cli.settings_from(MQARSettings, args), skipped=failed)
    run_info = host.finish_run(started)
    md = markdown(rows, failed, args, argv, run_info)
    print(md)
    report.write_json({"args": report.jsonable_args(args), **run_info, "results": rows, "failed": failed,
                       "left_out": [dataclasses.asdict(c) for c in mqar_runs.candidates() if c.skip is not None]},
                      f"{args.name}.json", args.out)
    (Path(args.out) / f"{args.name}.md").write_text(md)
    plot(rows, Path(args.out) / f"{args.name}.png")
    return rows


if __name__ == "__main__":
    main()
