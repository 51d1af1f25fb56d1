"""E4: induction heads and the abrupt emergence of in-context learning in bursty in-context classification.

Reproduces the first study of G. Reddy, "The mechanistic basis of data dependence and abrupt learning in an
in-context classification task" (ICLR 2024, arXiv:2312.03002): a two-layer attention-only network followed by
an MLP classifier (the official code's ``transformer_v2.forward``) is trained on the bursty task of
``experiments.lib.bursty_data`` (official ``datasets_v2.generate_input_seqs``), and scored over training on
the official training script's four test sets: the training distribution, in-context on novel classes (``IC``),
in-context on training classes with swapped labels (``IC2``) and in-weights (``IW``). The paper's claim (abstract):
in-context learning is driven by the abrupt emergence of an induction head (the query attends in layer 2 to the
label that follows the context item of its own class, helped by a layer-1 head that copies each item into the
label token after it), which then competes with in-weights learning. The full text was not available to this
study; section and equation numbers are therefore not cited, and details follow the official code.

The model (``AttentionOnlyClassifier``) follows the official code (``transformer_v2.forward``): residual
attention layers ``x ← x + Attn(x)`` with a causal mask and no normalization, then ``mlp_layers`` ReLU layers of
width ``P + D`` and a linear read-out of the query token into ``L`` label logits. Each attention layer is an
``attnjax.nn.MultiHeadAttention`` (softmax, ``num_heads`` heads, scaled ``q·k/√d`` and an output projection,
which the official single-head layers lack; nor does it add the layer-1 queries to the layer-2 queries as the
official ``attention_head(..., inputs_pre=...)`` does). Training uses the house loop
(``experiments.lib.training.train``, AdamW with warmup + cosine) instead of the official plain SGD (lr 0.01,
batch 128, 150k iterations), so the transition comes within a CPU budget; the step at which it happens is
therefore not comparable with the paper's, only its shape.

Measures, every ``--eval-every`` steps, on ``--test-examples`` held-out sequences per split:

- accuracy and loss of each split (chance ``1/L``);
- ``induction``: layer-2 attention from the query to the label tokens right after the context items of the
  query's class (summed; uniform attention gives ``B / (2N + 1)``), on the novel-class (``in_context``) split;
- ``previous_token``: layer-1 attention from each label token to the item right before it (averaged over the
  context's labels), the first half of the induction circuit;
- the transition steps: the first evaluation at which in-context accuracy crosses halfway between chance ``1/L``
  and its final value; the same from ``B/N`` (the accuracy of naming a random label of the context: the plateau
  our short AdamW runs reach before the query's attention matches items) to the final value; and the same for
  the induction score from uniform attention.

Attention maps come from ``attnjax.analysis.capture_attention`` / ``attention_maps``.

    python -m experiments.induction                      # CPU default, about 2 minutes
    python -m experiments.induction --num-classes 2048 --steps 20000 --alpha 1 --p-bursty 0.9
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from attnjax import masks
from attnjax.analysis import attention_maps, capture_attention
from attnjax.nn import MultiHeadAttention
from experiments.lib import cli, host, plots, report
from experiments.lib.bursty_data import SPLITS, BurstyBatch, BurstyTask, bursty_batch, make_mixture
from experiments.lib.model import num_params
from experiments.lib.training import TrainConfig, token_loss, train

SPLIT_TITLES = {"train": "training distribution", "in_context": "in-context, novel classes (IC)",
                "swapped": "in-context, swapped labels (IC2)", "in_weights": "in-weights (IW)"}
"""How each split is named in tables and figures."""
SMOKE = dict(num_classes=32, num_labels=8, context=4, burstiness=2, dim=8, max_context=4, num_heads=1,
             mlp_layers=1, steps=60, batch_size=32, lr=1e-2, warmup_steps=5, eval_every=20, test_examples=64)
"""Defaults under ``--smoke`` (explicit flags still win): a tiny task and model, 60 steps, for tests."""


class AttentionOnlyClassifier(nnx.Module):
    """Reddy 2023's network: ``num_layers`` residual causal attention layers, an MLP, label logits of the query.

    ``h_0 = x``, ``h_l = h_{l−1} + MHA_l(h_{l−1})`` (causal, no normalization, as the official code), then
    ``z = relu(W_m … relu(W_1 h_n[:, −1]))`` and ``logits = W_out z``.

    Args:
      features: token features ``P + D``.
      num_labels: ``L``, the logits per sequence.
      num_layers: attention layers (the paper: 2).
      num_heads: heads per attention layer (the paper: 1), each of ``features // num_heads`` dimensions.
      mlp_layers: ReLU layers of width ``features`` before the read-out (the paper: 3).
      rngs: parameter initialization.
    """

    def __init__(self, features: int, num_labels: int, *, num_layers: int = 2, num_heads: int = 1,
                 mlp_layers: int = 3, rngs: nnx.Rngs):
        self.attention = nnx.List([MultiHeadAttention(features, num_heads, mechanism="softmax", rngs=rngs)
                                   for _ in range(num_layers)])
        self.mlp = nnx.List([nnx.Linear(features, features, rngs=rngs) for _ in range(mlp_layers)])
        self.readout = nnx.Linear(features, num_labels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [S, T, features]`` float -> float32 label logits of the last token, ``[S, 1, num_labels]``."""
        if x.ndim != 3:
            raise ValueError(f"x must be [S, T, features], got shape {x.shape}")
        for layer in self.attention:
            x = x + layer(x, mask=masks.Causal())
        z = x[:, -1:]
        for layer in self.mlp:
            z = jax.nn.relu(layer(z))
        return self.readout(z).astype(jnp.float32)


@nnx.jit
def scored_maps(model: AttentionOnlyClassifier, inputs: jax.Array, targets: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array, list[jax.Array]]:
    """``token_loss`` of the model's label logits against ``targets [S, 1]`` (summed nats, correct, count) and
    each attention layer's map ``[S, H, T, T]`` (``attnjax.analysis.attention_maps``); one compile per shape."""
    logits, captured = capture_attention(model, inputs)
    return (*token_loss(logits, targets), attention_maps(captured))


def previous_token_score(layer_map: np.ndarray) -> np.ndarray:
    """Per head: mean attention from each label token ``ℓ_i`` (position ``2i + 1``) to its item ``x_i``
    (position ``2i``). ``layer_map [S, H, 2N + 1, 2N + 1]`` -> ``[H]``."""
    layer_map = np.asarray(layer_map)
    labels = np.arange(1, layer_map.shape[-1] - 1, 2)
    return layer_map[:, :, labels, labels - 1].mean(axis=(0, 2))


def induction_score(layer_map: np.ndarray, matches: np.ndarray) -> np.ndarray:
    """Per head: attention from the query (last position) to the label tokens after the context items of the
    query's class, summed over those labels and averaged over sequences.

    ``layer_map [S, H, 2N + 1, 2N + 1]``, ``matches [S, N]`` bool (``BurstyBatch.query_matches``) -> ``[H]``.
    """
    layer_map, matches = np.asarray(layer_map), np.asarray(matches, bool)
    if matches.shape != (layer_map.shape[0], (layer_map.shape[-1] - 1) // 2):
        raise ValueError(f"matches must be [S, N] = {(layer_map.shape[0], (layer_map.shape[-1] - 1) // 2)} for a "
                         f"map of shape {layer_map.shape}, got {matches.shape}")
    to_labels = layer_map[:, :, -1, 1:-1:2]
    return (to_labels * matches[:, None, :]).sum(-1).mean(0)


def crossing_step(steps: Sequence[int], values: Sequence[float], floor: float) -> Optional[int]:
    """The first step at which ``values`` reaches halfway from ``floor`` to its last value; ``None`` when the last
    value does not exceed ``floor`` by 0.05 (no transition to locate)."""
    values = np.asarray(values, np.float64)
    if len(values) == 0 or values[-1] < floor + 0.05:
        return None
    half = floor + 0.5 * (values[-1] - floor)
    return int(steps[int(np.argmax(values >= half))])


def evaluate(model: AttentionOnlyClassifier, tests: dict[str, BurstyBatch]) -> dict:
    """Accuracy and loss per split, and the induction / previous-token scores (max over heads) of layers 2 / 1
    on the ``in_context`` split."""
    row = {}
    for split, batch in tests.items():
        total, correct, count, maps = scored_maps(model, jnp.asarray(batch.inputs), jnp.asarray(batch.targets))
        row[f"{split}_accuracy"] = int(correct) / int(count)
        row[f"{split}_loss"] = float(total) / int(count)
        if split == "in_context" and len(maps) >= 2:
            row["induction"] = float(induction_score(maps[1], batch.query_matches()).max())
            row["previous_token"] = float(previous_token_score(maps[0]).max())
    return row


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults take about 2 minutes on a 2-core CPU."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=2048, help="K")
    p.add_argument("--num-labels", type=int, default=32, help="L")
    p.add_argument("--context", type=int, default=8, help="N item-label pairs")
    p.add_argument("--burstiness", type=int, default=4, help="B items per class in a bursty context")
    p.add_argument("--p-bursty", type=float, default=1.0, help="p_B")
    p.add_argument("--alpha", type=float, default=0.0, help="rank-frequency exponent")
    p.add_argument("--eps", type=float, default=0.1, help="within-class noise")
    p.add_argument("--dim", type=int, default=63, help="D")
    p.add_argument("--max-context", type=int, default=32, help="N_max: one-hot positions P = 2 N_max + 1")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=1)
    p.add_argument("--mlp-layers", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    p.add_argument("--test-examples", type=int, default=256, help="held-out sequences per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    cli.add_output_flags(p, "induction")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    if args.num_layers < 2 or args.num_heads < 1 or args.mlp_layers < 0:
        p.error("need --num-layers >= 2 (the induction circuit), --num-heads >= 1 and --mlp-layers >= 0")
    if (args.dim + 2 * args.max_context + 1) % args.num_heads:
        p.error(f"--num-heads must divide the token features P + D = {args.dim + 2 * args.max_context + 1}")
    try:
        task_from(args)
    except ValueError as e:
        p.error(str(e))
    return args


def task_from(args: argparse.Namespace) -> BurstyTask:
    """The task of the flags."""
    return BurstyTask(num_classes=args.num_classes, num_labels=args.num_labels, context=args.context,
                      burstiness=args.burstiness, p_bursty=args.p_bursty, alpha=args.alpha, eps=args.eps,
                      dim=args.dim, max_context=args.max_context)


def run(args: argparse.Namespace) -> dict:
    """Train one model, evaluating it every ``--eval-every`` steps; the history and the transition steps."""
    task = task_from(args)
    mixture = make_mixture(task, (args.seed, 0))
    tests = {split: bursty_batch(task, mixture, args.test_examples, split, (args.seed, 1, i))
             for i, split in enumerate(SPLITS)}
    model = nnx.jit(lambda: AttentionOnlyClassifier(  # one compile for all initializers
        task.features, task.num_labels, num_layers=args.num_layers, num_heads=args.num_heads,
        mlp_layers=args.mlp_layers, rngs=nnx.Rngs(args.seed)))()

    def batch_fn(step: int) -> tuple[np.ndarray, np.ndarray]:
        batch = bursty_batch(task, mixture, args.batch_size, "train", (args.seed, 2, step))
        return batch.inputs, batch.targets

    config = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup_steps,
                         weight_decay=args.weight_decay, log_every=args.eval_every)
    start = time.perf_counter()
    initial = {"step": 0, **evaluate(model, tests)}
    history = [initial] + train(model, batch_fn, config, desc="induction", progress=args.progress,
                                on_log=lambda step, m: evaluate(m, tests))
    seconds = time.perf_counter() - start
    steps = [h["step"] for h in history]
    chance = 1.0 / task.num_labels
    uniform = task.burstiness / task.seq_len
    return {"params": num_params(model), "train_seconds": seconds, "chance": chance, "uniform_induction": uniform,
            "uniform_previous_token": float(np.mean([1.0 / (2 * i + 2) for i in range(task.context)])),
            "context_guess": task.burstiness / task.context,
            "icl_transition_step": crossing_step(steps, [h["in_context_accuracy"] for h in history], chance),
            "icl_matching_step": crossing_step(steps, [h["in_context_accuracy"] for h in history],
                                               task.burstiness / task.context),
            "induction_transition_step": crossing_step(steps, [h["induction"] for h in history], uniform),
            "history": history}


def plot(result: dict, path: Path, title: str) -> None:
    """Three panels over training steps: the training loss, accuracy per split, the attention scores."""
    plt = plots.plt
    history = result["history"]
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    trained = [h for h in history if "loss" in h]
    axes[0].plot([h["step"] for h in trained], [h["loss"] for h in trained], color="black")
    axes[0].set(title="training loss (batch)", xlabel="step", ylabel="cross-entropy (nats)")
    for split in SPLITS:
        axes[1].plot(steps, [h[f"{split}_accuracy"] for h in history], label=SPLIT_TITLES[split])
    axes[1].axhline(result["chance"], color="gray", ls=":", label="chance 1/L")
    axes[1].axhline(result["context_guess"], color="gray", ls="-.", lw=0.8, label="a random context label, B/N")
    axes[1].set(title="test accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    axes[2].plot(steps, [h["induction"] for h in history], label="induction (layer 2: query → matching labels)")
    axes[2].plot(steps, [h["previous_token"] for h in history], label="previous token (layer 1: label → its item)")
    axes[2].axhline(result["uniform_induction"], color="C0", ls=":", label="induction, uniform attention")
    axes[2].axhline(result["uniform_previous_token"], color="C1", ls=":", label="previous token, uniform attention")
    axes[2].set(title="attention scores (novel classes)", xlabel="step", ylabel="attention weight", ylim=(0, 1.02))
    marks = (("icl_transition_step", "red", "IC halfway from chance"),
             ("icl_matching_step", "purple", "IC halfway from B/N"))
    for ax in axes[1:]:
        for key, color, text in marks:
            if result[key] is not None:
                ax.axvline(result[key], color=color, ls="--", lw=0.8, label=text if ax is axes[1] else None)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict, args: argparse.Namespace, argv: Sequence[str], run_info: dict) -> str:
    """The markdown page: command, settings, machine, the transition steps and the curves as a table."""
    task, device = task_from(args), run_info["device"]
    history = result["history"]
    every = max(1, len(history) // 15)
    shown = history[::every] + ([] if (len(history) - 1) % every == 0 else history[-1:])
    rows = [[h["step"]] + [f"{h[f'{s}_accuracy']:.3f}" for s in SPLITS]
            + [f"{h['induction']:.3f}", f"{h['previous_token']:.3f}", f"{h['loss']:.3f}" if "loss" in h else "-"]
            for h in shown]
    final = history[-1]

    def step_text(step):
        return "none (no rise to locate)" if step is None else f"step {step}"

    return "\n".join([
        f"# Induction heads in bursty in-context classification — {device['platform']}", "",
        "`" + " ".join(["python -m experiments.induction", *argv]) + "`", "",
        f"Task (Reddy 2023, official code): K = {task.num_classes} classes, L = {task.num_labels} labels, "
        f"N = {task.context} pairs, B = {task.burstiness}, p_B = {task.p_bursty}, α = {task.alpha}, ε = {task.eps}, "
        f"D = {task.dim}, P = {task.positions} one-hot positions. Model: {args.num_layers} attention layers × "
        f"{args.num_heads} head(s) (attnjax MultiHeadAttention, softmax, causal), {args.mlp_layers} ReLU layers, "
        f"{result['params']:,} params. "
        f"Training: {args.steps} AdamW steps of {args.batch_size} fresh sequences (lr {args.lr}, warmup "
        f"{args.warmup_steps}, cosine), {result['train_seconds']:.0f} s including evaluations every "
        f"{args.eval_every} steps on {args.test_examples} held-out sequences per split.", "",
        host.machine_line(run_info), "",
        f"- In-context (novel classes) accuracy crosses halfway from chance ({result['chance']:.3f}) to its final "
        f"{final['in_context_accuracy']:.3f} at {step_text(result['icl_transition_step'])} (red line), and halfway "
        f"from naming a random context label ({result['context_guess']:.3f}) to the final value at "
        f"{step_text(result['icl_matching_step'])} (purple line).",
        f"- The induction score crosses halfway from uniform attention ({result['uniform_induction']:.3f}) to its "
        f"final {final['induction']:.3f} at {step_text(result['induction_transition_step'])}.",
        f"- Final accuracies: IC {final['in_context_accuracy']:.3f}, IC2 {final['swapped_accuracy']:.3f}, "
        f"IW {final['in_weights_accuracy']:.3f}, training distribution {final['train_accuracy']:.3f}.", "",
        report.markdown_table(["step", "train acc", "IC acc", "IC2 acc", "IW acc", "induction", "prev. token",
                               "train loss"], rows)])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Train and score the model, print the table, write ``<name>.json``, ``.md`` and ``.png`` to ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = host.start_run()
    result = run(args)
    if args.progress:
        tqdm.write(f"in-context transition: {result['icl_transition_step']}, induction: "
                   f"{result['induction_transition_step']}")
    run_info = host.finish_run(started)
    md = markdown(result, args, argv, run_info)
    print(md)
    task = task_from(args)
    title = (f"bursty in-context classification (K={task.num_classes}, B={task.burstiness}, p_B={task.p_bursty}, "
             f"α={task.alpha}): 2-layer attention-only network")
    report.save_benchmark({"args": report.jsonable_args(args), **run_info, "result": result}, md, args,
                          lambda path: plot(result, path, title))
    return result


if __name__ == "__main__":
    main()
