"""E4: passkey / needle-in-a-haystack retrieval over a depth × length grid, with length extrapolation.

The task (``experiments.lib.needle_data``; passkey retrieval of Mohtashami & Jaggi 2023, Sec. 4.2; the
depth × length grid of the needle-in-a-haystack tests, RULER's "NIAH single", Hsieh et al. 2024): random
filler tokens hide one needle ``MARK key v_1 … v_m`` at a relative depth, and the sequence ends with the
query ``QUERY key``; the model must output the value's ``m`` digits (teacher-forced, only those positions
scored). Per model, a small ``experiments.lib.model.LanguageModel`` trains at one length ``T`` on needles
at uniformly random depths, then is scored at ``T``, ``2T`` and ``4T`` (by default) with the needle at
depths 0, 0.25, 0.5, 0.75 and 1 (0: the first token; 1: right before the query): accuracy per value
digit (chance ``1/num_digits``) and exact match of the whole value, as a table, JSON and one heat-map
figure with a panel per model.

Models: any registry mechanism through ``MultiHeadAttention(mechanism=...)`` (``--mechanisms``), any
registered causal layer (``--layers``, ``attnjax.nn.LAYERS``, ``ModelConfig(mixer="layer:<name>")``) and
any registered block (``--blocks``, ``attnjax.nn.BLOCKS``), all in one run. Positions: RoPE (base 10000)
in every attention layer that takes one, the house model's default, trained only up to ``T`` (``--no-rope``
drops it, leaving causal masking and the short convolution as the only position signals).

    python -m experiments.needle                # CPU default: softmax and the BASED layer, about 4 minutes
    python -m experiments.needle --mechanisms softmax,lightning --layers based,titans_mac --seq-len 128 \\
        --length-multiples 1,2,4,8 --steps 2000 --d-model 128

The short causal convolution before each block (``--short-conv 3``, as in ``experiments.mqar``) lets a
token see its neighbours, so a short run measures retrieval rather than how long a previous-token head
takes to form (``--short-conv 0`` removes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from attnjax import registry
from attnjax.nn import BLOCKS
from experiments.lib import cli, host, plots, report
from experiments.lib.model import LAYER_PREFIX, LanguageModel, ModelConfig, causal_layer_names, logits, num_params
from experiments.lib.needle_data import FILLERS, NeedleTask, needle_batch
from experiments.lib.training import IGNORE, TrainConfig, token_loss, train

KINDS = ("mechanism", "layer", "block")
"""How a model's mixer is named: a registry mechanism, an ``attnjax.nn.LAYERS`` name or a ``BLOCKS`` name."""
SMOKE = dict(mechanisms=["softmax"], layers=[], blocks=[], seq_len=16, length_multiples=[1, 2], depths=[0.0, 1.0],
             d_model=16, num_layers=1, head_dim=8, num_keys=4, filler_vocab=8, value_len=1, steps=60,
             batch_size=16, lr=2e-2, warmup_steps=4, test_examples=32)
"""Defaults under ``--smoke`` (explicit flags still win): one tiny softmax model, 60 steps, for tests."""


def name_list(text: str) -> list[str]:
    """``"softmax,lightning"`` -> ``["softmax", "lightning"]``; ``""`` -> ``[]``."""
    return [n for n in text.split(",") if n]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults take about 4 minutes on a 2-core CPU."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", type=name_list, default=["softmax"],
                   help="registry mechanisms, through MultiHeadAttention: "
                        + ", ".join(e.name for e in registry.entries()))
    p.add_argument("--layers", type=name_list, default=["based"],
                   help=f"registered causal layers: {', '.join(causal_layer_names())}")
    p.add_argument("--blocks", type=name_list, default=[], help=f"registered blocks: {', '.join(BLOCKS)}")
    p.add_argument("--layer-options", type=json.loads, default={},
                   help='constructor kwargs per layer or block name, as JSON: \'{"based": {"feature_dim": 8}}\'')
    p.add_argument("--seq-len", type=int, default=64, help="training length T")
    p.add_argument("--length-multiples", type=cli.parse_ints, default=[1, 2, 4], help="test lengths, multiples of T")
    p.add_argument("--depths", type=lambda s: [float(d) for d in s.split(",")], default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths tested, in [0, 1]")
    p.add_argument("--num-keys", type=int, default=16)
    p.add_argument("--num-digits", type=int, default=10)
    p.add_argument("--value-len", type=int, default=2, help="digits per value")
    p.add_argument("--filler-vocab", type=int, default=32)
    p.add_argument("--filler", choices=FILLERS, default="random")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16, help="features per head (heads = d_model / head_dim)")
    p.add_argument("--mlp-ratio", type=int, default=0, help="0: no MLP")
    p.add_argument("--short-conv", type=int, default=3, help="causal conv kernel before each block (0: none)")
    p.add_argument("--no-rope", dest="rope", action="store_false", help="no rotary positions")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--test-examples", type=int, default=128, help="held-out sequences per (length, depth) cell")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="orbax checkpoints per model under this directory; a rerun resumes from them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    cli.add_output_flags(p, "needle")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    checks = [("mechanisms", [e.name for e in registry.entries()], args.mechanisms),
              ("layers", causal_layer_names(), args.layers), ("blocks", list(BLOCKS), args.blocks)]
    for flag, known, given in checks:
        unknown = sorted(set(given) - set(known))
        if unknown:
            p.error(f"unknown --{flag} {unknown}; known: {sorted(known)}")
    if not (args.mechanisms or args.layers or args.blocks):
        p.error("no model: give --mechanisms, --layers or --blocks")
    if any(not 0 <= d <= 1 for d in args.depths):
        p.error(f"--depths must lie in [0, 1], got {args.depths}")
    return args


def task_from(args: argparse.Namespace) -> NeedleTask:
    """The needle task of the flags."""
    return NeedleTask(num_keys=args.num_keys, num_digits=args.num_digits, value_len=args.value_len,
                      filler_vocab=args.filler_vocab, filler=args.filler)


def models(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(kind, name)`` of every model of the run: mechanisms, then layers, then blocks."""
    return ([("mechanism", n) for n in args.mechanisms] + [("layer", n) for n in args.layers]
            + [("block", n) for n in args.blocks])


def label(kind: str, name: str) -> str:
    """``"softmax"`` for a mechanism, ``"layer:based"`` / ``"block:based"`` otherwise (names can coincide)."""
    return name if kind == "mechanism" else f"{kind}:{name}"


def build_model(args: argparse.Namespace, task: NeedleTask, kind: str, name: str) -> LanguageModel:
    """The ``LanguageModel`` of one ``(kind, name)``: its mixer is the mechanism, block or ``"layer:<name>"``."""
    config = ModelConfig(vocab_size=task.vocab_size, mixer=LAYER_PREFIX + name if kind == "layer" else name,
                         d_model=args.d_model, num_layers=args.num_layers,
                         num_heads=max(args.d_model // args.head_dim, 1),
                         head_dim=args.head_dim if kind == "mechanism" else None, mlp_ratio=args.mlp_ratio,
                         rope=args.rope, short_conv=args.short_conv,
                         mixer_options=args.layer_options.get(name, {}) if kind != "mechanism" else {})
    return LanguageModel(config, rngs=nnx.Rngs(args.seed))


def score(model: LanguageModel, inputs: np.ndarray, targets: np.ndarray) -> dict:
    """Digit accuracy, exact match of the whole value and mean loss (nats per digit) on a batch."""
    out = logits(model, inputs)
    total, correct, count = token_loss(out, jnp.asarray(targets))
    scored = targets != IGNORE
    right = (np.asarray(jnp.argmax(out, axis=-1)) == targets) | ~scored
    return {"accuracy": int(correct) / int(count), "exact": float(np.mean(np.all(right, axis=1))),
            "loss": float(total) / int(count)}


def run_one(args: argparse.Namespace, task: NeedleTask, kind: str, name: str) -> dict:
    """Train one model at ``--seq-len`` and score it on every (test length, depth) cell."""
    model = build_model(args, task, kind, name)
    train_config = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup_steps,
                               weight_decay=args.weight_decay)
    checkpoints = None if args.checkpoint_dir is None else Path(args.checkpoint_dir) / f"{kind}-{name}"
    start = time.perf_counter()
    history = train(model, lambda step: needle_batch(task, args.batch_size, args.seq_len, None, (args.seed, 0, step)),
                    train_config, checkpoint_dir=checkpoints, desc=label(kind, name), progress=args.progress)
    seconds = time.perf_counter() - start
    last = history[-1] if history else {}  # empty when a checkpoint already held the last step
    cells = []
    for multiple in args.length_multiples:
        length = multiple * args.seq_len
        for i, depth in enumerate(args.depths):
            inputs, targets = needle_batch(task, args.test_examples, length, depth, (args.seed, 1, length, i))
            cells.append({"length": length, "multiple": multiple, "depth": depth, **score(model, inputs, targets)})
    return {"model": label(kind, name), "kind": kind, "name": name, "params": num_params(model),
            "train_seconds": seconds, "final_train_loss": last.get("loss"),
            "final_train_accuracy": last.get("accuracy"), "cells": cells, "history": history}


def grid(row: dict, metric: str = "accuracy") -> tuple[list[float], list[int], np.ndarray]:
    """``(depths, lengths, values [depths, lengths])`` of one model's cells."""
    depths = sorted({c["depth"] for c in row["cells"]})
    lengths = sorted({c["length"] for c in row["cells"]})
    values = np.full((len(depths), len(lengths)), np.nan)
    for c in row["cells"]:
        values[depths.index(c["depth"]), lengths.index(c["length"])] = c[metric]
    return depths, lengths, values


def plot(rows: Sequence[dict], path: Path, seq_len: int, chance: float) -> None:
    """One heat map per model (depth × test length, digit accuracy, values written in), side by side."""
    plt = plots.plt
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows) + 1.2, 3.4), squeeze=False, sharey=True,
                             constrained_layout=True)
    image = None
    for ax, row in zip(axes[0], rows):
        depths, lengths, values = grid(row)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set(title=row["model"], xlabel="test length (tokens)")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label=f"digit accuracy (chance {chance:.2f})", shrink=0.9)
    fig.suptitle(f"needle retrieval, trained at T = {seq_len}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tables(rows: Sequence[dict]) -> str:
    """Markdown: per model, digit accuracy (and exact match) per depth and test length, then the mean row."""
    parts = []
    for row in rows:
        depths, lengths, acc = grid(row)
        exact = grid(row, "exact")[2]
        lines = [[f"{d:g}"] + [f"{a:.3f} / {e:.3f}" for a, e in zip(acc[i], exact[i])] for i, d in enumerate(depths)]
        lines.append(["mean"] + [f"{a:.3f} / {e:.3f}" for a, e in zip(acc.mean(0), exact.mean(0))])
        loss = row["final_train_loss"]
        trained = "restored from its last checkpoint" if loss is None else f"final train loss {loss:.3f}"
        parts += [f"**{row['model']}** ({row['params']:,} params, {row['train_seconds']:.0f} s training, {trained})",
                  "",
                  report.markdown_table(["depth"] + [f"T={n}" for n in lengths], lines), ""]
    return "\n".join(parts)


def markdown(rows: Sequence[dict], args: argparse.Namespace, argv: Sequence[str], run_info: dict) -> str:
    """The markdown page: command, settings, machine and load, and the accuracy tables."""
    task, device = task_from(args), run_info["device"]
    position = "RoPE (base 10000) in the attention layers that take it" if args.rope else "no RoPE"
    return "\n".join([
        f"# Passkey / needle retrieval — {device['platform']}", "",
        "`" + " ".join(["python -m experiments.needle", *argv]) + "`", "",
        f"Task: {task.num_keys} keys, values of {task.value_len} digits out of {task.num_digits} (chance "
        f"{1 / task.num_digits:.2f} per digit, {task.num_digits ** -task.value_len:.3f} exact), {args.filler} filler "
        f"from {task.filler_vocab} tokens; vocabulary {task.vocab_size}. Model: d_model {args.d_model}, "
        f"{args.num_layers} blocks, heads of {args.head_dim}, MLP ratio {args.mlp_ratio}, short conv "
        f"{args.short_conv}, {position}. Training: T = {args.seq_len}, needles at uniform random depths, {args.steps} AdamW steps of "
        f"{args.batch_size} fresh sequences (lr {args.lr}, warmup {args.warmup_steps}, cosine). Test: "
        f"{args.test_examples} held-out sequences per cell; cells give digit accuracy / exact match of the value.", "",
        host.machine_line(run_info), "",
        tables(rows)])


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Train and score every model, print the tables, write ``<name>.json``, ``.md`` and ``.png`` to ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    task = task_from(args)
    started = host.start_run()
    rows = []
    for kind, name in tqdm(models(args), desc="needle", disable=not args.progress, dynamic_ncols=True):
        rows.append(run_one(args, task, kind, name))
        if args.progress:
            means = grid(rows[-1])[2].mean(0)
            tqdm.write(f"{rows[-1]['model']}: mean digit accuracy per length "
                       + ", ".join(f"{m}T {v:.3f}" for m, v in zip(args.length_multiples, means)))
    run_info = host.finish_run(started)
    md = markdown(rows, args, argv, run_info)
    print(md)
    out = Path(args.out)
    report.write_json({"args": report.jsonable_args(args), "vocab_size": task.vocab_size, **run_info,
                       "results": rows}, f"{args.name}.json", out)
    (out / f"{args.name}.md").write_text(md)
    plot(rows, out / f"{args.name}.png", args.seq_len, 1 / task.num_digits)
    return rows


if __name__ == "__main__":
    main()
