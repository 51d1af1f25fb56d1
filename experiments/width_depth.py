"""E5: width versus depth at a fixed total head count, on the byte-level LM of ``experiments.lm_bytes``.

Brown et al. 2022, "Wide Attention Is The Way Forward For Transformers?" (arXiv 2210.00640, Sec. 3): the
model aspect ratio trades layers for heads per layer while the total number of heads and every other
hyperparameter stay fixed, "fixing the attention computation size": each head keeps its width (``--head-dim``),
so a layer of ``H`` heads attends in ``H · head_dim`` features and projects back to ``d_model``. With
``--total-heads 8``: 1 layer × 8 heads (wide), 2 × 4, 4 × 2, 8 × 1 (deep). Parameter counts are *not*
matched, as in the paper (the wide model has one MLP where the deep one has eight: "half the size"); the
table reports them. The paper's claim: wide single-layer models are comparable to or better than deep ones
("0.3% better" on average over 4 tasks and 10 attention types) and faster (3.1× lower CPU inference latency
on byte-level IMDb).

Per configuration, an ``experiments.lib.model.LanguageModel`` trains on ``lm_bytes`` train windows of the
stdlib corpus (``lm_bytes.load_corpus``/``train_batch``, the same data and seed for all) and is scored in
validation bits per byte at the training context (``lm_bytes.bits_per_byte``). Timing: the training step
(wall time of the training loop after a compile warm-up, per step) and the inference latency of one
forward pass over ``[batch, T]`` (median of interleaved runs, ``experiments.lib.measure.time_thunks``),
each also as a ratio to the deepest model measured in the same run.

    python -m experiments.width_depth               # CPU default: 4 shapes, about 3 minutes on 2 cores
    python -m experiments.width_depth --total-heads 8 --head-dim 64 --d-model 256 --seq-len 256 --steps 3000
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from experiments import lm_bytes
from experiments.lib import cli, host, measure, plots, report
from experiments.lib.model import LanguageModel, ModelConfig, logits, mixer_names, num_params
from experiments.lib.training import TrainConfig, train

SMOKE = dict(total_heads=2, seq_len=16, d_model=16, head_dim=4, steps=40, batch_size=8, lr=1e-2, warmup_steps=2,
             eval_windows=4, latency_repeats=2)
"""Defaults under ``--smoke`` (explicit flags still win): two tiny shapes (1 × 2 and 2 × 1), 40 steps, for tests."""


def shapes(total_heads: int) -> list[tuple[int, int]]:
    """``(layers, heads per layer)`` for every divisor ``layers`` of ``total_heads``, widest first."""
    if total_heads <= 0:
        raise ValueError(f"total_heads must be positive, got {total_heads}")
    return [(layers, total_heads // layers) for layers in range(1, total_heads + 1) if total_heads % layers == 0]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults take about 3 minutes on a 2-core CPU."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanism", default="softmax", help=f"attention of every layer: {', '.join(mixer_names())}")
    p.add_argument("--total-heads", type=int, default=8, help="heads summed over layers (fixed across shapes)")
    p.add_argument("--head-dim", type=int, default=16, help="features per head (fixed across shapes)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--mlp-ratio", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64, help="training and validation context T")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=25)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--eval-windows", type=int, default=128, help="validation windows of T bytes")
    p.add_argument("--latency-repeats", type=int, default=20, help="timed forward passes per shape")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, default=None, help="source tree (default: the stdlib)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    cli.add_output_flags(p, "width_depth")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    if args.mechanism not in mixer_names():
        p.error(f"unknown mechanism {args.mechanism!r}; known: {mixer_names()}")
    if args.total_heads <= 0:
        p.error(f"--total-heads must be positive, got {args.total_heads}")
    return args


def model_config(args: argparse.Namespace, layers: int, heads: int) -> ModelConfig:
    """The byte LM of one shape: ``layers`` blocks of ``heads`` heads of ``--head-dim`` features."""
    return ModelConfig(vocab_size=256, mixer=args.mechanism, d_model=args.d_model, num_layers=layers,
                       num_heads=heads, head_dim=args.head_dim, mlp_ratio=args.mlp_ratio)


def run_one(args: argparse.Namespace, corpus: lm_bytes.Corpus, windows: np.ndarray, layers: int, heads: int
            ) -> tuple[dict, LanguageModel]:
    """Train one shape; its validation bits per byte, parameters and seconds per training step."""
    config = model_config(args, layers, heads)
    model = LanguageModel(config, rngs=nnx.Rngs(args.seed))
    train_config = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup_steps,
                               weight_decay=args.weight_decay)

    def batches(step):
        return lm_bytes.train_batch(corpus.train, args.batch_size, args.seq_len, (args.seed, step))

    warm_up = LanguageModel(config, rngs=nnx.Rngs(args.seed))  # its own buffers: the step donates them
    train(warm_up, batches, train_config, until=1, progress=False)  # compiles the step outside the timing
    start = time.perf_counter()
    history = train(model, batches, train_config, desc=f"{layers}x{heads}", progress=args.progress)
    seconds = time.perf_counter() - start
    row = {"shape": f"{layers} × {heads}", "layers": layers, "heads_per_layer": heads, "params": num_params(model),
           "bpb": lm_bytes.bits_per_byte(model, windows, args.seq_len), "train_seconds": seconds,
           "step_seconds": seconds / args.steps, "final_train_bpb": history[-1]["loss"] / math.log(2),
           "history": history}
    return row, model


def add_latency(rows: list[dict], models: Sequence[LanguageModel], args: argparse.Namespace) -> None:
    """Median forward latency over ``[batch, T]`` per shape, interleaved; ratios to the deepest shape."""
    tokens = jnp.zeros((args.batch_size, args.seq_len), jnp.int32)
    thunks = {row["shape"]: (lambda m=m: logits(m, tokens)) for row, m in zip(rows, models)}
    timings = measure.time_thunks(thunks, repeats=args.latency_repeats, warmup=1)
    deep = rows[-1]
    for row in rows:
        row["latency_seconds"] = timings[row["shape"]].median_s
    for row in rows:
        row["latency_vs_deepest"] = row["latency_seconds"] / deep["latency_seconds"]
        row["step_vs_deepest"] = row["step_seconds"] / deep["step_seconds"]
        row["params_vs_deepest"] = row["params"] / deep["params"]


def table(rows: Sequence[dict]) -> str:
    """Markdown: per shape, validation bits per byte, parameters, training step and inference latency."""
    headers = ["layers × heads", "val bits/byte", "params", "params / deepest", "train step (ms)",
               "step / deepest", "forward (ms)", "forward / deepest"]
    lines = [[r["shape"], f"{r['bpb']:.3f}", f"{r['params']:,}", f"{r['params_vs_deepest']:.2f}",
              f"{1e3 * r['step_seconds']:.1f}", f"{r['step_vs_deepest']:.2f}", f"{1e3 * r['latency_seconds']:.2f}",
              f"{r['latency_vs_deepest']:.2f}"] for r in rows]
    return report.markdown_table(headers, lines)


def finding(rows: Sequence[dict]) -> str:
    """One sentence comparing the widest and the deepest shape of this run."""
    wide, deep = rows[0], rows[-1]
    diff = wide["bpb"] - deep["bpb"]
    verdict = "better than" if diff < 0 else "worse than"
    return (f"This run: the widest shape ({wide['shape']}) reached {wide['bpb']:.3f} bits/byte against "
            f"{deep['bpb']:.3f} for the deepest ({deep['shape']}), {abs(diff):.3f} bits/byte {verdict} it, with "
            f"{wide['params_vs_deepest']:.2f}× its parameters, {wide['step_vs_deepest']:.2f}× its training step "
            f"time and {wide['latency_vs_deepest']:.2f}× its forward latency.")


def plot(rows: Sequence[dict], path: Path, args: argparse.Namespace) -> None:
    """Three panels against the shape: validation bits per byte, parameters, and step/forward time ratios."""
    plt = plots.plt
    labels = [r["shape"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].plot(x, [r["bpb"] for r in rows], "o-")
    axes[0].set(ylabel="validation bits / byte", title="quality (lower is better)")
    axes[1].bar(x, [r["params"] for r in rows])
    axes[1].set(ylabel="parameters", title="model size")
    axes[2].plot(x, [r["step_vs_deepest"] for r in rows], "o-", label="training step")
    axes[2].plot(x, [r["latency_vs_deepest"] for r in rows], "s-", label="forward pass")
    axes[2].axhline(1.0, color="gray", lw=0.8)
    axes[2].set(ylabel="time / deepest shape", title="speed (lower is faster)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.set_xlabel("layers × heads per layer")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"width vs depth at {args.total_heads} heads of {args.head_dim} ({args.mechanism}, d_model "
                 f"{args.d_model}, T = {args.seq_len}, {args.steps} steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: Sequence[dict], args: argparse.Namespace, argv: Sequence[str], run_info: dict) -> str:
    """The markdown page: command, settings, machine and load, the table and the paper's claim against this run."""
    device = run_info["device"]
    return "\n".join([
        f"# Width vs depth at a fixed head count — {device['platform']}", "",
        "`" + " ".join(["python -m experiments.width_depth", *argv]) + "`", "",
        f"Byte-level LM on the stdlib corpus (`experiments.lm_bytes`). {args.total_heads} heads of {args.head_dim} "
        f"features in total, split into layers × heads per layer; d_model {args.d_model}, MLP ratio "
        f"{args.mlp_ratio}, {args.mechanism} attention with RoPE. Training: T = {args.seq_len}, {args.steps} AdamW "
        f"steps of {args.batch_size} windows (lr {args.lr}, warmup {args.warmup_steps}, cosine), same data for "
        f"every shape. Validation bits per byte over {run_info['scored_bytes']:,} held-out bytes in windows of T. "
        f"Train step: training-loop wall time / steps after a compile warm-up; forward: median of "
        f"{args.latency_repeats} interleaved forward passes over [{args.batch_size}, {args.seq_len}].", "",
        host.machine_line(run_info), "",
        table(rows), "",
        "Paper (Brown et al. 2022): with the total head count fixed, single-layer wide models match or beat deep "
        "ones (+0.3% accuracy on average) and are smaller and faster (3.1× lower CPU latency on byte-level IMDb). "
        + finding(rows), ""])


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Train every shape, print the table, write ``<name>.json``, ``.md`` and ``.png`` to ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = host.start_run()
    corpus = lm_bytes.load_corpus(args.root, args.valid_fraction)
    windows = lm_bytes.eval_windows(corpus.valid, args.seq_len, args.eval_windows)
    rows, models = [], []
    for layers, heads in tqdm(shapes(args.total_heads), desc="width_depth", disable=not args.progress,
                              dynamic_ncols=True):
        row, model = run_one(args, corpus, windows, layers, heads)
        rows.append(row)
        models.append(model)
        if args.progress:
            tqdm.write(f"{row['shape']}: {row['bpb']:.3f} bits/byte, {row['params']:,} params, "
                       f"{1e3 * row['step_seconds']:.1f} ms/step")
    add_latency(rows, models, args)
    run_info = host.finish_run(started, scored_bytes=int(windows.shape[0] * (windows.shape[1] - 1)))
    md = markdown(rows, args, argv, run_info)
    print(md)
    report.save_benchmark({"args": report.jsonable_args(args), **run_info, "results": rows}, md, args,
                          lambda path: plot(rows, path, args))
    return rows


if __name__ == "__main__":
    main()
