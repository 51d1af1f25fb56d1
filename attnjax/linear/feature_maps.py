"""Feature maps φ for linear attention: ``sim(q, k) = φ(q)·φ(k)``.

Each map takes ``x [..., D]`` and returns ``φ(x) [..., D']`` in float32. ``FEATURE_MAPS`` names them
for ``linear_attention(feature_map=...)``, which also accepts any such callable.

Two kinds, told apart by the attribute ``softmax_kernel`` (default False):

- plain maps (identity, elu+1, relu): ``scale`` multiplies the scores, ``scale·φ(q)·φ(k)``;
- softmax-kernel maps (Performer FAVOR+, BASED Taylor) approximate ``exp(scale·q·k)``: the caller
  multiplies q and k by ``√scale`` before the map, and the scores are ``φ(q)·φ(k)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar, Optional, Union

import jax
import jax.numpy as jnp


def identity(x: jax.Array) -> jax.Array:
    """φ(x) = x (Lightning Attention, Qin et al. 2024)."""
    return x.astype(jnp.float32)


def elu_plus_one(x: jax.Array) -> jax.Array:
    """φ(x) = elu(x) + 1 > 0 (Katharopoulos et al., "Transformers are RNNs", 2020)."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def relu(x: jax.Array) -> jax.Array:
    """φ(x) = max(x, 0)."""
    return jax.nn.relu(x.astype(jnp.float32))


def taylor(x: jax.Array) -> jax.Array:
    """BASED's 2nd-order Taylor map φ(x) = [1, x, x⊗x/√2], ``D' = 1 + D + D²``.

    ``φ(q)·φ(k) = 1 + q·k + (q·k)²/2 ≈ exp(q·k)`` (Arora et al., "Simple linear attention language
    models balance the recall-throughput tradeoff", 2024). With the default ``scale = 1/√D`` the
    inputs are pre-multiplied by ``D^(-1/4)``, as the zoology ``TaylorExp`` map does.
    """
    x = x.astype(jnp.float32)
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1) / math.sqrt(2.0)
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x, outer], axis=-1)


taylor.softmax_kernel = True


def orthogonal_random_features(key: jax.Array, num_features: int, dim: int) -> jax.Array:
    """Projection ``W [num_features, dim]`` of orthogonal random features (Performer, Sec. 2.4).

    Rows come in blocks of ``dim`` orthonormal vectors (Haar: QR of a Gaussian matrix with the signs
    of ``diag(R)`` folded into Q), each row rescaled
    by the norm of an independent ``N(0, I_dim)`` vector so that rows are marginally Gaussian.
    """
    if num_features <= 0 or dim <= 0:
        raise ValueError(f"num_features and dim must be positive, got {num_features}, {dim}")
    num_blocks = -(-num_features // dim)
    keys = jax.random.split(key)
    q, r = jnp.linalg.qr(jax.random.normal(keys[0], (num_blocks, dim, dim), jnp.float32))
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]     # Haar-distributed (sign fix)
    w = q.transpose(0, 2, 1).reshape(-1, dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(keys[1], (num_features, dim), jnp.float32), axis=-1)
    return w * norms[:, None]


def favor_plus(x: jax.Array, projection: jax.Array) -> jax.Array:
    """FAVOR+ positive random features φ(x) = exp(Wx − |x|²/2)/√m, ``W [m, D]``.

    ``E[φ(q)·φ(k)] = exp(q·k)`` (Choromanski et al., "Rethinking Attention with Performers", 2021).
    No max-stabilizer is subtracted, so the map stays exact for unnormalized attention; inputs of
    moderate norm (after the ``√scale`` pre-scaling) keep the exponent far from float32 overflow.
    """
    x = x.astype(jnp.float32)
    m = projection.shape[0]
    return jnp.exp(x @ projection.T.astype(jnp.float32) - 0.5 * jnp.sum(x * x, -1, keepdims=True)) / math.sqrt(m)


@dataclasses.dataclass(frozen=True)
class Performer:
    """FAVOR+ with a fixed projection: ``φ(x) = favor_plus(x, W)``.

    The projection is ``W = orthogonal_random_features(jax.random.PRNGKey(seed), m, D)``: fixed by
    ``seed`` and the head dim ``D``, so the same config gives the same features in every call, at
    train and decode time, on every device. Pass ``projection`` to use your own (e.g. redrawn) W.

    Args:
      num_features: ``m``; default ``max(D, round(D·ln D))``.
      seed: integer seed of the projection.
      projection: an explicit ``[m, D]`` projection (overrides ``num_features`` and ``seed``).
    """

    num_features: Optional[int] = None
    seed: int = 0
    projection: Optional[jax.Array] = dataclasses.field(default=None, hash=False, compare=False)

    softmax_kernel: ClassVar[bool] = True

    def weights(self, dim: int) -> jax.Array:
        """The ``[m, dim]`` projection used for head dim ``dim``."""
        if self.projection is not None:
            if self.projection.ndim != 2 or self.projection.shape[1] != dim:
                raise ValueError(f"Performer.projection has shape {self.projection.shape}, expected (m, {dim})")
            return self.projection
        m = self.num_features or max(dim, round(dim * math.log(dim)))
        return orthogonal_random_features(jax.random.PRNGKey(self.seed), m, dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        return favor_plus(x, self.weights(x.shape[-1]))


FeatureMap = Callable[[jax.Array], jax.Array]

FEATURE_MAPS: dict[str, FeatureMap] = {
    "identity": identity,
    "elu+1": elu_plus_one,
    "relu": relu,
    "performer": Performer(),
    "taylor": taylor,
}
"""Feature maps by name."""


def get_feature_map(feature_map: Union[str, FeatureMap]) -> FeatureMap:
    """A feature map from its name in ``FEATURE_MAPS`` or a callable ``x [..., D] -> φ(x) [..., D']``."""
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {sorted(FEATURE_MAPS)} "
                             "or a callable")
        return FEATURE_MAPS[feature_map]
    if not callable(feature_map):
        raise TypeError(f"feature_map must be a name or a callable, got {type(feature_map).__name__}")
    return feature_map


def is_softmax_kernel(feature_map: FeatureMap) -> bool:
    """Whether ``scale`` goes inside the map (``φ(√scale·x)``) rather than onto the scores."""
    return bool(getattr(feature_map, "softmax_kernel", False))


__all__ = ["identity", "elu_plus_one", "relu", "taylor", "favor_plus", "orthogonal_random_features",
           "Performer", "FEATURE_MAPS", "get_feature_map", "is_softmax_kernel"]
