"""Conditioned channel attention: channel gates on a feature map that depend on a second input.

* Sentence Attention Block (Khoshsirat & Kambhamettu, "Sentence Attention Blocks for Answer Grounding",
  ICCV 2023): an SE-style channel gate computed from a sentence embedding ``e`` instead of the
  squeezed image, ``s = softmax_c(W₂ δ(LN(W₁ e + b₁)) + b₂)``, ``y = s ⊙ x`` per channel.
* Domain conditioned channel attention (Li et al., "Domain Conditioned Adaptation Network", AAAI 2020;
  "Generalized Domain Conditioned Adaptation Network", IEEE TPAMI 2021): SE (Hu et al. 2018) with a separate
  first excitation layer per domain and a shared second one, ``s_d = σ(W₂ δ(W₁ᵈ z + b₁ᵈ) + b₂)``; GDCAN shares
  the first layer too when the domains' squeezed channel statistics are close (``domain_gap < η``).
  The formulas follow the official code (BIT-DA/GDCAN).

Shapes: ``x [B, H, W, C]`` (NHWC), ``e [B, E]``, ``domain [B]`` with 0 = source, 1 = target.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from attnjax.vision.squeeze_excite import channel_gate

GAP_EPSILON = 1e-5
"""The epsilon under the square root of GDCAN's domain statistic (the official code's)."""


def layer_norm(x: jax.Array, scale: Optional[jax.Array], bias: Optional[jax.Array], epsilon: float) -> jax.Array:
    """``(x − mean) / √(var + ε) · scale + bias`` over the last axis (statistics in float32)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)
    if scale is not None:
        y = y * scale
    return y if bias is None else y + bias


def sentence_gate(e: jax.Array, w1: jax.Array, b1: jax.Array, scale: jax.Array, bias: jax.Array, w2: jax.Array,
                  b2: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """The Sentence Attention Block's channel weights ``s = softmax_c(W₂ δ(LN(W₁ e + b₁)) + b₂)``.

    Khoshsirat & Kambhamettu (ICCV 2023) start from SE's excitation and change it: its input is the
    sentence embedding (not the squeezed image), the first layer expands (×4) instead of reducing, a
    LayerNorm follows it, and a softmax over channels replaces the sigmoid; as in the official code
    (khoshsirat/embedding-attention-blocks, ``SentenceAttention``).

    Args:
      e: ``[B, E]``, the sentence embedding.
      w1, b1: ``[E, M]``, ``[M]``; scale, bias: ``[M]`` (the LayerNorm); w2, b2: ``[M, C]``, ``[C]``.
      epsilon: the LayerNorm's epsilon (PyTorch's default 1e-5, as the official code).

    Returns:
      ``s [B, 1, 1, C]``, positive, summing to 1 over the channels (softmax in float32).
    """
    h = jax.nn.relu(layer_norm(e @ w1 + b1, scale, bias, epsilon))
    logits = (h @ w2 + b2).astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1).astype(e.dtype)[:, None, None, :]


def sentence_attention(x: jax.Array, e: jax.Array, w1: jax.Array, b1: jax.Array, scale: jax.Array,
                       bias: jax.Array, w2: jax.Array, b2: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """Sentence Attention Block: ``y = sentence_gate(e) ⊙ x`` per channel. ``x [B, H, W, C], e [B, E] -> [B, H, W, C]``."""
    return x * sentence_gate(e, w1, b1, scale, bias, w2, b2, epsilon).astype(x.dtype)


def domain_gap(x: jax.Array, domain: jax.Array) -> jax.Array:
    """GDCAN's statistic for sharing the excitation: ``tanh(|r_s − r_t| / r_t)``, ``r = mean(z) / √(var(z) + ε)``.

    ``z = mean_{h,w}(x)`` are the squeezed channel activations; ``mean`` and ``var`` (unbiased) run over all
    channels of all samples of one domain: ``r_s`` over the source samples, ``r_t`` over the target ones.
    This is the official code's criterion (BIT-DA/GDCAN, ``GDCCAModule``), including the signed ``r_t`` in the
    denominator (Li et al., TPAMI 2021: "automatically determine whether domain channel activations should be
    separately modeled ... according to the domain statistic gaps").

    Args:
      x: ``[B, H, W, C]``; domain: ``[B]``, 0 for source samples, 1 for target ones.

    Returns:
      a float32 scalar; NaN when a domain has no sample in the batch.
    """
    z = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)

    def ratio(member: jax.Array) -> jax.Array:
        weight = jnp.broadcast_to(member[:, None], z.shape).astype(jnp.float32)
        n = jnp.sum(weight)
        mean = jnp.sum(z * weight) / n
        var = jnp.sum(jnp.square(z - mean) * weight) / (n - 1)
        return mean / jnp.sqrt(var + GAP_EPSILON)

    source, target = ratio(domain == 0), ratio(domain == 1)
    return jnp.tanh(jnp.abs(source - target) / target)


def domain_conditioned_attention(x: jax.Array, domain: jax.Array, source: tuple, target: tuple, w2: jax.Array,
                                 b2: Optional[jax.Array], separate: Union[bool, jax.Array] = True) -> jax.Array:
    """Domain conditioned channel attention: ``y = σ(W₂ δ(W₁ᵈ z + b₁ᵈ) + b₂) ⊙ x`` with ``d`` the sample's domain.

    DCAN (Li et al., AAAI 2020): source samples use the source branch ``W₁ˢ``, target samples ``W₁ᵗ``, and
    ``W₂`` is shared. GDCAN (TPAMI 2021): with ``separate`` False the target samples use the source branch too
    (the whole excitation is shared, plain SE). Each branch is SE's excitation (``channel_gate``).

    Args:
      x: ``[B, H, W, C]``; domain: ``[B]`` integers, 0 = source, 1 = target.
      source, target: ``(W₁ [C, C/r], b₁ [C/r] or None)`` of each domain.
      w2, b2: ``[C/r, C]``, ``[C]`` or None, shared.
      separate: whether target samples use their own branch: a bool or a traced bool scalar.

    Returns:
      ``[B, H, W, C]``.
    """
    gate_source = channel_gate(x, *source, w2, b2)
    gate_target = channel_gate(x, *target, w2, b2)
    use_target = jnp.logical_and(domain == 1, separate)[:, None, None, None]
    return x * jnp.where(use_target, gate_target, gate_source)


__all__ = ["GAP_EPSILON", "layer_norm", "sentence_gate", "sentence_attention", "domain_gap",
           "domain_conditioned_attention"]
