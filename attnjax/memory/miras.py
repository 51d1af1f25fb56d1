"""Miras: attentional biases (the memory's inner objective) and retention gates (its forgetting rule) for the deep
neural memory (Behrouz, Razaviyayn, Zhong and Mirrokni, "It's All Connected: A Journey Through Test-Time
Memorization, Attentional Bias, Retention, and Online Optimization", arXiv 2504.13173, 2025).

Miras describes a recurrent memory by four choices: the memory architecture (here the MLP of
``attnjax.memory.deep_memory``), the attentional bias ``ℓ(W; k, v)`` the memory minimizes at test time, the
retention gate that keeps it close to its past, and the learning algorithm (here gradient descent with momentum
and the chunk base of Titans Section 3.2). This file holds the small pure pieces:

* attentional biases, each with its written formula ``loss(pred, target, delta)`` and its closed-form gradient
  ``grad = ∂ℓ/∂pred`` (the memory's weight gradient is that pulled back through the MLP):

  - ``L2Bias``: ``½‖M(k) − v‖²₂`` (Titans eq. 12; the paper writes it without ½, which the learning rate absorbs).
  - ``LpBias(p)``: ``‖M(k) − v‖_p^p`` (Miras eq. 10, Moneta's bias with p = 3), gradient
    ``p·sign(e)⊙|e|^(p−1)`` (eq. 11); with ``eps > 0`` the smooth ``Σ (e² + ε)^(p/2)`` of the paper's remark on
    ``|x| ≈ √(x² + ε)`` (needed for p < 2).
  - ``HuberBias``: Yaad's switch (Miras eqs. 16 and 26) with the per-token, data-dependent threshold ``δ_t``: the
    ℓ2 gradient ``e`` while ``‖e‖₂ ≤ δ_t``, else ``δ_t·sign(e)`` (δ_t times the ℓ1 gradient).

* retention gates, each a map ``W = ψ(P)`` from the state the recurrence carries to the weights the MLP uses.
  Every gate here turns the paper's update into one linear recurrence on ``P``,
  ``P_t = (1 − α_t)·P_(t−1) + U_t``, ``U_t = η_t·U_(t−1) − θ_t·∇_W ℓ(ψ(P_base))`` (mirror descent with the
  mirror map ψ), so the chunked path is the same for all of them:

  - ``L2Retention``: ψ = identity: Titans' weight decay (eq. 13) = Miras' ℓ2 local + global retention.
  - ``LqRetention(q)``: Moneta's ℓq retention (Miras eq. 24): ``P`` is the accumulator ``A_t`` and
    ``W_t = A_t / ‖A_t‖_q^(q−2)``, the norm over each weight matrix of a head.
  - ``KLRetention(scale)``: Memora's KL retention (Miras eq. 27, from eq. 21):
    ``W_t = c·Softmax(α_t log W_(t−1) − η_t ∇ℓ(W_(t−1)))``. A softmax ignores a constant added to its slice and
    ``α log W = α·P − α·logsumexp(P)``, so this is exactly ``P_t = α_t P_(t−1) − η_t ∇ℓ``, ``W_t = c·softmax(P_t)``
    with ``P`` the (unnormalized) logits: the paper's multiplicative update with no approximation, and its chunked
    form needs none of the paper's lag-token linearization (Section 5, parallel training). The softmax runs over
    each weight matrix's input axis (each output unit's incoming weights sum to c); the paper says only "per slice".

``miras_variant(name)`` gives the paper's three models' choices and Titans': "titans" (ℓ2, ℓ2), "moneta" (ℓ3, ℓ4),
"yaad" (Huber, ℓ2), "memora" (ℓ2, KL). The paper's Moneta, Yaad and Memora use plain gradient descent: pass a
zero momentum gate η to ``deep_memory`` for that.

The equation numbers are those of arXiv v1.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Union

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class L2Bias:
    """Titans' attentional bias ``ℓ = ½‖M(k) − v‖²₂`` (Behrouz et al. 2025, Titans eq. 12; without the ½ there),
    gradient ``∂ℓ/∂pred = pred − v``."""

    needs_delta: ClassVar[bool] = False

    def loss(self, pred: jax.Array, target: jax.Array, delta: Optional[jax.Array] = None) -> jax.Array:
        """``½ Σ_j (pred_j − v_j)²`` over the last axis: ``[..., Dv] -> [...]``."""
        return 0.5 * jnp.sum(jnp.square(pred - target), axis=-1)

    def grad(self, pred: jax.Array, target: jax.Array, delta: Optional[jax.Array] = None) -> jax.Array:
        """``pred − v`` ``[..., Dv]``."""
        return pred - target


@dataclasses.dataclass(frozen=True)
class LpBias:
    """Moneta's ℓp attentional bias ``ℓ = ‖M(k) − v‖_p^p`` (Miras eq. 10; the paper's Moneta uses p = 3).

    Gradient ``∂ℓ/∂pred = p·sign(e)⊙|e|^(p−1)`` with ``e = pred − v`` (eq. 11). With ``eps > 0`` the smooth
    ``Σ_j (e_j² + ε)^(p/2)`` (the paper's ``|x| ≈ √(x² + ε)`` remark), gradient ``p·e⊙(e² + ε)^(p/2 − 1)``.

    Attributes:
      p: the norm's order, ≥ 1; p < 2 needs ``eps > 0`` (the second derivative of ``|e|^p`` is infinite at 0, and
        the outer gradients of a model pass through this gradient).
      eps: ε ≥ 0 of the smooth form.
    """

    p: float = 3.0
    eps: float = 0.0
    needs_delta: ClassVar[bool] = False

    def __post_init__(self):
        for name in ("p", "eps"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                raise TypeError(f"LpBias.{name} must be a real number, got {getattr(self, name)!r}")
        if not self.p >= 1:
            raise ValueError(f"LpBias.p must be >= 1, got {self.p}")
        if not self.eps >= 0:
            raise ValueError(f"LpBias.eps must be >= 0, got {self.eps}")
        if self.p < 2 and self.eps == 0:
            raise ValueError(f"LpBias.p = {self.p} < 2 needs eps > 0 (the smooth |x| ≈ √(x² + ε))")

    def loss(self, pred: jax.Array, target: jax.Array, delta: Optional[jax.Array] = None) -> jax.Array:
        """``Σ_j |e_j|^p`` (or ``Σ_j (e_j² + ε)^(p/2)``) over the last axis: ``[..., Dv] -> [...]``."""
        e = pred - target
        if self.eps:
            return jnp.sum((jnp.square(e) + self.eps) ** (self.p / 2), axis=-1)
        return jnp.sum(jnp.abs(e) ** self.p, axis=-1)

    def grad(self, pred: jax.Array, target: jax.Array, delta: Optional[jax.Array] = None) -> jax.Array:
        """``p·sign(e)⊙|e|^(p−1)`` (or ``p·e⊙(e² + ε)^(p/2 − 1)``) ``[..., Dv]``."""
        e = pred - target
        if self.eps:
            return self.p * e * (jnp.square(e) + self.eps) ** (self.p / 2 - 1)
        return self.p * jnp.sign(e) * jnp.abs(e) ** (self.p - 1)


@dataclasses.dataclass(frozen=True)
class HuberBias:
    """Yaad's Huber attentional bias (Miras eq. 16, the update of eq. 26) with a per-token threshold ``δ_t > 0``
    (data-dependent in the paper: the ``delta`` argument of ``deep_memory``).

    With ``e = pred − v``: ``ℓ = ½‖e‖²₂`` while ``‖e‖₂ ≤ δ`` and ``ℓ = δ·(‖e‖₁ − ½δ)`` beyond, so that the
    gradient is the ℓ2 gradient ``e`` for small errors and ``δ·sign(e)`` (δ times the ℓ1 gradient) for large ones,
    exactly eq. 26's switch. In one dimension this is Huber's function; for ``Dv > 1`` the loss value jumps at
    the switch (``‖e‖₁ ≥ ‖e‖₂``), as the paper's update does; only the gradient enters the memory.
    """

    needs_delta: ClassVar[bool] = True

    def loss(self, pred: jax.Array, target: jax.Array, delta: Optional[jax.Array] = None) -> jax.Array:
        """``[..., Dv] -> [...]`` with ``delta [...]``."""
        e = pred - target
        inside = jnp.linalg.norm(e, axis=-1) <= delta
        return jnp.where(inside, 0.5 * jnp.sum(jnp.square(e), axis=-1),
                         delta * (jnp.sum(jnp.abs(e), axis=-1) - 0.5 * delta))

    def grad(self, pred: jax.Array, target: jax.Array, delta: Optional[jax.Array] = None) -> jax.Array:
        """``e`` where ``‖e‖₂ ≤ δ``, else ``δ·sign(e)``: ``[..., Dv]`` with ``delta [...]``."""
        e = pred - target
        inside = jnp.linalg.norm(e, axis=-1, keepdims=True) <= delta[..., None]
        return jnp.where(inside, e, delta[..., None] * jnp.sign(e))


Objective = Union[L2Bias, LpBias, HuberBias]
"""An attentional bias: ``loss(pred, target, delta)``, ``grad(pred, target, delta)``, ``needs_delta``."""


@dataclasses.dataclass(frozen=True)
class L2Retention:
    """Titans' weight decay (Titans eq. 13; Miras' ℓ2 retention): the state is the weights, ψ = identity."""

    def weights(self, state: jax.Array) -> jax.Array:
        """The MLP weights of a state leaf ``[..., d_in, d_out]`` (here the leaf itself)."""
        return state


@dataclasses.dataclass(frozen=True)
class LqRetention:
    """Moneta's ℓq retention (Miras eq. 24): the state is the accumulator ``A`` and the weights are
    ``W = A / ‖A‖_q^(q−2)``, the entrywise q-norm taken over each ``[d_in, d_out]`` matrix of a head.

    Attributes:
      q: the order, ≥ 1 (the paper's Moneta uses q = 4; q = 2 is the ℓ2 retention).
      eps: the norm is floored at ``eps`` (an all-zero accumulator gives zero weights and finite gradients).
    """

    q: float = 4.0
    eps: float = 1e-6

    def __post_init__(self):
        for name in ("q", "eps"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                raise TypeError(f"LqRetention.{name} must be a real number, got {getattr(self, name)!r}")
        if not self.q >= 1:
            raise ValueError(f"LqRetention.q must be >= 1, got {self.q}")
        if not self.eps > 0:
            raise ValueError(f"LqRetention.eps must be > 0, got {self.eps}")

    def weights(self, state: jax.Array) -> jax.Array:
        """``A / max(‖A‖_q, eps)^(q−2)`` for a leaf ``A [..., d_in, d_out]``."""
        power = jnp.sum(jnp.abs(state) ** self.q, axis=(-2, -1), keepdims=True)
        big = power > self.eps ** self.q
        norm = jnp.where(big, jnp.where(big, power, 1.0) ** (1.0 / self.q), self.eps)
        return state / norm ** (self.q - 2)


@dataclasses.dataclass(frozen=True)
class KLRetention:
    """Memora's KL retention (Miras eqs. 21 and 27): the state is logits ``P`` and the weights are
    ``W = c·softmax(P)`` over each matrix's input axis (``d_in``), non-negative with columns summing to c.

    Attributes:
      scale: c > 0, the mass of each column (the paper's constraint ``‖W‖₁ = c`` per slice).
    """

    scale: float = 1.0

    def __post_init__(self):
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool):
            raise TypeError(f"KLRetention.scale must be a real number, got {self.scale!r}")
        if not self.scale > 0:
            raise ValueError(f"KLRetention.scale must be > 0, got {self.scale}")

    def weights(self, state: jax.Array) -> jax.Array:
        """``c·softmax(P, axis=-2)`` for a leaf ``P [..., d_in, d_out]``."""
        return self.scale * jax.nn.softmax(state, axis=-2)


Retention = Union[L2Retention, LqRetention, KLRetention]
"""A retention gate: ``weights(state_leaf) -> weight_leaf``."""

OBJECTIVES = {"l2": L2Bias, "lp": LpBias, "huber": HuberBias}
"""Attentional bias names (defaults: ``LpBias(p=3)``)."""

RETENTIONS = {"l2": L2Retention, "lq": LqRetention, "kl": KLRetention}
"""Retention gate names (defaults: ``LqRetention(q=4)``, ``KLRetention(scale=1)``)."""

MIRAS_VARIANTS = {
    "titans": (L2Bias(), L2Retention()),
    "moneta": (LpBias(3.0), LqRetention(4.0)),
    "yaad": (HuberBias(), L2Retention()),
    "memora": (L2Bias(), KLRetention()),
}
"""Named (objective, retention) pairs: Titans' and the three Miras models of Section 5 (p = 3, q = 4 for Moneta)."""


def as_objective(objective: Union[str, Objective]) -> Objective:
    """An attentional bias from a name in ``OBJECTIVES`` or an instance."""
    if isinstance(objective, (L2Bias, LpBias, HuberBias)):
        return objective
    if isinstance(objective, str) and objective in OBJECTIVES:
        return OBJECTIVES[objective]()
    raise ValueError(f"objective must be one of {sorted(OBJECTIVES)} or an L2Bias/LpBias/HuberBias, "
                     f"got {objective!r}")


def as_retention(retention: Union[str, Retention]) -> Retention:
    """A retention gate from a name in ``RETENTIONS`` or an instance."""
    if isinstance(retention, (L2Retention, LqRetention, KLRetention)):
        return retention
    if isinstance(retention, str) and retention in RETENTIONS:
        return RETENTIONS[retention]()
    raise ValueError(f"retention must be one of {sorted(RETENTIONS)} or an L2Retention/LqRetention/KLRetention, "
                     f"got {retention!r}")


def miras_variant(name: str) -> tuple[Objective, Retention]:
    """``(objective, retention)`` of a named model in ``MIRAS_VARIANTS``: "titans", "moneta", "yaad", "memora"."""
    if name not in MIRAS_VARIANTS:
        raise ValueError(f"unknown Miras variant {name!r}; expected one of {sorted(MIRAS_VARIANTS)}")
    return MIRAS_VARIANTS[name]


__all__ = ["L2Bias", "LpBias", "HuberBias", "Objective", "L2Retention", "LqRetention", "KLRetention", "Retention",
           "OBJECTIVES", "RETENTIONS", "MIRAS_VARIANTS", "as_objective", "as_retention", "miras_variant"]
