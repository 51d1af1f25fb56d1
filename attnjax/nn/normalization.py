"""SLAB's re-parameterized BatchNorm (RepBN) and progressive re-parameterized BatchNorm (PRepBN).

Guo et al., "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch
Normalization", ICML 2024 (arXiv 2405.11582), sec. 3 (PRepBN; only the abstract and summaries of the paper were
available here, so subsection and equation numbers are not cited, and the details follow the official code).
LayerNorm needs statistics at inference; BatchNorm does not (its running statistics fold into the next linear
layer), but training a Transformer with BatchNorm alone is unstable. PRepBN trains with a mixture that moves from
LayerNorm to RepBN::

    RepBN(x)  = BN(x) + η·x                                    (η learned, initialized to 1)
    PRepBN(x) = γ·LN(x) + (1 − γ)·RepBN(x),    γ = (T − t) / T  (t: training step, T: the schedule's length)

so that at the end of the schedule (``γ = 0``) the layer is RepBN, whose inference form is a plain BatchNorm:
with running mean ``μ``, variance ``σ²``, scale ``a`` and shift ``b``,
``BN(x) + η x = (x − μ)/√(σ² + ε)·(a + η√(σ² + ε)) + (b + η μ)`` (``RepBatchNorm.reparameterize``).
Parameter names follow the official code (xinghaochen/SLAB ``models/prepbn.py``: ``RepBN.bn``, ``RepBN.alpha``).

BatchNorm here normalizes each feature (the last axis) over all other axes (batch and tokens or pixels), as the
official ``BatchNorm1d`` on ``[B, C, N]``, with PyTorch's defaults ``ε = 1e-5`` and momentum 0.1 (flax's
``momentum=0.9``). The running variance is flax's biased batch variance (PyTorch updates it with the unbiased
one). Training mode (``use_running_average=False``) uses the batch statistics and updates the running ones:
call it through ``nnx.jit`` / ``nnx.grad``, and ``model.eval()`` for inference.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive, concrete_values, describe
from attnjax.nn.checks import check_features
from attnjax.nn.registry import ModuleSpec, register_module

EPSILON = 1e-5
"""``ε`` of the BatchNorm and the LayerNorm: PyTorch's default, which the official code keeps."""
MOMENTUM = 0.9
"""Flax's momentum of the running statistics (``new = momentum·old + (1 − momentum)·batch``): PyTorch's 0.1."""
TOTAL_STEPS = 60000
"""``T``: the official schedule of SLAB-Swin and SLAB-DeiT (``LinearNorm(step=60000)``)."""


class ScheduleStep(nnx.Variable):
    """The training step ``t`` of a PRepBN schedule (int32 scalar state, not a parameter)."""


def check_last_axis(x: jax.Array, num_features: int) -> None:
    """``TypeError`` unless ``x`` is floating point, ``ValueError`` unless it is ``[batch, ..., num_features]``."""
    check_features("x", x)
    if x.ndim < 2 or x.shape[-1] != num_features:
        raise ValueError(f"x must have shape [batch, ..., {num_features}] (features last), got {list(x.shape)}")


class RepBatchNorm(nnx.Module):
    """RepBN: ``RepBN(x) = BN(x) + α·x`` over the last axis (SLAB, sec. 3; the paper's ``η`` is ``alpha``).

    ``α`` is one learned scalar initialized to 1 (the official ``nn.Parameter(torch.ones(1))``).

    Example::

      norm = RepBatchNorm(64, rngs=nnx.Rngs(0))
      y = nnx.jit(lambda m, x: m(x))(norm, x)        # training: batch statistics, running ones updated
      norm.eval()
      folded = norm.reparameterize()                 # an nnx.BatchNorm: folded(x) == norm(x)

    Parameters: ``2C + 1`` (BatchNorm scale and shift, ``α``).

    Args:
      num_features: ``C``, the last axis of ``x``.
      momentum: running-statistics momentum in flax's convention (0.9 = PyTorch's 0.1).
      epsilon: BatchNorm's ``ε``.
      use_running_average: inference mode (``model.eval()`` sets it).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the BatchNorm (scale 1, shift 0).
    """

    def __init__(self, num_features: int, *, momentum: float = MOMENTUM, epsilon: float = EPSILON,
                 use_running_average: bool = False, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(num_features=num_features)
        self.num_features = num_features
        self.bn = nnx.BatchNorm(num_features, use_running_average=use_running_average, momentum=momentum,
                                epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.alpha = nnx.Param(jnp.ones((), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., C] -> [..., C]`` (in BatchNorm's computation dtype, like ``nnx.BatchNorm``)."""
        check_last_axis(x, self.num_features)
        y = self.bn(x)
        return y + self.alpha[...].astype(y.dtype) * x.astype(y.dtype)

    def reparameterize(self) -> nnx.BatchNorm:
        """The inference BatchNorm equal to this RepBN in eval mode: same running statistics and ``ε``, scale
        ``a + α√(σ² + ε)`` and shift ``b + α μ`` (``use_running_average=True``)."""
        bn = self.bn
        std = jnp.sqrt(bn.var[...] + bn.epsilon)
        alpha = self.alpha[...]
        folded = nnx.BatchNorm(self.num_features, use_running_average=True, momentum=bn.momentum,
                               epsilon=bn.epsilon, dtype=bn.dtype, param_dtype=bn.param_dtype, rngs=nnx.Rngs(0))
        folded.mean[...] = bn.mean[...]
        folded.var[...] = bn.var[...]
        folded.scale[...] = (bn.scale[...] + alpha * std).astype(bn.param_dtype)
        folded.bias[...] = (bn.bias[...] + alpha * bn.mean[...]).astype(bn.param_dtype)
        return folded


class ProgressiveRepBatchNorm(nnx.Module):
    """PRepBN: ``γ·LN(x) + (1 − γ)·RepBN(x)`` with ``γ`` falling linearly from 1 to 0 (SLAB, sec. 3).

    The schedule reads the step ``t`` that the module holds (a ``ScheduleStep`` variable)::

        γ(t) = 1                                         t < warmup_steps   (LayerNorm only)
        γ(t) = max(0, 1 − (t − warmup_steps) / total_steps)                 otherwise

    The official code (``LinearNorm``) counts the step itself, decrementing a buffer on every training-mode call.
    Here the step is set explicitly: ``set_progress(model, step)`` (or ``layer.set_progress(step)``) before the
    step's forward pass, e.g. inside the jitted training step, so that calling the module never changes it
    (a forward pass under ``jax.eval_shape`` or a second call in the same step sees the same ``γ``), and the
    step goes into checkpoints with the rest of the state. The mixture applies in both modes; the official
    code evaluates with RepBN alone, which is the same function once the schedule is over (``γ = 0``, the
    deployed model), and ``reparameterize()`` then returns the folded BatchNorm. During the LayerNorm-only
    warm-up the BatchNorm statistics are updated too (the official code skips RepBN there; the output is the same).

    Example::

      norm = ProgressiveRepBatchNorm(64, total_steps=60000, rngs=nnx.Rngs(0))
      set_progress(model, step)                      # every PRepBN in the model, then the training step
      ...
      model.eval(); inference = norm.reparameterize()   # once step >= warmup_steps + total_steps

    Parameters: ``2C`` (LayerNorm) + ``2C + 1`` (RepBN).

    Args:
      num_features: ``C``, the last axis of ``x``.
      total_steps: ``T``, the steps over which ``γ`` falls from 1 to 0 (60000 in the official SLAB-Swin).
      warmup_steps: LayerNorm-only steps before that (0 in the official code).
      initial_step: the step the module starts at (e.g. when fine-tuning).
      momentum, epsilon, use_running_average: RepBN's BatchNorm; ``epsilon`` is also LayerNorm's.
      dtype, param_dtype, rngs: as ``RepBatchNorm``.
    """

    def __init__(self, num_features: int, *, total_steps: int = TOTAL_STEPS, warmup_steps: int = 0,
                 initial_step: int = 0, momentum: float = MOMENTUM, epsilon: float = EPSILON,
                 use_running_average: bool = False, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(num_features=num_features, total_steps=total_steps)
        for name, value in (("warmup_steps", warmup_steps), ("initial_step", initial_step)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {describe(value)}")
        self.num_features, self.total_steps, self.warmup_steps = num_features, total_steps, warmup_steps
        self.layer_norm = nnx.LayerNorm(num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                                        rngs=rngs)
        self.rep_batch_norm = RepBatchNorm(num_features, momentum=momentum, epsilon=epsilon,
                                           use_running_average=use_running_average, dtype=dtype,
                                           param_dtype=param_dtype, rngs=rngs)
        self.step = ScheduleStep(jnp.asarray(initial_step, jnp.int32))

    def gamma(self) -> jax.Array:
        """``γ(t)`` at the module's step, a float32 scalar in ``[0, 1]``."""
        t = self.step[...].astype(jnp.float32) - self.warmup_steps
        return jnp.clip(1.0 - t / self.total_steps, 0.0, 1.0)

    def set_progress(self, step) -> None:
        """Set the schedule's step ``t`` (a non-negative int, or a traced int scalar inside a jitted step)."""
        values = concrete_values(step)
        if np.ndim(step) != 0 or (values is not None and not (np.issubdtype(values.dtype, np.integer)
                                                                and values >= 0)):
            raise ValueError(f"step must be a non-negative int scalar, got {describe(step)}")
        self.step[...] = jnp.asarray(step, jnp.int32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., C] -> [..., C]``."""
        check_last_axis(x, self.num_features)
        y_bn = self.rep_batch_norm(x)
        gamma = self.gamma().astype(y_bn.dtype)
        return gamma * self.layer_norm(x).astype(y_bn.dtype) + (1 - gamma) * y_bn

    def reparameterize(self) -> nnx.BatchNorm:
        """The inference BatchNorm (``RepBatchNorm.reparameterize``), equal to this module in eval mode once the
        schedule is over; ``ValueError`` before that (``γ > 0``: the LayerNorm still contributes)."""
        gamma = concrete_values(self.gamma())
        if gamma is None or gamma > 0:
            raise ValueError(f"reparameterize needs the schedule finished (gamma = 0, step >= warmup_steps + "
                             f"total_steps = {self.warmup_steps + self.total_steps}), got step "
                             f"{concrete_values(self.step[...])}, gamma {gamma}")
        return self.rep_batch_norm.reparameterize()


def set_progress(model: nnx.Module, step) -> None:
    """Set the training step of every ``ProgressiveRepBatchNorm`` in ``model`` (``model`` itself included).

    Call it at the start of each training step, inside the jitted step with a traced ``step`` or outside it.
    """
    for _, node in nnx.iter_graph(model):
        if isinstance(node, ProgressiveRepBatchNorm):
            node.set_progress(step)


PAPER = "Guo et al. 2024 (SLAB, ICML), sec. 3, PRepBN"
# Eval mode: a training-mode BatchNorm updates its running statistics, which the conformance suite's closures and
# Linen bridge cannot hold; training mode is tested under nnx.jit in tests/nn/test_normalization.py. The PRepBN
# example sits mid-schedule so that both the LayerNorm and the RepBN get gradients.
register_module(ModuleSpec("rep_batch_norm", RepBatchNorm, dict(num_features=8, use_running_average=True), (2, 9, 8),
                           kind="other", paper=PAPER))
register_module(ModuleSpec("prepbn", ProgressiveRepBatchNorm, dict(num_features=8, total_steps=4, initial_step=1,
                                                                   use_running_average=True), (2, 9, 8),
                           kind="other", paper=PAPER))

__all__ = ["EPSILON", "MOMENTUM", "TOTAL_STEPS", "ScheduleStep", "RepBatchNorm", "ProgressiveRepBatchNorm",
           "set_progress"]
