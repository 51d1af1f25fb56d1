"""E4: in-context linear regression with multi-head softmax attention, against least squares, ridge and GD.

He, Pan, Chen & Yang 2025, "In-Context Linear Regression Demystified: Training Dynamics and Mechanistic
Interpretability of Multi-Head Softmax Attention" (ICML 2025; arXiv 2503.12734), claim in the abstract that
trained multi-head softmax attention "approximately implement[s] a debiased gradient descent predictor -- one
that outperforms single-head attention and nearly achieves Bayesian optimality up to proportional factor", and
that "compared to linear transformers, the softmax attention readily generalizes to sequences longer than those
seen during training". This study checks these on CPU: the test error of trained softmax-attention models per
context length ``n`` against the closed-form baselines of ``experiments.lib.icl_regression_data``: min-norm
least squares, ridge with the Bayes-optimal ``λ = σ²·d`` (the posterior mean: the least error any predictor
can reach), one GD step from zero with the best step size per ``n`` (the predictor the paper says one layer
implements), and zero; ``n`` runs to ``--test-multiple`` times the training prompt length.

The task follows the paper's setup and its official code (``XintianPan/ICL_linear``: ``d = 5``, ``σ² = 0.1``,
``x ~ N(0, I_d)``, ``w ~ N(0, I_d/d)``, ``y = w·x + ε``; tokens ``[x_i, y_i]``, query ``[x_q, 0]`` that does
not attend to itself; squared error on the query's ``y``). Where this study departs from it, and why:

- Every prefix is scored (Garg et al. 2022's objective): a prompt of ``N`` pairs carries ``N`` query tokens, query
  ``n`` attending only to the ``n`` context tokens before it (``prompt_mask``), so one pass trains and tests
  every ``n = 0 … N − 1``. The paper trains one query after a fixed ``L = 8d`` pairs; the default here is
  ``N = 4d`` to fit the CPU budget. In a one-layer model each query is exactly the paper's one-layer query;
  with more layers the context tokens also attend causally to each other (as in the stacked causal form of the
  paper's code).
- The model: a linear embedding of the ``d + 1`` token features to ``--d-model``, residual layers of
  ``attnjax.nn.MultiHeadAttention`` (softmax, heads of ``--head-dim`` features, so that more heads means more
  parameters, as in the paper's code where every head is ``d + 1`` wide), an optional MLP, and a linear readout
  of the query tokens (``--models`` picks layers x heads per model). The paper's model has no embedding,
  residual or readout layer (its output projection reads the prediction directly).
- Optimizer: AdamW with warmup and cosine decay from ``experiments.lib.training.make_optimizer``, and far
  fewer steps (the official code's default is 100k steps at learning rate 1e-3). The shared ``train`` loop scores token
  cross-entropy, so this file runs a minimal loop with the same optimizer and a squared-error loss.

- Not reproduced: the paper's comparison with linear transformers (attnjax's linear mechanisms serve only
  causal and segment masks, not this prompt mask).

    python -m experiments.icl_regression          # CPU default: 1x1, 1x4, 2x4 (layers x heads), about 2.5 minutes
    python -m experiments.icl_regression --num-points 40 --models 1x1,1x2,1x4,1x8,2x4 --steps 20000

Writes ``icl_regression_<backend>.json``, ``.md`` and ``.png`` (MSE against ``n`` on a log scale, and each
model's MSE over the Bayes-optimal ridge MSE) under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from attnjax import masks
from attnjax.checks import check_positive
from attnjax.nn import MultiHeadAttention
from experiments.lib import cli, host, plots, report
from experiments.lib.icl_regression_data import (
    Prompts, RegressionTask, gd_predictions, least_squares_predictions, mse_by_context, prompt_mask, prompt_tokens,
    regression_prompts, ridge_predictions)
from experiments.lib.model import MLP, num_params
from experiments.lib.training import TrainConfig, make_optimizer

SMOKE = dict(dim=3, num_points=8, test_multiple=2, models=[(1, 2)], d_model=16, head_dim=4, steps=120,
             batch_size=32, lr=1e-2, warmup_steps=10, test_examples=256)
"""Defaults under ``--smoke`` (explicit flags still win): one tiny one-layer model, 120 steps, for tests."""


class ICLRegressor(nnx.Module):
    """Softmax-attention regressor over the prompt layout of ``icl_regression_data.prompt_tokens``.

    ``h = E z``; per layer ``h = h + MHA(h, mask=prompt_mask(N))`` (and ``h = h + MLP(h)`` with
    ``mlp_ratio > 0``); the prediction for query ``n`` is ``r · h[N + n]``. Query ``n`` reads only the ``n``
    context tokens before it, so its prediction uses exactly ``n`` in-context examples.

    Args:
      dim: covariate dimension ``d`` (tokens have ``d + 1`` features).
      d_model: residual width.
      num_layers: attention layers.
      num_heads: softmax heads per layer.
      head_dim: features per head.
      mlp_ratio: MLP hidden width ``mlp_ratio · d_model`` after each attention layer (0: none, as in the paper).
      implementation: the ``attnjax.attention`` path; "reference" (dense scores) by default: prompts are a few
        dozen tokens, where it runs and compiles fastest on CPU.
      rngs: initializes the parameters.
    """

    def __init__(self, dim: int, *, d_model: int, num_layers: int, num_heads: int, head_dim: int,
                 mlp_ratio: int = 0, implementation: str = "reference", rngs: nnx.Rngs):
        check_positive(dim=dim, d_model=d_model, num_layers=num_layers, num_heads=num_heads, head_dim=head_dim)
        if mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0, got {mlp_ratio}")
        self.dim = dim
        self.embed = nnx.Linear(dim + 1, d_model, rngs=rngs)
        self.layers = nnx.List([MultiHeadAttention(d_model, num_heads, head_dim=head_dim,
                                                   implementation=implementation, rngs=rngs)
                                for _ in range(num_layers)])
        self.mlps = nnx.List([MLP(d_model, mlp_ratio * d_model, rngs=rngs) for _ in range(num_layers)]
                             if mlp_ratio else [])
        self.readout = nnx.Linear(d_model, 1, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens [B, 2N, d + 1]`` (context, then queries) -> float32 predictions ``[B, N]`` of ``y_n``."""
        if tokens.ndim != 3 or tokens.shape[1] % 2 or tokens.shape[2] != self.dim + 1:
            raise ValueError(f"tokens must be [B, 2N, {self.dim + 1}] (context then queries), got {tokens.shape}")
        n = tokens.shape[1] // 2
        mask = masks.Explicit(jnp.asarray(prompt_mask(n)))
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = h + layer(h, mask=mask)
            if self.mlps:
                h = h + self.mlps[i](h)
        return self.readout(h[:, n:])[..., 0].astype(jnp.float32)


@functools.partial(nnx.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def new_regressor(dim: int, d_model: int, num_layers: int, num_heads: int, head_dim: int, mlp_ratio: int,
                  implementation: str, rngs: nnx.Rngs) -> ICLRegressor:
    """``ICLRegressor(dim, d_model=…, …, rngs=rngs)`` initialized in one compiled program (cached per shape)
    rather than op by op."""
    return ICLRegressor(dim, d_model=d_model, num_layers=num_layers, num_heads=num_heads, head_dim=head_dim,
                        mlp_ratio=mlp_ratio, implementation=implementation, rngs=rngs)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 4))
def _train_step(graphdef, config, params, rest, opt_state, tokens, targets):
    """One AdamW step on the mean squared error over every query of the batch."""
    def loss_fn(params):
        return jnp.mean((nnx.merge(graphdef, params, rest)(tokens) - targets) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = make_optimizer(config).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def predict(model: ICLRegressor, xs: np.ndarray, ys: np.ndarray, chunk: int = 512) -> np.ndarray:
    """The model's predictions ``[B, N]`` (float64) for prompts ``xs [B, N, d]``, ``ys [B, N]``, in chunks."""
    graphdef, state = nnx.split(model)
    out = [np.asarray(_predict(graphdef, state, jnp.asarray(prompt_tokens(xs[i:i + chunk], ys[i:i + chunk]))))
           for i in range(0, len(xs), chunk)]
    return np.concatenate(out).astype(np.float64)


def train_regressor(model: ICLRegressor, batch_fn: Callable[[int], Prompts], config: TrainConfig, *,
                    desc: str = "train", progress: bool = True) -> list[dict]:
    """Train ``model`` in place for ``config.steps`` AdamW steps (``make_optimizer``) on ``batch_fn(step)``.

    The loss is the squared error of every query (every prefix length) of the batch. Returns one history row
    per ``config.log_every`` steps and the last: ``step``, ``loss``, ``grad_norm``.
    """
    opt_state = make_optimizer(config).init(nnx.state(model, nnx.Param))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    history = []
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        batch = batch_fn(step)
        params, opt_state, metrics = _train_step(graphdef, config, params, rest, opt_state,
                                                 jnp.asarray(prompt_tokens(batch.xs, batch.ys)),
                                                 jnp.asarray(batch.ys, jnp.float32))
        done = step + 1
        if done % max(config.log_every, 1) == 0 or done == config.steps:
            history.append({"step": done, **{k: float(v) for k, v in metrics.items()}})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
    nnx.update(model, params)
    return history


def parse_models(text: str) -> list[tuple[int, int]]:
    """``"1x1,1x4,2x4"`` -> ``[(1, 1), (1, 4), (2, 4)]``: ``(layers, heads)`` per model."""
    try:
        models = [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"models are LAYERSxHEADS items such as 1x4, got {text!r}") from None
    if not models or any(len(m) != 2 or min(m) <= 0 for m in models):
        raise argparse.ArgumentTypeError(f"models are positive LAYERSxHEADS items such as 1x4, got {text!r}")
    return models


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults take about 2 minutes on a 2-core CPU."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=5, help="covariate dimension d")
    p.add_argument("--noise", type=float, default=0.1 ** 0.5,
                   help="noise standard deviation σ (default σ² = 0.1, the paper's)")
    p.add_argument("--num-points", type=int, default=20, help="pairs per training prompt N (contexts n < N)")
    p.add_argument("--test-multiple", type=int, default=2, help="test prompts have test_multiple · N pairs")
    p.add_argument("--models", type=parse_models, default=[(1, 1), (1, 4), (2, 4)],
                   help="models as LAYERSxHEADS, comma-separated (1x4: the paper's one layer of 4 heads)")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--mlp-ratio", type=int, default=0, help="0: attention only, as in the paper")
    p.add_argument("--implementation", default="reference", choices=["reference", "xla", "auto"],
                   help="attention path (dense reference: fastest at these lengths)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0, help="0, as in the paper's code")
    p.add_argument("--test-examples", type=int, default=2000, help="held-out prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    cli.add_output_flags(p, "icl_regression")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    for name in ("dim", "num_points", "test_multiple", "d_model", "head_dim", "steps", "batch_size",
                 "test_examples"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.noise <= 0:
        p.error(f"--noise must be positive (ridge's λ = σ²·d), got {args.noise}")
    return args


def run_model(args: argparse.Namespace, task: RegressionTask, layers: int, heads: int, test: Prompts) -> dict:
    """Train one model (``layers`` layers of ``heads`` heads) and score it per context length on ``test``."""
    model = new_regressor(task.dim, args.d_model, layers, heads, args.head_dim, args.mlp_ratio, args.implementation,
                          nnx.Rngs(args.seed))
    config = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup_steps,
                         weight_decay=args.weight_decay, log_every=max(args.steps // 50, 1))
    start = time.perf_counter()
    history = train_regressor(
        model, lambda step: regression_prompts(task, args.batch_size, args.num_points, (args.seed, 0, step)),
        config, desc=f"{layers}x{heads}", progress=args.progress)
    seconds = time.perf_counter() - start
    mse, stderr = mse_by_context(predict(model, test.xs, test.ys), test.ys)
    name = f"{layers} layer{'s' if layers > 1 else ''} x {heads} head{'s' if heads > 1 else ''}"
    return {"model": name, "layers": layers, "heads": heads, "params": num_params(model),
            "train_seconds": seconds, "final_train_loss": history[-1]["loss"], "mse": mse.tolist(),
            "stderr": stderr.tolist(), "history": history}


BASELINES = ("least squares", "ridge", "one-step GD", "zero")
"""Baseline keys of ``baselines``, in plotting and table order."""
BASELINE_STYLES = {"least squares": ("tab:gray", "--"), "ridge": ("tab:green", "-"),
                   "one-step GD": ("tab:purple", "-."), "zero": ("black", ":")}
"""Colour and line style per baseline."""
MODEL_COLORS = ("tab:blue", "tab:orange", "tab:brown", "tab:pink", "tab:cyan", "tab:olive", "tab:red")
"""Model line colours (none of the baselines' colours)."""


def baseline_label(name: str, task: RegressionTask) -> str:
    """A baseline's name with its setting, for legends and table headers."""
    return {"ridge": f"ridge (λ = σ²d = {task.ridge_lambda:.3g}, Bayes-optimal)",
            "one-step GD": "one-step GD (best η per n)", "least squares": "least squares (min-norm)"}.get(name, name)


def baselines(task: RegressionTask, test: Prompts) -> dict:
    """Per-context-length MSE (and standard error) of least squares, Bayes-optimal ridge, one-step GD and zero."""
    predictions = {"least squares": least_squares_predictions(test.xs, test.ys),
                   "ridge": ridge_predictions(test.xs, test.ys, task.ridge_lambda),
                   "one-step GD": gd_predictions(test.xs, test.ys, task), "zero": np.zeros_like(test.ys)}
    rows = {}
    for name in BASELINES:
        mse, stderr = mse_by_context(predictions[name], test.ys)
        rows[name] = {"mse": mse.tolist(), "stderr": stderr.tolist()}
    return rows


def summary(row: dict, base: dict, num_points: int) -> dict:
    """A model's MSE over ridge's and over one-step GD's, averaged over ``1 ≤ n < N`` (trained) and ``n ≥ N``
    (longer than trained), and its MSE at ``n = 1``, at the largest trained ``n`` and at the largest tested ``n``."""
    mse = np.asarray(row["mse"])
    out = {}
    for key, name in (("ridge", "ridge"), ("gd", "one-step GD")):
        ratio = mse / np.asarray(base[name]["mse"])
        out[f"{key}_ratio_trained"] = float(ratio[1:num_points].mean())
        out[f"{key}_ratio_longer"] = float(ratio[num_points:].mean()) if len(ratio) > num_points else None
    return {**out, "mse_n1": float(mse[1]), "mse_last_trained": float(mse[num_points - 1]), "mse_last": float(mse[-1])}


def plot(rows: Sequence[dict], base: dict, path: Path, args: argparse.Namespace, task: RegressionTask) -> None:
    """Two panels: test MSE against ``n`` (log y) for models and baselines; MSE over ridge's against ``n``."""
    plt = plots.plt
    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    n = np.arange(len(base["zero"]["mse"]))
    ridge = np.asarray(base["ridge"]["mse"])
    for name in BASELINES:
        color, ls = BASELINE_STYLES[name]
        ax.plot(n[1:], base[name]["mse"][1:], color=color, ls=ls, lw=1.5, label=baseline_label(name, task))
    gd_ratio = np.asarray(base["one-step GD"]["mse"]) / ridge
    ax_ratio.plot(n[1:], gd_ratio[1:], color="tab:purple", ls="-.", lw=1.5, label=baseline_label("one-step GD", task))
    ax_ratio.axhline(1.0, color="tab:green", lw=1.5, label="ridge (Bayes-optimal)")
    for row, color in zip(rows, MODEL_COLORS * len(rows)):
        ax.plot(n[1:], row["mse"][1:], marker=".", ms=4, color=color, label=row["model"])
        ax_ratio.plot(n[1:], (np.asarray(row["mse"]) / ridge)[1:], marker=".", ms=4, color=color, label=row["model"])
    top = 2.0 * max(base["zero"]["mse"])
    ax.set_ylim(0.5 * task.noise_std ** 2, top)
    spike = int(np.argmax(base["least squares"]["mse"]))
    if base["least squares"]["mse"][spike] > top:
        ax.annotate(f"least squares off the axis near n = d\n(max MSE {base['least squares']['mse'][spike]:.3g} "
                    f"at n = {spike})", (spike, top), xytext=(spike + 2, 0.55 * top), fontsize=7,
                    arrowprops={"arrowstyle": "->", "lw": 0.6})
    for a in (ax, ax_ratio):
        a.axvspan(args.num_points - 0.5, n[-1] + 0.5, color="0.9", zorder=0, label="longer than trained")
        a.set_yscale("log")
        a.set_xlim(0.5, n[-1] + 0.5)
        a.set_xlabel("in-context examples n")
        a.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax_ratio.legend(fontsize=7, loc="upper right")
    ax.set(ylabel="test MSE on y_n", title=f"test MSE vs context length (noise floor σ² = {task.noise_std ** 2:.3g})")
    ax_ratio.set(ylabel="MSE / ridge MSE", title="excess error over the Bayes-optimal predictor")
    fig.suptitle(f"in-context linear regression, d = {task.dim}, σ² = {task.noise_std ** 2:.3g}: softmax attention "
                 f"(layers x heads) trained on n < {args.num_points}, {args.steps} steps", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: Sequence[dict], base: dict, task: RegressionTask) -> str:
    """Markdown: MSE per context length ``n`` for every model and baseline."""
    names = [r["model"] for r in rows] + [baseline_label(name, task) for name in base]
    series = [r["mse"] for r in rows] + [b["mse"] for b in base.values()]
    lines = [[str(n)] + [f"{s[n]:.4f}" for s in series] for n in range(len(series[0]))]
    return report.markdown_table(["n"] + names, lines)


def markdown(rows: Sequence[dict], base: dict, args: argparse.Namespace, argv: Sequence[str], task: RegressionTask,
             run_info: dict) -> str:
    """The markdown page: command, settings, machine and load, the summary and the per-n table."""
    device = run_info["device"]
    def ratio(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    summary_lines = []
    for row in rows:
        s = row["summary"]
        summary_lines.append([row["model"], f"{row['params']:,}", f"{row['train_seconds']:.0f}",
                              f"{row['final_train_loss']:.4f}"]
                             + [ratio(s[k]) for k in ("ridge_ratio_trained", "ridge_ratio_longer", "gd_ratio_trained",
                                                      "gd_ratio_longer")]
                             + [f"{s['mse_n1']:.3f}", f"{s['mse_last_trained']:.3f}", f"{s['mse_last']:.3f}"])
    n_test = args.num_points * args.test_multiple

    return "\n".join([
        f"# In-context linear regression — {device['platform']}", "",
        "`" + " ".join(["python -m experiments.icl_regression", *argv]) + "`", "",
        f"Task (He et al. 2025): d = {task.dim}, x ~ N(0, I), w ~ N(0, I/d), y = w·x + ε with σ² = "
        f"{task.noise_std ** 2:.3g}; tokens [x_i, y_i], queries [x_n, 0]; query n sees the n pairs before it. "
        "Training: "
        f"prompts of N = {args.num_points} pairs (every n < {args.num_points} scored), {args.steps} AdamW steps of "
        f"{args.batch_size} fresh prompts (lr {args.lr}, warmup {args.warmup_steps}, cosine, weight decay "
        f"{args.weight_decay}). Models: embedding to {args.d_model}, residual softmax-attention layers (layers x "
        f"heads as named) of heads of {args.head_dim} features, MLP ratio {args.mlp_ratio}, linear readout. Test: "
        f"{args.test_examples} held-out prompts of {n_test} pairs (n ≥ {args.num_points} is longer than any "
        f"training context); MSE against the noisy y_n (floor σ² = {task.noise_std ** 2:.3g}).", "",
        host.machine_line(run_info), "",
        "## Summary", "",
        "MSE / ridge (MSE / GD): the model's MSE over the Bayes-optimal ridge MSE (over the best one-step GD "
        f"MSE), averaged over 1 ≤ n < N = {args.num_points} (trained lengths) and N ≤ n (longer than trained).", "",
        report.markdown_table(["model", "params", "train s", "final train loss", "MSE/ridge, n < N",
                               "MSE/ridge, n ≥ N", "MSE/GD, n < N", "MSE/GD, n ≥ N", "MSE n=1",
                               f"MSE n={args.num_points - 1}", f"MSE n={n_test - 1}"], summary_lines), "",
        f"Baselines, MSE at n = 1 / {args.num_points - 1} / {n_test - 1}: "
        + "; ".join(f"{baseline_label(name, task)} {base[name]['mse'][1]:.3f} / "
                    f"{base[name]['mse'][args.num_points - 1]:.3f} / {base[name]['mse'][-1]:.3f}"
                    for name in BASELINES) + ".", "",
        "## Test MSE per context length n", "",
        table(rows, base, task), ""])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Train every model, score it and the baselines, print the page, write ``<name>.json``, ``.md``, ``.png``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    task = RegressionTask(dim=args.dim, noise_std=args.noise)
    started = host.start_run()
    test = regression_prompts(task, args.test_examples, args.num_points * args.test_multiple, (args.seed, 1))
    base = baselines(task, test)
    rows = []
    for layers, heads in tqdm(args.models, desc="icl_regression", disable=not args.progress, dynamic_ncols=True):
        row = run_model(args, task, layers, heads, test)
        row["summary"] = summary(row, base, args.num_points)
        rows.append(row)
        if args.progress:
            tqdm.write(f"{row['model']}: MSE/ridge {row['summary']['ridge_ratio_trained']:.2f} on trained lengths")
    run_info = host.finish_run(started)
    md = markdown(rows, base, args, argv, task, run_info)
    print(md)
    results = {"args": report.jsonable_args(args), "ridge_lambda": task.ridge_lambda, **run_info,
               "baselines": base, "results": rows}
    report.save_benchmark(results, md, args, lambda path: plot(rows, base, path, args, task))
    return results


if __name__ == "__main__":
    main()
