"""The training loop of the experiments' language models: AdamW, cross-entropy, evaluation.

AdamW (Loshchilov & Hutter 2019) with linear warmup then cosine decay, global-norm clipping,
cross-entropy on the targets that are not ``IGNORE``. Batches come from a function of the step, so a
run is a deterministic function of ``(model seed, data seed)`` and a resumed run sees the same data as
an uninterrupted one. Checkpoints (``experiments.lib.checkpoints``) hold the parameters and the optax
state, under the step number.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from experiments.lib.checkpoints import latest_step, restore_checkpoint, save_checkpoint
from experiments.lib.model import LanguageModel

IGNORE = -1
"""Target value that the loss and the accuracy skip."""

Batch = tuple[np.ndarray, np.ndarray]
"""``(inputs [B, T] int, targets [B, T] int)``; targets equal to ``IGNORE`` are not scored. ``inputs`` may also be
a pytree of arrays (e.g. a NamedTuple) that the model takes as its one argument."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization settings.

    Attributes:
      steps: optimizer steps in total.
      learning_rate: peak learning rate.
      warmup_steps: linear warmup from 0 to the peak, then cosine decay to ``final_lr_ratio · peak``.
      weight_decay: AdamW decoupled decay, on matrices only (not on norms or biases).
      grad_clip: global-norm clip (``0`` disables it).
      b1, b2: Adam moments.
      final_lr_ratio: learning rate at the last step relative to the peak.
      log_every: steps between synchronized loss readings (tqdm postfix and ``history``).
      checkpoint_every: steps between checkpoints when a directory is given (the last step always saves).
    """

    steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.98
    final_lr_ratio: float = 0.1
    log_every: int = 25
    checkpoint_every: int = 0


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm`` then AdamW with warmup + cosine decay (optax)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, max(config.warmup_steps, 1), max(config.steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.final_lr_ratio)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw) if config.grad_clip > 0 else adamw


def init_opt_state(model: nnx.Module, config: TrainConfig):
    """The optax state of ``make_optimizer(config)`` for the model's ``nnx.Param`` leaves (step 0)."""
    return make_optimizer(config).init(nnx.state(model, nnx.Param))


def token_loss(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed cross-entropy (nats), correct argmax count and scored-token count over ``targets != IGNORE``.

    ``logits [..., V]`` float32, ``targets [...]`` int. Sums (not means) so that several batches combine.
    """
    valid = targets != IGNORE
    safe = jnp.where(valid, targets, 0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    correct = (jnp.argmax(logits, axis=-1) == safe) & valid
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(correct), jnp.sum(valid)


def _mean_loss(model: LanguageModel, inputs: jax.Array, targets: jax.Array):
    total, correct, count = token_loss(model(inputs), targets)
    count = jnp.maximum(count, 1)
    return total / count, correct / count


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3, 4))
def _train_step(graphdef, config, params, rest, opt_state, inputs, targets):
    """One AdamW step on the model's ``nnx.Param`` state, and the rest of its state (``nnx.BatchStat`` and other
    non-parameter variables) as the forward leaves it (e.g. k-means centroids updated in the forward, which get
    no gradient); compiled once per (model structure, ``TrainConfig``). ``copy=True``: the merged model's variables
    are new ones of this trace, which its forward may write (the passed-in ones belong to the jit trace)."""
    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss, accuracy = _mean_loss(model, inputs, targets)
        return loss, (accuracy, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (accuracy, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = make_optimizer(config).update(grads, opt_state, params)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
    return optax.apply_updates(params, updates), rest, opt_state, metrics


@functools.partial(jax.jit, static_argnums=0)
def _eval_step(graphdef, state, inputs, targets):
    return token_loss(nnx.merge(graphdef, state)(inputs), targets)


def train(model: LanguageModel, batch_fn: Callable[[int], Batch], config: TrainConfig, *,
          checkpoint_dir: Optional[Union[str, Path]] = None, until: Optional[int] = None, desc: str = "train",
          progress: bool = True, on_log: Optional[Callable[[int, nnx.Module], dict]] = None) -> list[dict]:
    """Train ``model`` in place on ``batch_fn(step)`` up to ``config.steps`` steps; return the logged history.

    With ``checkpoint_dir``, training resumes from its newest checkpoint (parameters, optax state,
    step) and saves every ``config.checkpoint_every`` steps and where it stops. ``until`` stops early
    (the schedule still spans ``config.steps``), as an interruption would. The history has one dict
    per ``config.log_every`` steps (and the last step): ``step`` (steps done), ``loss`` (mean nats per
    scored token of that step's batch), ``accuracy``, ``grad_norm``. ``on_log(step, model)``, when given, runs at
    each logged step with the model holding that step's parameters (e.g. to evaluate held-out sets over
    training); the dict it returns joins that step's history row.
    """
    stop = config.steps if until is None else min(until, config.steps)
    opt_state, start = init_opt_state(model, config), 0
    if checkpoint_dir is not None and latest_step(checkpoint_dir) is not None:
        start, opt_state = restore_checkpoint(checkpoint_dir, model, opt_state)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    history: list[dict] = []
    bar = tqdm(range(start, stop), initial=start, total=config.steps, desc=desc, disable=not progress,
               leave=False, dynamic_ncols=True)
    for step in bar:
        inputs, targets = batch_fn(step)
        params, rest, opt_state, metrics = _train_step(graphdef, config, params, rest, opt_state,
                                                       jax.tree.map(jnp.asarray, inputs), jnp.asarray(targets))
        done = step + 1
        if done % max(config.log_every, 1) == 0 or done == stop:
            row = {"step": done, **{k: float(v) for k, v in metrics.items()}}
            if on_log is not None:
                nnx.update(model, params, rest)
                row.update(on_log(done, model))
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}")
        if checkpoint_dir is not None and (done == stop or config.checkpoint_every
                                           and done % config.checkpoint_every == 0):
            nnx.update(model, params, rest)
            save_checkpoint(checkpoint_dir, done, model, opt_state)
    nnx.update(model, params, rest)
    return history


def evaluate(model: LanguageModel, batches: Sequence[Batch]) -> dict:
    """Mean loss (nats and bits per scored token) and accuracy of ``model`` over ``batches``, in inference mode
    (``nnx.view(model, deterministic=True)``, for the modules that have the flag: dropout off, Zoology's ``SelectiveLookups`` attending at its top-k
    tokens only); ``model`` itself keeps its mode."""
    graphdef, state = nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))
    total = correct = count = 0
    for inputs, targets in batches:
        t, c, n = _eval_step(graphdef, state, jax.tree.map(jnp.asarray, inputs), jnp.asarray(targets))
        total, correct, count = total + float(t), correct + int(c), count + int(n)
    count = max(count, 1)
    return {"loss": total / count, "bits": total / count / math.log(2), "accuracy": correct / count, "tokens": count}
