"""E1: multi-query associative recall (MQAR), from Zoology (Arora et al. 2023).

"Zoology: Measuring and Improving Recall in Efficient Language Models", Sec. 3 and Fig. 2. A sequence
holds ``N`` key–value pairs ``k_1 v_1 … k_N v_N`` and then, in the rest of the sequence, each key once
more, in random order, at positions drawn with a power-law gap distribution; the model must output the
key's value right after the key. Only those answer positions are scored. Attention solves it at small
width; a fixed-size recurrent state must grow with ``N``.

Study: train a small 2-block ``experiments.train.LanguageModel`` per (mechanism, d_model, N) on fresh
samples every step, then report answer accuracy on a held-out test set, with each model's decoding
state size (``train.decode_state_size``), as a markdown table, JSON and a plot.

    python -m experiments.mqar                  # CPU default: 12 runs, about 15 minutes on 2 cores
    python -m experiments.mqar --mechanisms softmax,lightning,based_linear,linear \\
        --d-models 64,128,256 --kv-pairs 8,16,32,64 --seq-len 256 --vocab-size 8192 --steps 4000

``compare`` runs one small task per mechanism (about a minute for three), for the main job.

Deviations from the paper's setup, for CPU budgets (flags restore most of it): a vocabulary of 256
instead of 8192; a few hundred steps on fresh samples instead of 64 epochs over 100k examples; RoPE
instead of learned absolute positions; and a short causal convolution before each block
(``--short-conv 3``, as in the H3/BASED hybrids Zoology also trains), which spares every mechanism
the slow emergence of a previous-token head, so that a short run measures associative memory rather
than optimization luck (``--short-conv 0`` removes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from flax import nnx
from tqdm import tqdm

from experiments import common, train

QUICK_FLAGS = ["--d-models", "64", "--kv-pairs", "8", "--seq-len", "32", "--steps", "200", "--batch-size", "64",
               "--warmup-steps", "20", "--test-examples", "256"]
"""The ``compare(quick=True)`` setting: one width, one pair count, a short run."""
SMOKE = dict(d_models=[16], kv_pairs=[2, 4], seq_len=16, vocab_size=32, num_layers=1, steps=3, batch_size=4,
             warmup_steps=1, test_examples=8)
"""Defaults under ``--smoke`` (explicit flags still win): tiny models, a few steps, for tests."""


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """One MQAR task (Zoology's ``multiquery_ar``).

    Attributes:
      vocab_size: tokens ``V``; keys are drawn from ``[1, V/2)`` and values from ``[V/2, V)``.
      seq_len: sequence length ``T``.
      num_kv_pairs: key–value pairs ``N`` per sequence; ``4N <= T``.
      power_a: exponent ``a`` of the query gap distribution ``p(g) ∝ a g^(a−1)``, ``g = 1..(T − 2N)/2``
        (0.01 in the paper: queries tend to come soon after the pairs).
      random_non_queries: fill the non-query positions after the pairs with random tokens instead of 0
        (the paper's figure-2 runs use 0).
    """

    vocab_size: int = 256
    seq_len: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = False

    def __post_init__(self):
        if self.seq_len % 2:
            raise ValueError(f"seq_len must be even, got {self.seq_len}")
        if self.num_kv_pairs <= 0 or 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"num_kv_pairs must be in [1, seq_len/4 = {self.seq_len // 4}], got {self.num_kv_pairs}")
        if self.num_kv_pairs >= self.vocab_size // 2:
            raise ValueError(f"vocab_size={self.vocab_size} has {self.vocab_size // 2 - 1} keys, fewer than "
                             f"num_kv_pairs={self.num_kv_pairs}")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")


def _distinct(rng: np.random.Generator, batch: int, low: int, high: int, count: int) -> np.ndarray:
    """``[batch, count]`` integers from ``[low, high)``, distinct within each row, uniformly."""
    return np.argsort(rng.random((batch, high - low)), axis=1)[:, :count] + low


def mqar_batch(config: MQARConfig, batch_size: int, seed: Union[int, Sequence[int]]) -> train.Batch:
    """A batch of MQAR sequences: ``(inputs [B, T] int32, targets [B, T] int32)``.

    Positions ``0..2N−1`` hold ``k_1 v_1 … k_N v_N`` (distinct keys from ``[1, V/2)``, distinct values from
    ``[V/2, V)``). Query ``i`` puts ``k_i`` at position ``2N + 2 g_i`` where the distinct gaps ``g_i`` are
    drawn without replacement with ``p(g) ∝ (g + 1)^(a − 1)``; its target there is ``v_i`` (the next
    token). Every other target is ``train.IGNORE``. Sampling without replacement uses Gumbel top-k,
    which draws the same distribution as Zoology's sequential ``np.random.choice(replace=False, p=p)``.
    The result is a deterministic function of ``seed`` (an int or a tuple of ints).
    """
    rng = np.random.default_rng(seed)
    V, T, N = config.vocab_size, config.seq_len, config.num_kv_pairs
    keys = _distinct(rng, batch_size, 1, V // 2, N)
    values = _distinct(rng, batch_size, V // 2, V, N)
    space = (T - 2 * N) // 2
    log_p = (config.power_a - 1.0) * np.log(np.arange(1, space + 1))
    gaps = np.argsort(-(log_p + rng.gumbel(size=(batch_size, space))), axis=1)[:, :N]
    if config.random_non_queries:
        inputs = rng.integers(0, V, (batch_size, T))
    else:
        inputs = np.zeros((batch_size, T), np.int64)
    inputs[:, 0:2 * N:2], inputs[:, 1:2 * N:2] = keys, values
    query_positions = 2 * N + 2 * gaps
    np.put_along_axis(inputs, query_positions, keys, axis=1)
    targets = np.full((batch_size, T), train.IGNORE, np.int64)
    np.put_along_axis(targets, query_positions, values, axis=1)
    return inputs.astype(np.int32), targets.astype(np.int32)


def parse_mechanism(spec: str) -> tuple[str, Optional[int]]:
    """``"based_linear:8"`` -> ``("based_linear", 8)``; ``"softmax"`` -> ``("softmax", None)`` (default head_dim)."""
    name, _, head_dim = spec.partition(":")
    return name, int(head_dim) if head_dim else None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults take about 15 minutes on a 2-core CPU (``compare`` about one)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", type=lambda s: s.split(","),
                   default=["softmax", "lightning", "based_linear:8", "based_linear"],
                   help=f"comma-separated mixers, each optionally name:head_dim: {', '.join(train.mixer_names())}")
    p.add_argument("--d-models", type=common.parse_ints, default=[64], help="model widths")
    p.add_argument("--kv-pairs", type=common.parse_ints, default=[4, 8, 16], help="key-value pairs per sequence")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--power-a", type=float, default=0.01)
    p.add_argument("--random-non-queries", action="store_true", help="random filler tokens instead of 0")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16,
                   help="features per head (heads = d_model / head_dim); a mechanism given as name:D uses D")
    p.add_argument("--mlp-ratio", type=int, default=0, help="0: no MLP (Zoology's MQAR models)")
    p.add_argument("--short-conv", type=int, default=3, help="causal conv kernel before each block (0: none)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--test-examples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps of tiny models (tests)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output directory")
    p.add_argument("--name", default=None, help="output file stem (default mqar_<platform>)")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    unknown = {parse_mechanism(m)[0] for m in args.mechanisms} - set(train.mixer_names())
    if unknown:
        p.error(f"unknown mechanisms {sorted(unknown)}; known: {train.mixer_names()}")
    return args


def run_one(args: argparse.Namespace, mechanism: str, d_model: int, num_kv_pairs: int) -> dict:
    """Train one model on one MQAR task and measure its test accuracy on the answer positions."""
    task = MQARConfig(vocab_size=args.vocab_size, seq_len=args.seq_len, num_kv_pairs=num_kv_pairs,
                      power_a=args.power_a, random_non_queries=args.random_non_queries)
    name, head_dim = parse_mechanism(mechanism)
    head_dim = head_dim or args.head_dim
    model_config = train.ModelConfig(vocab_size=args.vocab_size, mixer=name, d_model=d_model,
                                     num_layers=args.num_layers, num_heads=max(d_model // head_dim, 1),
                                     head_dim=head_dim, mlp_ratio=args.mlp_ratio, short_conv=args.short_conv)
    train_config = train.TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup_steps,
                                     weight_decay=args.weight_decay)
    model = train.LanguageModel(model_config, rngs=nnx.Rngs(args.seed))
    start = time.perf_counter()
    history = train.train(model, lambda step: mqar_batch(task, args.batch_size, (args.seed, 0, step)), train_config,
                          desc=f"{mechanism} d={d_model} N={num_kv_pairs}", progress=not args.no_progress)
    seconds = time.perf_counter() - start
    test = mqar_batch(task, args.test_examples, (args.seed, 1))
    batches = [(test[0][i:i + 256], test[1][i:i + 256]) for i in range(0, args.test_examples, 256)]
    result = train.evaluate(model, batches)
    return {"mechanism": mechanism, "d_model": d_model, "num_kv_pairs": num_kv_pairs,
            "num_heads": model_config.num_heads, "head_dim": head_dim,
            "accuracy": result["accuracy"], "test_loss": result["loss"],
            "state_size": train.decode_state_size(model_config, args.seq_len),
            "params": train.num_params(model), "train_seconds": seconds,
            "final_train_loss": history[-1]["loss"], "history": history}


def run(args: argparse.Namespace) -> list[dict]:
    """``run_one`` over mechanisms × d_models × kv_pairs, in that order."""
    grid = list(itertools.product(args.mechanisms, args.d_models, args.kv_pairs))
    rows = []
    for mechanism, d_model, pairs in tqdm(grid, desc="mqar", disable=args.no_progress, dynamic_ncols=True):
        rows.append(run_one(args, mechanism, d_model, pairs))
        if not args.no_progress:
            tqdm.write(f"{mechanism} d_model={d_model} N={pairs}: accuracy {rows[-1]['accuracy']:.3f} "
                       f"({rows[-1]['train_seconds']:.0f} s)")
    return rows


def compare(mechanisms: Sequence[str], *, quick: bool = True, seed: int = 0) -> list[dict]:
    """Train each mechanism on one MQAR task and return its row (accuracy, state size, ...).

    ``quick=True``: d_model 64, 8 pairs, T = 32, 200 steps of batch 64 (``QUICK_FLAGS``; about a minute for
    softmax, lightning and based_linear on two CPU cores);
    ``quick=False``: this module's default sweep for those mechanisms.
    """
    flags = (QUICK_FLAGS if quick else []) + ["--mechanisms", ",".join(mechanisms), "--seed", str(seed),
                                              "--no-progress"]
    return run(parse_args(flags))


def table(rows: Sequence[dict]) -> str:
    """Markdown: one row per (mechanism, d_model) with its state size, one accuracy column per pair count."""
    pairs = sorted({r["num_kv_pairs"] for r in rows})
    by_key = {(r["mechanism"], r["d_model"], r["num_kv_pairs"]): r for r in rows}
    lines = []
    for mechanism, d_model in dict.fromkeys((r["mechanism"], r["d_model"]) for r in rows):
        row = by_key[mechanism, d_model, pairs[0]]
        state = "?" if row["state_size"] is None else f"{row['state_size']:,}"
        lines.append([mechanism, d_model, state, f"{row['params']:,}"]
                     + [f"{by_key[mechanism, d_model, n]['accuracy']:.3f}" if (mechanism, d_model, n) in by_key
                        else "" for n in pairs])
    return common.markdown_table(["mechanism", "d_model", "state floats", "params"]
                                 + [f"N={n}" for n in pairs], lines)


def plot(rows: Sequence[dict], path: Path) -> None:
    """Accuracy against pairs (one panel per d_model) and against decoding state size (last panel)."""
    plt = common.pyplot()
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
        common.label_x(ax, sorted({r["num_kv_pairs"] for r in rows}))
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


def report(rows: Sequence[dict], args: argparse.Namespace, argv: Sequence[str], run_info: dict) -> str:
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
        table(rows), "",
        "Largest N with accuracy >= 0.9: " + "; ".join(solved) + ".", ""])


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Run the sweep, print the table, write ``<name>.json``, ``<name>.md`` and ``<name>.png`` to ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    rows = run(args)
    run_info = {"device": common.device_info(), "wall_seconds": time.perf_counter() - start,
                "load_start": load_start, "load_end": os.getloadavg()[0]}
    name = args.name or f"mqar_{run_info['device']['platform']}"
    md = report(rows, args, argv, run_info)
    print(md)
    common.write_json({"args": common.jsonable_args(args), **run_info, "results": rows}, f"{name}.json", args.out)
    (Path(args.out) / f"{name}.md").write_text(md)
    plot(rows, Path(args.out) / f"{name}.png")
    return rows


if __name__ == "__main__":
    main()
