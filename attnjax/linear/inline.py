"""InLine: injective linear attention (Han et al., "Bridging the Divide: Reconsidering Softmax and Linear
Attention", NeurIPS 2024, §4.1, eq. 5).

Plain linear attention normalizes ``φ(q_i)·φ(k_j)`` by its row sum, which maps every rescaled query
``α q_i`` to the same weights (not injective). InLine subtracts the row mean instead and adds ``1/N``, so
the weights still sum to 1 but keep the query's scale::

    w_ij = σ/N · (φ(q_i)·φ(k_j) − mean_s φ(q_i)·φ(k_s)) + 1/N,        o_i = Σ_j w_ij v_j       (eq. 5)

over the ``N = S`` keys. The paper's eq. 5 leaves out the factor ``σ/N``; the official code
(LeapLabTHU/InLine, ``InLineAttention``) scales with ``σ = 1/√D`` and notes that ``σ/N`` is absorbed in
``φ(Q)``; it is written out here. The official default map is the identity (``kernel_func='identity'``).
In O(N), right product first (as the official code)::

    o_i = σ/N · φ(q_i)ᵀ(Σ_j φ(k_j) v_jᵀ) − σ · φ(q_i)·mean_j φ(k_j) · mean_j v_j + mean_j v_j

The paper's local residual (a 3×3 depth-wise convolution of V with kernels predicted from the window's mean
token) has parameters and lives in the module, ``attnjax.nn.vision.inline.InLineAttention``.

Implementations: ``reference`` (the ``[T, S]`` weights above), ``xla`` (the right product: O((T + S)·D·Dv)
time, O(H·D·Dv) state, no ``[T, S]`` array). Non-causal only (the paper is for vision); float32 inside,
the output takes q's dtype. ``InLine.chunk_attention`` runs the ``xla`` path on one chunk of a sequence split
over devices (``attnjax.linear.sequence_state``; one all-reduce of the key-side sums, LASP-2's
``attnjax.parallel.lasp2_mechanism``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional, Union

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.checks import check_qkv, check_scalar
from attnjax.dispatch import dispatch
from attnjax.linear.feature_maps import FeatureMap, get_feature_map, is_softmax_kernel
from attnjax.linear.sequence_state import WHOLE, StateExchange


def inline_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                               feature_map: Union[str, FeatureMap] = "identity",
                               scale: Optional[float] = None) -> jax.Array:
    """InLine attention from its ``[T, S]`` weights (eq. 5 with the official ``σ/N``).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``.
      feature_map: φ, a name in ``feature_maps.FEATURE_MAPS`` or a callable ``[..., D] -> [..., D']`` (not a
        softmax-kernel map such as "performer" or "taylor": the scale here multiplies the scores).
      scale: ``σ``, default ``1/√D``.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype; ``w_ij = σ/S·(φ(q_i)·φ(k_j) − mean_s φ(q_i)·φ(k_s)) + 1/S``.
    """
    phi, scale = _check(q, k, v, feature_map, scale)
    G, S = q.shape[2] // k.shape[2], k.shape[1]
    fq, fk = phi(q).astype(jnp.float32), jnp.repeat(phi(k).astype(jnp.float32), G, axis=2)
    scores = jnp.einsum("bthf,bshf->bhts", fq, fk)
    weights = scale / S * (scores - scores.mean(axis=-1, keepdims=True)) + 1.0 / S
    out = jnp.einsum("bhts,bshe->bthe", weights, jnp.repeat(v.astype(jnp.float32), G, axis=2))
    return out.astype(q.dtype)


def inline_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, feature_map: Union[str, FeatureMap] = "identity",
                     scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """InLine attention in O(N): ``σ/N·φ(Q)(φ(K)ᵀV) − σ·(φ(Q)·k̄) v̄ + v̄`` with the means ``k̄``, ``v̄`` over keys.

    Args:
      q, k, v, feature_map, scale: as in ``inline_attention_reference`` (GQA: query head ``h`` reads K/V head
        ``h // (Hq // Hkv)``).
      implementation: "reference", "xla" or "auto" (xla).
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    phi, sigma = _check(q, k, v, feature_map, scale)

    def xla():
        return _chunk(q, k, v, phi, sigma, WHOLE)

    paths = {"reference": lambda: inline_attention_reference(q, k, v, feature_map=feature_map, scale=scale),
             "xla": xla}
    return dispatch(paths, implementation, what="inline attention").astype(q.dtype)


def _chunk(q, k, v, phi, sigma: float, exchange: StateExchange) -> jax.Array:
    """The right product on chunk ``t`` of ``exchange.world``: one ``exchange.total`` of the key-side sums
    ``(Σ φ(k_j) v_jᵀ, Σ φ(k_j), Σ v_j)`` (``[B, Hkv, F, Dv]``, ``[B, Hkv, F]``, ``[B, Hkv, Dv]``) over all ``N``
    keys, then every query of the chunk; ``[B, T, Hq, Dv]`` float32."""
    B, T, Hq, _ = q.shape
    Hkv = k.shape[2]
    N = k.shape[1] * exchange.world
    fq = phi(q).astype(jnp.float32)
    fq = fq.reshape(B, T, Hkv, Hq // Hkv, fq.shape[-1])
    fk, vf = phi(k).astype(jnp.float32), v.astype(jnp.float32)
    kv, k_sum, v_sum = exchange.total((jnp.einsum("bshf,bshe->bhfe", fk, vf), fk.sum(axis=1), vf.sum(axis=1)))
    k_mean, v_mean = k_sum / N, v_sum / N                                            # [B, Hkv, F], [B, Hkv, Dv]
    out = (jnp.einsum("bthgf,bhfe->bthge", fq, kv * (sigma / N))
           + (1.0 - sigma * jnp.einsum("bthgf,bhf->bthg", fq, k_mean))[..., None] * v_mean[:, None, :, None])
    return out.reshape(B, T, Hq, -1)


def _check(q, k, v, feature_map, scale):
    """Validate; returns ``(φ, σ)``."""
    check_qkv(q, k, v)
    phi = get_feature_map(feature_map)
    if is_softmax_kernel(phi):
        raise ValueError(f"InLine takes a plain feature map (identity, relu, elu+1 or a callable); {feature_map!r} "
                         "is a softmax-kernel map, whose scale goes inside the map")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_scalar("scale", scale)
    return phi, scale


@registry.register
@dataclasses.dataclass(frozen=True)
class InLine:
    """InLine attention as a registered mechanism: non-causal (no mask), GQA, cross (``N = S`` keys)."""

    feature_map: Union[str, FeatureMap] = "identity"

    name: ClassVar[str] = "inline"
    family: ClassVar[str] = "linear"
    paper: ClassVar[str] = "Han et al. 2024, Bridging the Divide: Reconsidering Softmax and Linear Attention"
    supports: ClassVar[frozenset] = frozenset({"gqa", "cross"})
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ("lasp2",)

    def implementations(self):
        return {name: functools.partial(_registered, self, name) for name in ("reference", "xla")}

    def chunk_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, *, exchange: StateExchange,
                        causal: bool = False, scale: Optional[float] = None) -> jax.Array:
        """The linear-state interface (``attnjax.linear.sequence_state``): this chunk's rows of
        ``inline_attention`` over the sequence split as ``exchange`` says.

        Args:
          q: chunk ``[B, C, Hq, D]``; k: ``[B, C', Hkv, D]``; v: ``[B, C', Hkv, Dv]``; ``N = C'·W`` keys in all.
          exchange: the ``StateExchange``; causal: must be False (InLine is non-causal); scale: ``σ``.
        Returns:
          ``[B, C, Hq, Dv]`` in q's dtype; one ``total`` of ``[B, Hkv, F·Dv + F + Dv]`` floats.
        """
        if causal:
            raise NotImplementedError("InLine attention is non-causal (its mean correction spans every key); "
                                      "pass causal=False")
        phi, sigma = _check(q, k, v, self.feature_map, scale)
        return _chunk(q, k, v, phi, sigma, exchange).astype(q.dtype)


def _registered(config: InLine, implementation: str, q, k, v, *, scale=None) -> jax.Array:
    """``attnjax.attention`` signature for ``InLine``."""
    return inline_attention(q, k, v, feature_map=config.feature_map, scale=scale, implementation=implementation)


__all__ = ["inline_attention_reference", "inline_attention", "InLine"]
