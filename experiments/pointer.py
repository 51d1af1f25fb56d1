"""E4: Pointer Networks on sorting and the planar convex hull, accuracy against the number of points.

Vinyals, Fortunato & Jaitly 2015, "Pointer Networks": a decoder that outputs input positions by pointer
attention, ``p(C_i | C_1 … C_{i−1}, P) = softmax_j(vᵀ tanh(W1 e_j + W2 d_i))`` (eq. 3;
``attnjax.nn.PointerAttention``). Tasks (``experiments.lib.pointer_data``): sort ``n`` uniform numbers
(output the sorting permutation; the sorting task of Vinyals, Bengio & Kudlur 2016) and the convex hull of
``n`` uniform points in the unit square (hull vertices counter-clockwise from the lowest index, then that
index again to close, Ptr-Net §3.1; results §4.2). Each task's model trains with teacher forcing at one ``n``
(``--train-len``) and is tested by greedy pointer decoding at that ``n`` and larger ones (``--test-lens``):
exact match of the whole output sequence and per-step accuracy (the fraction of target steps the greedy
output gets right, position by position).

The model (``PointerNet``) differs from the paper's in its encoder: the paper encodes the points with an LSTM;
here the encoder is ``--num-layers`` pre-norm blocks of attnjax softmax self-attention without a mask
(``experiments.lib.model.AttentionBlock(causal=False)``, any registry mechanism with ``--mechanism``), on the
coordinates and the relative index ``j / n`` (a position signal that stays in range at larger ``n``; the hull
starts at the lowest index). The decoder is an LSTM as in the paper; its input at step ``i`` is the encoding
of the point chosen at step ``i − 1`` (the paper feeds the point itself) and its initial hidden state the mean
encoding (the paper: the encoder's last state). In training and at test the pointer never points at an already
chosen input (``allowed_mask``), an addition to the paper's plain softmax of eq. 3; the hull's first vertex opens
again from step 3 on, and pointing back at it ends the sequence (the paper has a separate end symbol ⇐).

    python -m experiments.pointer                 # CPU default: sort and hull, train n = 10, test 10/15/20
    python -m experiments.pointer --tasks hull --train-len 50 --test-lens 50,100 --steps 20000 --d-model 256
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from attnjax import registry
from attnjax.nn import PointerAttention
from experiments.lib import cli, host, plots, report
from experiments.lib.model import AttentionBlock, num_params
from experiments.lib.pointer_data import FEATURES, TASKS, PointerInputs, pointer_batch, polygon_area
from experiments.lib.training import IGNORE, TrainConfig, train

SMOKE = dict(tasks=["sort"], train_len=5, test_lens=[5], d_model=16, num_layers=1, num_heads=2, mlp_ratio=1,
             steps=80, batch_size=32, lr=1e-2, warmup_steps=5, test_examples=64)
"""Defaults under ``--smoke`` (explicit flags still win): one tiny sorting model, 80 steps at n = 5, for tests."""


def allowed_mask(previous: jax.Array, n: int, closes: bool) -> jax.Array:
    """Where each decoder step may point: ``[B, L, n]`` bool from ``previous [B, L]`` (the index chosen before
    each step; negative: none).

    Step ``i`` may not point at an index in ``previous[:, :i + 1]`` (already chosen). With ``closes`` (the hull),
    the first chosen index (``previous[:, 1]``) is allowed again from step 3 on: pointing back at it closes the
    polygon and ends the sequence, so every row keeps at least one allowed position.
    """
    B, L = previous.shape
    chosen = jnp.cumsum(previous[..., None] == jnp.arange(n), axis=1) > 0
    allowed = ~chosen
    if closes and L > 1:
        reopen = (jnp.arange(L) >= 3)[None, :, None] & (previous[:, 1, None, None] == jnp.arange(n))
        allowed = allowed | reopen
    return allowed


class PointerNet(nnx.Module):
    """Encoder (attention blocks, no mask), LSTM decoder and pointer attention (``PointerAttention``).

    ``e = LN(blocks(W_in [x_j, j/n]))``; ``d_i = LSTM(d_{i−1}, e_{C_{i−1}})`` with ``e_{C_0}`` a learned start
    vector and ``h_0 = mean_j e_j``; ``log p_i = PointerAttention(e, d_i, allowed_i)``. ``closes``: the hull task
    (see ``allowed_mask``).
    """

    def __init__(self, features: int, d_model: int, num_layers: int, num_heads: int, *, mlp_ratio: int,
                 mechanism: str, closes: bool, rngs: nnx.Rngs):
        self.closes = closes
        self.embed = nnx.Linear(features + 1, d_model, rngs=rngs)
        self.blocks = nnx.List([AttentionBlock(d_model, num_heads, mechanism=registry.get(mechanism)(),
                                               mlp_dim=mlp_ratio * d_model, rope=False, causal=False, rngs=rngs)
                                for _ in range(num_layers)])
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.start = nnx.Param(jax.random.normal(rngs.params(), (d_model,)) / d_model ** 0.5)
        self.cell = nnx.OptimizedLSTMCell(d_model, d_model, rngs=rngs)
        self.pointer = PointerAttention(d_model, d_model, rngs=rngs)

    def encode(self, points: jax.Array) -> jax.Array:
        """``points [B, n, F] -> e [B, n, d_model]``."""
        B, n, _ = points.shape
        index = jnp.broadcast_to((jnp.arange(n, dtype=points.dtype) / n)[None, :, None], (B, n, 1))
        x = self.embed(jnp.concatenate([points, index], axis=-1))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def decoder_input(self, e: jax.Array, chosen: jax.Array) -> jax.Array:
        """``e [B, n, d]``, ``chosen [B, ...]`` indices (negative: none) -> ``e_chosen`` or the start vector."""
        flat = chosen.reshape(chosen.shape[0], -1)
        picked = jnp.take_along_axis(e, jnp.maximum(flat, 0)[..., None], axis=1).reshape(*chosen.shape, -1)
        return jnp.where((chosen >= 0)[..., None], picked, self.start[...])

    def initial_carry(self, e: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The LSTM's ``(c, h)`` before step 0: ``(0, mean_j e_j)``."""
        h = jnp.mean(e, axis=1)
        return jnp.zeros_like(h), h

    def __call__(self, inputs: PointerInputs) -> jax.Array:
        """Teacher forcing: log-probabilities ``[B, L, n]`` of every step, given ``inputs.previous [B, L]``."""
        e = self.encode(inputs.points)
        x = self.decoder_input(e, inputs.previous)

        def step(carry, x_t):
            return self.cell(carry, x_t)

        _, d = jax.lax.scan(step, self.initial_carry(e), jnp.moveaxis(x, 1, 0))
        mask = allowed_mask(inputs.previous, e.shape[1], self.closes)
        return self.pointer(e, jnp.moveaxis(d, 0, 1), mask)

    def greedy(self, points: jax.Array, steps: int) -> jax.Array:
        """Greedy pointer decoding: ``choices [B, steps]`` int32, each step's most probable allowed index;
        ``IGNORE`` after the hull closes (the step that points back at the first vertex is kept)."""
        e = self.encode(points)
        B, n, _ = e.shape

        def step(state, i):
            carry, previous, done = state
            carry, d = self.cell(carry, self.decoder_input(e, previous[:, i]))
            mask = jax.lax.dynamic_index_in_dim(allowed_mask(previous, n, self.closes), i, axis=1)
            choice = jnp.argmax(self.pointer(e, d[:, None], mask)[:, 0], axis=-1).astype(jnp.int32)
            choice = jnp.where(done, IGNORE, choice)
            if self.closes:
                done = done | ((i >= 3) & (choice == previous[:, 1]))
            previous = previous.at[:, i + 1].set(choice, mode="drop")
            return (carry, previous, done), choice

        previous = jnp.full((B, steps), IGNORE, jnp.int32)
        state = (self.initial_carry(e), previous, jnp.zeros((B,), bool))
        _, choices = jax.lax.scan(step, state, jnp.arange(steps))
        return choices.T


@partial(nnx.jit, static_argnums=2)
def greedy_decode(model: PointerNet, points: jax.Array, steps: int) -> jax.Array:
    """``model.greedy(points, steps)``, compiled once per shape."""
    return model.greedy(points, steps)


def area_coverage(points: np.ndarray, pred: np.ndarray, targets: np.ndarray) -> float:
    """Mean over examples of ``area(predicted polygon) / area(true hull)``, with the signed shoelace area.

    After Ptr-Net §4.2's area metric, but the paper counts only valid (simple) polygons; here no output is
    excluded: a clockwise or self-intersecting output counts with its signed area, which is the winding-number
    weighted area, so an output that winds around twice can exceed 1 and the mean can too. Greedy decoding under
    ``allowed_mask`` always closes its polygon (by step ``n`` only the first vertex is left)."""
    ratios = [polygon_area(x, p[p != IGNORE][:-1]) / polygon_area(x, t[t != IGNORE][:-1])
              for x, p, t in zip(points, pred, targets)]
    return float(np.mean(ratios))


def score(model: PointerNet, task: str, n: int, examples: int, seed: Sequence[int]) -> dict:
    """Greedy decoding's exact match and per-step accuracy at ``n`` points, the mean target length and, for the
    hull, the area coverage (``area_coverage``)."""
    inputs, targets = pointer_batch(task, examples, n, seed)
    pred = np.asarray(greedy_decode(model, jnp.asarray(inputs.points), targets.shape[1]))
    scored = targets != IGNORE
    row = {"n": n, "exact": float(np.mean(np.all(pred == targets, axis=1))),
           "per_step": float(np.sum((pred == targets) & scored) / np.sum(scored)),
           "mean_output_len": float(np.mean(np.sum(scored, axis=1)))}
    if task == "hull":
        row["area_coverage"] = area_coverage(inputs.points, pred, targets)
    return row


def name_list(text: str) -> list[str]:
    """``"sort,hull"`` -> ``["sort", "hull"]``."""
    return [t for t in text.split(",") if t]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults take about 3 minutes on a loaded 2-core CPU."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=name_list, default=list(TASKS), help=f"of {TASKS}")
    p.add_argument("--train-len", type=int, default=10, help="points n of the training examples")
    p.add_argument("--test-lens", type=cli.parse_ints, default=[10, 15, 20], help="points n of the test sets")
    p.add_argument("--mechanism", default="softmax", help="registry mechanism of the encoder's self-attention")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2, help="encoder blocks")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--test-examples", type=int, default=256, help="held-out examples per test n")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    cli.add_output_flags(p, "pointer")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown or not args.tasks:
        p.error(f"--tasks must name some of {TASKS}, got {args.tasks}")
    if args.mechanism not in [e.name for e in registry.entries()]:
        p.error(f"unknown --mechanism {args.mechanism!r}")
    if min([args.train_len, *args.test_lens]) < 3:
        p.error("--train-len and --test-lens need n >= 3 points")
    return args


def run_task(args: argparse.Namespace, task: str) -> dict:
    """Train one task's model at ``--train-len`` (teacher forcing) and score it at every ``--test-lens``."""
    model = PointerNet(FEATURES[task], args.d_model, args.num_layers, args.num_heads, mlp_ratio=args.mlp_ratio,
                       mechanism=args.mechanism, closes=task == "hull", rngs=nnx.Rngs(args.seed))
    config = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup_steps,
                         weight_decay=args.weight_decay, log_every=max(args.steps // 20, 1))
    start = time.perf_counter()
    history = train(model, lambda step: pointer_batch(task, args.batch_size, args.train_len, (args.seed, 0, step)),
                    config, desc=task, progress=args.progress)
    seconds = time.perf_counter() - start
    tests = [score(model, task, n, args.test_examples, (args.seed, 1, n)) for n in args.test_lens]
    return {"task": task, "params": num_params(model), "train_seconds": seconds, "history": history,
            "first_train_loss": history[0]["loss"], "final_train_loss": history[-1]["loss"], "tests": tests}


def plot(rows: Sequence[dict], path: Path, train_len: int) -> None:
    """Per task, greedy exact match and per-step accuracy against n; last panel, the training loss curves."""
    plt = plots.plt
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(3.6 * (len(rows) + 1), 3.2), squeeze=False)
    for ax, row in zip(axes[0], rows):
        ns = [t["n"] for t in row["tests"]]
        ax.plot(ns, [t["per_step"] for t in row["tests"]], "o-", label="per-step accuracy")
        ax.plot(ns, [t["exact"] for t in row["tests"]], "s-", label="exact sequence match")
        if row["task"] == "hull":
            ax.plot(ns, [t["area_coverage"] for t in row["tests"]], "^-", label="area coverage")
        ax.axvline(train_len, color="gray", ls="--", lw=1, label=f"trained at n = {train_len}")
        ax.set(title=f"{row['task']}: greedy decoding", xlabel="points n", ylabel="accuracy", ylim=(-0.02, 1.02),
               xticks=ns)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for row in rows:
        ax.plot([h["step"] for h in row["history"]], [h["loss"] for h in row["history"]], label=row["task"])
    ax.set(title="teacher-forced training loss", xlabel="step", ylabel="nats per output step", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("Pointer network (attention encoder, LSTM decoder, pointer attention)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: Sequence[dict], args: argparse.Namespace, argv: Sequence[str], run_info: dict) -> str:
    """The markdown page: command, settings, machine and load, and one table per task."""
    device = run_info["device"]
    parts = [
        f"# Pointer networks: sorting and convex hull — {device['platform']}", "",
        "`" + " ".join(["python -m experiments.pointer", *argv]) + "`", "",
        f"Model: encoder of {args.num_layers} unmasked {args.mechanism} attention blocks (d_model {args.d_model}, "
        f"{args.num_heads} heads, MLP ratio {args.mlp_ratio}) on (coordinates, j/n); LSTM decoder; pointer attention "
        f"(Vinyals et al. 2015, eq. 3) over the inputs not yet chosen. Training: n = {args.train_len}, teacher "
        f"forcing, {args.steps} AdamW steps of {args.batch_size} fresh examples (lr {args.lr}, warmup "
        f"{args.warmup_steps}, cosine). Test: greedy decoding, {args.test_examples} held-out examples per n.", "",
        host.machine_line(run_info), ""]
    for row in rows:
        area = row["task"] == "hull"
        lines = [[t["n"], f"{t['exact']:.3f}", f"{t['per_step']:.3f}"] + ([f"{t['area_coverage']:.4f}"] if area else [])
                 + [f"{t['mean_output_len']:.1f}"] for t in row["tests"]]
        parts += [f"**{row['task']}** ({row['params']:,} params, {row['train_seconds']:.0f} s training, train loss "
                  f"{row['first_train_loss']:.3f} -> {row['final_train_loss']:.3f})", "",
                  report.markdown_table(["n", "exact match", "per-step"] + (["area coverage"] if area else [])
                                        + ["output steps"], lines), ""]
    return "\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Train and test every task, print the tables, write ``<name>.json``, ``.md`` and ``.png`` to ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = host.start_run()
    rows = []
    for task in tqdm(args.tasks, desc="pointer", disable=not args.progress, dynamic_ncols=True):
        rows.append(run_task(args, task))
        if args.progress:
            tqdm.write(f"{task}: exact / per-step " + ", ".join(
                f"n={t['n']} {t['exact']:.3f}/{t['per_step']:.3f}" for t in rows[-1]["tests"]))
    run_info = host.finish_run(started)
    md = markdown(rows, args, argv, run_info)
    print(md)
    report.save_benchmark({"args": report.jsonable_args(args), **run_info, "results": rows}, md, args,
                          lambda path: plot(rows, path, args.train_len))
    return rows


if __name__ == "__main__":
    main()
