"""Shared training utilities: a small causal LM of ``attnjax.nn`` blocks, an optax loop, orbax checkpoints.

The model is a decoder-only transformer (Vaswani et al. 2017; GPT-2's pre-norm layout, Radford et al.
2019): token embedding, ``num_layers`` residual blocks, a final LayerNorm and a tied (or untied)
output head. The token mixer is picked by name (``ModelConfig.mixer``):

- any ``attnjax.registry`` name (``"softmax"``, ``"lightning"``, ``"based_linear"``, ...): a pre-norm
  block ``h = x + MHA(LN(x))``, ``y = h + MLP(LN(h))`` with ``attnjax.nn.MultiHeadAttention(mechanism=name)``,
  causal mask and RoPE;
- a name in ``attnjax.nn.BLOCKS`` (``"transnormer"``, ``"based"``): that block as published
  (TransNormerLLM: SRMSNorm, gated Lightning attention, SGLU; BASED: Taylor linear attention, then
  sliding-window softmax, then MLP), with ``ModelConfig.mixer_options`` passed to its constructor.

Training: AdamW (Loshchilov & Hutter 2019) with linear warmup then cosine decay, global-norm clipping,
cross-entropy on the targets that are not ``IGNORE``. Batches come from a function of the step, so a
run is a deterministic function of ``(model seed, data seed)`` and a resumed run sees the same data as
an uninterrupted one. Checkpoints (``orbax.checkpoint.CheckpointManager``) hold the parameters and the
optax state, under the step number.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from attnjax import masks, nn as ajnn, registry
from attnjax.linear import linear_attention
from attnjax.positional import RoPE

IGNORE = -1
"""Target value that the loss and the accuracy skip."""

Batch = tuple[np.ndarray, np.ndarray]
"""``(inputs [B, T] int, targets [B, T] int)``; targets equal to ``IGNORE`` are not scored."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a ``LanguageModel``.

    Attributes:
      vocab_size: tokens ``V``.
      mixer: a registry mechanism name or a name in ``attnjax.nn.BLOCKS`` (see the module docstring).
      d_model: residual width.
      num_layers: residual blocks.
      num_heads: attention heads per block.
      head_dim: features per head of the registry-mechanism blocks (default ``d_model // num_heads``);
        for a feature-map mechanism it is also the dimension the feature map expands (BASED's ``feature_dim``).
      mlp_ratio: MLP hidden width ``mlp_ratio · d_model`` of the registry-mechanism blocks (and BASED);
        ``0`` drops the MLP from the registry-mechanism blocks (BASED then uses its default ``4·d_model``).
      rope: rotary positions in the ``MultiHeadAttention`` (and BASED sliding-window) layers.
      tie_embeddings: the head is the transposed embedding; else a separate ``[d_model, V]`` matrix.
      short_conv: kernel size of a causal depthwise convolution sublayer before each block (``0``: none).
      mixer_options: extra keyword arguments of the ``attnjax.nn.BLOCKS`` block (e.g. BASED's
        ``feature_dim``, ``window``), or of the registry config (e.g. ``{"chunk_size": 32}``).
    """

    vocab_size: int
    mixer: str = "softmax"
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    head_dim: Optional[int] = None
    mlp_ratio: int = 4
    rope: bool = True
    tie_embeddings: bool = True
    short_conv: int = 0
    mixer_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.mixer not in mixer_names():
            raise ValueError(f"unknown mixer {self.mixer!r}; known: {mixer_names()}")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.short_conv < 0:
            raise ValueError(f"ModelConfig.short_conv must be >= 0, got {self.short_conv}")
        if self.mlp_ratio < 0:
            raise ValueError(f"ModelConfig.mlp_ratio must be >= 0, got {self.mlp_ratio}")

    def mechanism(self) -> Optional[registry.Mechanism]:
        """The registry config of a registry mixer (with ``mixer_options``); ``None`` for an nn block."""
        if self.mixer in ajnn.BLOCKS:
            return None
        return registry.get(self.mixer)(**self.mixer_options)


def mixer_names() -> list[str]:
    """Every name ``ModelConfig.mixer`` accepts: registry mechanisms, then ``attnjax.nn.BLOCKS``."""
    return [e.name for e in registry.entries()] + sorted(ajnn.BLOCKS)


class MLP(nnx.Module):
    """``y = W_2 gelu(W_1 x)``, hidden width ``hidden``."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
        self.up, self.down = nnx.Linear(d_model, hidden, rngs=rngs), nnx.Linear(hidden, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class AttentionBlock(nnx.Module):
    """Pre-norm block ``h = x + MHA(LN(x))``, ``y = h + MLP(LN(h))`` with causal ``MultiHeadAttention``.

    ``mlp_dim=0`` leaves the MLP out (``y = h``), as Zoology's MQAR models do (identity state mixer).
    """

    def __init__(self, d_model: int, num_heads: int, *, mechanism: registry.Mechanism, mlp_dim: int, rope: bool,
                 rngs: nnx.Rngs, head_dim: Optional[int] = None):
        self.norm_attention = nnx.LayerNorm(d_model, rngs=rngs)
        self.attention = ajnn.MultiHeadAttention(d_model, num_heads, head_dim=head_dim, mechanism=mechanism,
                                                 rope=RoPE() if rope else None, rngs=rngs)
        self.norm_mlp = nnx.LayerNorm(d_model, rngs=rngs) if mlp_dim else None
        self.mlp = MLP(d_model, mlp_dim, rngs=rngs) if mlp_dim else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal."""
        h = x + self.attention(self.norm_attention(x), mask=masks.Causal())
        return h if self.mlp is None else h + self.mlp(self.norm_mlp(h))


class ShortConv(nnx.Module):
    """Residual causal depthwise convolution ``y_t = x_t + Σ_{i<k} w_i ⊙ LN(x)_{t−i} + b``.

    The short convolutions of H3/Hyena/BASED (Zoology's ``BaseConv``, Mamba's ``conv1d``): each token
    sees the previous ``k − 1`` tokens, so a mixer can bind a value to the key just before it without
    first learning a previous-token attention head.
    """

    def __init__(self, d_model: int, kernel_size: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.conv = nnx.Conv(d_model, d_model, kernel_size=(kernel_size,), feature_group_count=d_model,
                             padding=((kernel_size - 1, 0),), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal."""
        return x + self.conv(self.norm(x))


def make_block(config: ModelConfig, layer_idx: int, rngs: nnx.Rngs) -> nnx.Module:
    """Residual block ``layer_idx`` of a model: ``[B, T, d_model] -> [B, T, d_model]``, causal."""
    d, heads, mlp_dim = config.d_model, config.num_heads, config.mlp_ratio * config.d_model
    if config.mixer == "transnormer":
        return ajnn.BLOCKS["transnormer"](d, heads, layer_idx=layer_idx, num_layers=config.num_layers, rngs=rngs,
                                          **config.mixer_options)
    if config.mixer == "based":
        return ajnn.BLOCKS["based"](d, heads, mlp_dim=mlp_dim or None, rope=RoPE() if config.rope else None, rngs=rngs,
                                    **config.mixer_options)
    if config.mixer in ajnn.BLOCKS:
        return ajnn.BLOCKS[config.mixer](d, heads, rngs=rngs, **config.mixer_options)
    return AttentionBlock(d, heads, mechanism=config.mechanism(), mlp_dim=mlp_dim, rope=config.rope, rngs=rngs,
                          head_dim=config.head_dim)


class LanguageModel(nnx.Module):
    """Causal LM: ``logits = head(LN(block_L(... block_1(embed(tokens)))))``.

    With ``config.short_conv``, a ``ShortConv`` sublayer runs before each block.
    The embedding is initialized with standard deviation ``1/√d_model`` so that, tied, initial
    logits have unit scale. ``rngs`` only initializes parameters (the model has no dropout).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d = config.d_model
        self.embed = nnx.Embed(config.vocab_size, d, embedding_init=nnx.initializers.normal(d ** -0.5), rngs=rngs)
        self.convs = nnx.List([ShortConv(d, config.short_conv, rngs=rngs) for _ in range(config.num_layers)]
                              if config.short_conv else [])
        self.blocks = nnx.List([make_block(config, i, rngs) for i in range(config.num_layers)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = None if config.tie_embeddings else nnx.Linear(d, config.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens [B, T]`` int -> float32 ``logits [B, T, vocab_size]`` (position ``t`` predicts ``t + 1``)."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [B, T], got {tokens.dtype} {tokens.shape}")
        h = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            h = block(self.convs[i](h) if self.convs else h)
        h = self.norm(h)
        logits = self.embed.attend(h) if self.head is None else self.head(h)
        return logits.astype(jnp.float32)


def num_params(model: nnx.Module) -> int:
    """Number of scalars in the model's ``nnx.Param`` leaves."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _cache_size(module: nnx.Module, *args) -> int:
    cache = jax.eval_shape(lambda: module.init_cache(1, *args))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(cache) if x.ndim > 0)


def decode_state_size(config: ModelConfig, seq_len: int) -> Optional[int]:
    """Floats per sequence that the model keeps to decode token ``seq_len + 1``, summed over blocks.

    Softmax-family mechanisms keep keys and values, ``2 · seq_len · H · D`` per block (it grows);
    feature-map linear attention keeps the state ``S = Σ φ(k_t)ᵀ v_t`` (plus the normalizer column),
    whose size does not depend on ``seq_len``; ``attnjax.nn.BLOCKS`` report their ``init_cache`` (BASED:
    a linear state and a ``window``-token KV buffer). This is the "recurrent state size" axis of Zoology
    (Arora et al. 2023) and BASED (Arora et al. 2024). ``None`` for a mechanism of another kind.
    """
    model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    mechanism = config.mechanism()
    total = 0
    for block in model.blocks:
        if not isinstance(block, AttentionBlock):
            total += _cache_size(block)
            continue
        mha = block.attention
        if hasattr(mechanism, "feature_map"):
            q = jax.ShapeDtypeStruct((1, 1, mha.num_heads, mha.head_dim), jnp.float32)
            kv = jax.ShapeDtypeStruct((1, 1, mha.num_kv_heads, mha.head_dim), jnp.float32)
            _, state = jax.eval_shape(lambda q, k, v: linear_attention(
                q, k, v, feature_map=mechanism.feature_map, normalize=mechanism.normalize, return_state=True),
                q, kv, kv)
            total += int(np.prod(state.shape))
        elif mechanism.family == "softmax":
            total += 2 * seq_len * mha.num_kv_heads * mha.head_dim
        else:
            return None
    return total


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


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 4))
def _train_step(graphdef, config, params, rest, opt_state, inputs, targets):
    """One AdamW step on the model's ``nnx.Param`` state; compiled once per (model structure, ``TrainConfig``)."""
    def loss_fn(params):
        return _mean_loss(nnx.merge(graphdef, params, rest), inputs, targets)

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = make_optimizer(config).update(grads, opt_state, params)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
    return optax.apply_updates(params, updates), opt_state, metrics


@functools.partial(jax.jit, static_argnums=0)
def _eval_step(graphdef, state, inputs, targets):
    return token_loss(nnx.merge(graphdef, state)(inputs), targets)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def logits(model: LanguageModel, tokens: jax.Array) -> jax.Array:
    """``model(tokens)`` compiled once per model structure and shape: float32 ``[B, T, vocab_size]``."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, jnp.asarray(tokens))


def init_opt_state(model: nnx.Module, config: TrainConfig):
    """The optax state of ``make_optimizer(config)`` for the model's ``nnx.Param`` leaves (step 0)."""
    return make_optimizer(config).init(nnx.state(model, nnx.Param))


def _checkpoint_manager(directory: Union[str, Path], max_to_keep: Optional[int] = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(directory).resolve(), options=options)


def save_checkpoint(directory: Union[str, Path], step: int, model: nnx.Module, opt_state=None) -> None:
    """Save the model's state (and the optax state) as checkpoint ``step`` under ``directory``."""
    items = {"model": ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model)))}
    if opt_state is not None:
        items["optimizer"] = ocp.args.StandardSave(opt_state)
    with _checkpoint_manager(directory) as manager:
        manager.save(step, args=ocp.args.Composite(**items))
        manager.wait_until_finished()


def latest_step(directory: Union[str, Path]) -> Optional[int]:
    """The newest checkpoint step under ``directory``, or ``None`` if it holds none."""
    if not Path(directory).exists():
        return None
    with _checkpoint_manager(directory) as manager:
        return manager.latest_step()


def restore_checkpoint(directory: Union[str, Path], model: nnx.Module, opt_state=None,
                       step: Optional[int] = None):
    """Load checkpoint ``step`` (default: the newest) into ``model`` in place.

    ``model`` may be freshly built with any seed: only its structure is used. Returns the step, or
    ``(step, restored optax state)`` when ``opt_state`` (a template, e.g. ``init_opt_state``) is given.
    """
    with _checkpoint_manager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        state = nnx.state(model)
        args = {"model": ocp.args.StandardRestore(nnx.to_pure_dict(state))}
        if opt_state is not None:
            args["optimizer"] = ocp.args.StandardRestore(opt_state)
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    # Orbax returns arrays committed to a device; fresh ones are not, and jit would compile twice.
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), dict(restored))
    nnx.replace_by_pure_dict(state, restored["model"])
    nnx.update(model, state)
    return step if opt_state is None else (step, restored["optimizer"])


def train(model: LanguageModel, batch_fn: Callable[[int], Batch], config: TrainConfig, *,
          checkpoint_dir: Optional[Union[str, Path]] = None, until: Optional[int] = None, desc: str = "train",
          progress: bool = True) -> list[dict]:
    """Train ``model`` in place on ``batch_fn(step)`` up to ``config.steps`` steps; return the logged history.

    With ``checkpoint_dir``, training resumes from its newest checkpoint (parameters, optax state,
    step) and saves every ``config.checkpoint_every`` steps and where it stops. ``until`` stops early
    (the schedule still spans ``config.steps``), as an interruption would. The history has one dict
    per ``config.log_every`` steps (and the last step): ``step`` (steps done), ``loss`` (mean nats per
    scored token of that step's batch), ``accuracy``, ``grad_norm``.
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
        params, opt_state, metrics = _train_step(graphdef, config, params, rest, opt_state, jnp.asarray(inputs),
                                                 jnp.asarray(targets))
        done = step + 1
        if done % max(config.log_every, 1) == 0 or done == stop:
            row = {"step": done, **{k: float(v) for k, v in metrics.items()}}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}")
        if checkpoint_dir is not None and (done == stop or config.checkpoint_every
                                           and done % config.checkpoint_every == 0):
            nnx.update(model, params)
            save_checkpoint(checkpoint_dir, done, model, opt_state)
    nnx.update(model, params)
    return history


def evaluate(model: LanguageModel, batches: Sequence[Batch]) -> dict:
    """Mean loss (nats and bits per scored token) and accuracy of ``model`` over ``batches``."""
    graphdef, state = nnx.split(model)
    total = correct = count = 0
    for inputs, targets in batches:
        t, c, n = _eval_step(graphdef, state, jnp.asarray(inputs), jnp.asarray(targets))
        total, correct, count = total + float(t), correct + int(c), count + int(n)
    count = max(count, 1)
    return {"loss": total / count, "bits": total / count / math.log(2), "accuracy": correct / count, "tokens": count}
