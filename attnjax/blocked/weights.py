"""Score-to-weight functions: the one extension point of the blocked softmax-family paths.

The blocked XLA path (``attnjax.blocked.flash_xla``) and the Pallas flash kernels
(``pallas_kernels.flash``) are written once against ``WeightFunction``; softmax, sigmoid
attention and softplus attention are three instances:

- ``SOFTMAX`` / ``SoftmaxWeight``: ``w = exp(s − m)``, a running max, normalized
  (FlashAttention-2, Dao 2023).
- ``SigmoidWeight(bias)``: ``w = sigmoid(s + bias)``, no running max, unnormalized (FlashSigmoid;
  Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for Sigmoid Self-Attention").
- ``SoftplusWeight(power)``: ``w ∝ softplus(s)^p``, normalized (Gao & Spratling 2025, "Softplus
  Attention with Re-weighting Boosts Length Extrapolation in Large Language Models"). It runs as
  a softmax over ``u = p·log softplus(s)``, so a running max over ``u`` keeps large ``p`` and
  bf16 inputs from overflowing.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

LOG_SOFTPLUS_LINEAR_BELOW = -20.0
"""Below this logit ``log softplus(s) = s − e^s/2 + …`` equals ``s`` to float32 precision, and
``softplus`` itself would underflow further down; the log-domain softplus switches to ``s`` there."""


class WeightFunction:
    """How a logit tile becomes weights; the blocked paths call only these methods.

    Class attributes:
      running_max: keep an online row max ``m`` of ``u = transform(s)`` and rescale the
        accumulator by ``rescale(m_old, m_new)`` when it grows. If False, ``m`` is 0 throughout.
      normalized: divide each row by ``l = Σ_j w_ij`` (plus the sink's weight). If False the
        output is ``Σ_j w_ij v_j`` and there is no row statistic (no ``return_lse``, no sinks).
      supports_sinks: whether a per-head sink logit may join the normalizer.

    Forward: ``u = transform(s)`` (identity for softmax and sigmoid), ``w = weight(u, m)``. A
    masked logit is ``-inf`` and must get weight exactly 0.

    Row statistic saved for the backward pass ("lse", float32 ``[B, T, H]``):
      running_max and normalized: ``m + log l`` (the log-sum-exp of ``u``);
      normalized only: ``log l``; neither: zeros (unused). Empty rows: ``-inf``.

    Backward (recompute, FA2): from the statistic ``r`` the blocked paths form
      ``P = weight(transform(s), m_b) · exp(-n_b)`` and ``dP/ds = dweight(s, P_unscaled) · exp(-n_b)``
    with ``(m_b, n_b) = (r, 0)`` if running_max else ``(0, r)`` if normalized else ``(0, 0)``
    (see ``backward_offsets``), then
      ``dS = dP/ds ⊙ (dO·Vᵀ − δ + dr)`` (normalized, ``δ_i = dO_i·O_i``) or ``dP/ds ⊙ dO·Vᵀ``.
    ``dweight(s, 0)`` must be 0 (masked weights are zeroed before it is called).
    All methods are elementwise on float32 tiles and must lower in XLA, Triton and Mosaic.
    """

    running_max: ClassVar[bool]
    normalized: ClassVar[bool]
    supports_sinks: ClassVar[bool] = False
    name: ClassVar[str]

    def transform(self, s: jax.Array) -> jax.Array:
        """The logit ``u`` that the running max and ``weight`` see (default: ``s`` itself)."""
        return s

    def weight(self, u: jax.Array, m: jax.Array) -> jax.Array:
        """Unnormalized weight of transformed logits ``u`` [.., bq, bk] given the row offset ``m`` [.., bq, 1]."""
        raise NotImplementedError

    def dweight(self, s: jax.Array, w: jax.Array) -> jax.Array:
        """``d weight / d s`` at the raw logit ``s``, given ``w = weight(transform(s), m)``."""
        raise NotImplementedError

    def rescale(self, m_old: jax.Array, m_new: jax.Array) -> jax.Array:
        """Factor that moves accumulators from offset ``m_old`` to ``m_new`` (running_max only)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SoftmaxWeight(WeightFunction):
    """``w = exp(s − m)``, normalized, with a running max: exact softmax attention."""

    running_max: ClassVar[bool] = True
    normalized: ClassVar[bool] = True
    supports_sinks: ClassVar[bool] = True
    name: ClassVar[str] = "softmax"

    def weight(self, u, m):
        return jnp.exp(u - m)

    def dweight(self, s, w):
        return w

    def rescale(self, m_old, m_new):
        return jnp.exp(m_old - m_new)


@dataclasses.dataclass(frozen=True)
class SigmoidWeight(WeightFunction):
    """``w = sigmoid(s + bias)``, unnormalized, no running max (FlashSigmoid; Ramapuram et al. 2024,
    "Theory, Analysis, and Best Practices for Sigmoid Self-Attention"; ``bias = −log n`` there)."""

    bias: float = 0.0
    running_max: ClassVar[bool] = False
    normalized: ClassVar[bool] = False
    name: ClassVar[str] = "sigmoid"

    def weight(self, u, m):
        return jax.nn.sigmoid(u + self.bias)

    def dweight(self, s, w):
        return w * (1.0 - w)


def softplus(s: jax.Array) -> jax.Array:
    """``log(1 + e^s) = max(s, 0) + log1p(e^{−|s|})``: stable, and only exp/log1p (lowers in kernels)."""
    return jnp.maximum(s, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(s)))


def log_softplus(s: jax.Array) -> jax.Array:
    """``log softplus(s)``, finite down to ``-inf`` (where it is ``-inf``)."""
    linear = s < LOG_SOFTPLUS_LINEAR_BELOW
    return jnp.where(linear, s, jnp.log(softplus(jnp.where(linear, 0.0, s))))


def dlog_softplus(s: jax.Array) -> jax.Array:
    """``d log softplus(s) / ds = sigmoid(s) / softplus(s)`` (→ 1 as ``s`` → −∞, → 0 as ``s`` → ∞)."""
    linear = s < LOG_SOFTPLUS_LINEAR_BELOW
    safe = jnp.where(linear, 0.0, s)
    return jnp.where(linear, 1.0, jax.nn.sigmoid(safe) / softplus(safe))


@dataclasses.dataclass(frozen=True)
class SoftplusWeight(WeightFunction):
    """``w_ij = softplus(s_ij)^p / Σ_j softplus(s_ij)^p``: l1-normalized softplus re-weighted by
    the power ``p`` (Gao & Spratling 2025, arXiv:2501.13428).

    Computed as a softmax over ``u = p·log softplus(s)``: ``w = exp(u − m)`` with a running max
    ``m`` of ``u``, and ``dw/ds = w·p·sigmoid(s)/softplus(s)``. The row statistic is
    ``log Σ_j softplus(s_ij)^p``, not a log-sum-exp of the logits, so no ``return_lse``.
    """

    power: float = 1.0
    running_max: ClassVar[bool] = True
    normalized: ClassVar[bool] = True
    name: ClassVar[str] = "softplus"

    def __post_init__(self):
        if not self.power > 0:
            raise ValueError(f"SoftplusWeight.power must be positive, got {self.power}")

    def transform(self, s):
        u = log_softplus(s)
        return u if self.power == 1.0 else self.power * u

    def weight(self, u, m):
        return jnp.exp(u - m)

    def dweight(self, s, w):
        du = dlog_softplus(s)
        return w * (du if self.power == 1.0 else self.power * du)

    def rescale(self, m_old, m_new):
        return jnp.exp(m_old - m_new)


SOFTMAX = SoftmaxWeight()


def backward_offsets(fn: WeightFunction, stat: jax.Array):
    """``(m_b, n_b)`` for the backward's ``P = weight(u, m_b)·exp(−n_b)`` (see WeightFunction)."""
    zero = jnp.zeros_like(stat)
    if fn.running_max:
        return stat, zero
    if fn.normalized:
        return zero, stat
    return zero, zero


def backward_stat(fn: WeightFunction, lse: jax.Array) -> jax.Array:
    """The forward's row statistic made safe for recomputation.

    Empty rows (``-inf``) become ``+inf`` when it is a running max, so every recomputed weight
    ``exp(u − inf)`` is exactly 0; for normalized-only functions they become 0 (their weights
    are masked to 0 anyway). Pad query rows with ``+inf`` for the same reason.
    """
    finite = jnp.isfinite(lse)
    return jnp.where(finite, lse, jnp.inf if fn.running_max else 0.0)


__all__ = [
    "WeightFunction", "SoftmaxWeight", "SigmoidWeight", "SoftplusWeight", "SOFTMAX", "backward_offsets",
    "backward_stat", "softplus", "log_softplus", "dlog_softplus",
]
