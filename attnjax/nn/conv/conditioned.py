"""Conditioned channel attention as Flax NNX modules on NHWC feature maps (functional core:
``attnjax.vision.conditioned``).

``SentenceAttentionBlock`` gates the channels of an image feature map with a sentence embedding
(Khoshsirat & Kambhamettu, ICCV 2023); ``DomainConditionedAttention`` is DCAN's domain conditioned channel
attention (Li et al., AAAI 2020) and, with ``adaptive=True``, GDCAN's (Li et al., IEEE TPAMI 2021).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive, concrete_values, describe
from attnjax.nn.checks import check_features, check_image
from attnjax.nn.conv.squeeze_excite import linear_weights, reduced
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.conditioned import domain_conditioned_attention, domain_gap, sentence_attention, sentence_gate


class SentenceAttentionBlock(nnx.Module):
    """Sentence Attention Block: ``y = softmax_c(W₂ δ(LN(W₁ e + b₁)) + b₂) ⊙ x`` (Khoshsirat & Kambhamettu,
    "Sentence Attention Blocks for Answer Grounding", ICCV 2023).

    SE's channel recalibration (Hu et al. 2018) driven by a sentence (question) embedding: the excitation reads
    ``e`` instead of the squeezed image, expands it ``expansion``-fold, normalizes (LayerNorm), and a softmax
    over the ``C`` channels replaces SE's sigmoid, so the weights of one sample sum to 1. The layer sizes,
    LayerNorm (epsilon 1e-5) and softmax follow the official code (khoshsirat/embedding-attention-blocks,
    ``SentenceAttention``), the method section's text not being available to us.

    Example::

      sab = SentenceAttentionBlock(64, 384, rngs=nnx.Rngs(0))   # 384: all-MiniLM-L6-v2 embeddings
      y = sab(x, e)                                             # x, y: [B, H, W, 64]; e: [B, 384]

    Parameters: ``E·M + M`` (first layer, ``M = expansion·E``) ``+ 2M`` (LayerNorm) ``+ M·C + C``.

    Args:
      channels: ``C``, the channels of ``x``.
      embed_dim: ``E``, the width of the sentence embedding ``e``.
      expansion: ``M / E`` (4 in the official code).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the layers (flax defaults).
    """

    def __init__(self, channels: int, embed_dim: int, *, expansion: int = 4, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, embed_dim=embed_dim, expansion=expansion)
        self.channels, self.embed_dim = channels, embed_dim
        hidden = expansion * embed_dim
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hidden = nnx.Linear(embed_dim, hidden, **common)
        self.norm = nnx.LayerNorm(hidden, epsilon=1e-5, **common)
        self.gate_logits = nnx.Linear(hidden, channels, **common)

    def check(self, x: jax.Array, e: jax.Array) -> None:
        """``TypeError``/``ValueError`` naming the argument unless ``x [B, H, W, C]`` and ``e [B, E]`` fit."""
        check_image("x", x, self.channels)
        check_features("e", e)
        if e.ndim != 2 or e.shape != (x.shape[0], self.embed_dim):
            raise ValueError(f"e must have shape [batch, embed_dim] = [{x.shape[0]}, {self.embed_dim}] for x of "
                             f"shape {list(x.shape)}, got {list(e.shape)}")

    def weights(self, dtype) -> tuple:
        """``(W₁, b₁, LN scale, LN bias, W₂, b₂)`` cast to ``dtype``."""
        return (*linear_weights(self.hidden, dtype), self.norm.scale[...].astype(dtype),
                self.norm.bias[...].astype(dtype), *linear_weights(self.gate_logits, dtype))

    def gate(self, x: jax.Array, e: jax.Array) -> jax.Array:
        """The channel weights ``[B, 1, 1, C]`` (positive, summing to 1 over ``C``)."""
        self.check(x, e)
        return sentence_gate(e, *self.weights(e.dtype), self.norm.epsilon)

    def __call__(self, x: jax.Array, e: jax.Array) -> jax.Array:
        """``x [B, H, W, C], e [B, E] -> [B, H, W, C]``."""
        self.check(x, e)
        return sentence_attention(x, e, *self.weights(e.dtype), self.norm.epsilon)


class DomainConditionedAttention(nnx.Module):
    """Domain conditioned channel attention (DCAN, Li et al., AAAI 2020) with GDCAN's adaptive sharing (Li et al.,
    "Generalized Domain Conditioned Adaptation Network", IEEE TPAMI 2021).

    SE with one first excitation layer per domain and a shared second one::

        s = σ(W₂ δ(W₁ᵈ z + b₁ᵈ) + b₂),   z = mean_{h,w}(x),   y = s ⊙ x

    where ``d`` is the sample's domain (``W₁ˢ`` for source, ``W₁ᵗ`` for target). GDCAN (``adaptive=True``) decides
    per module and per batch whether the target gets its own branch: only when the domains' squeezed channel
    statistics differ, ``domain_gap(x, domain) = tanh(|r_s − r_t| / r_t) ≥ η`` with ``r = mean(z) / √(var(z) + ε)``
    over each domain's samples (``attnjax.vision.conditioned.domain_gap``); otherwise target samples use the
    source branch and the module is plain SE. The rule and ``η = 0.2`` follow the official code (BIT-DA/GDCAN,
    ``GDCCAModule``); the decision is a switch, not differentiated.

    Interface: ``module(x, domain)`` with ``domain`` an integer array ``[B]``, 0 for source and 1 for target
    samples (the official code concatenates a source half and a target half; any mix is accepted here).
    At test time on target data alone the statistic is undefined; then target samples use their own branch
    (as DCAN's test path), unless ``separate`` passes the decision to use, e.g. ``separate_domains`` recorded on
    a training batch (the official GDCAN keeps the last training decision).

    Example::

      attn = DomainConditionedAttention(256, rngs=nnx.Rngs(0))
      y = attn(jnp.concatenate([x_source, x_target]), jnp.array([0] * n + [1] * n))

    Parameters: ``3·C·(C/r)`` weights, plus ``2·(C/r) + C`` biases with ``use_bias``.

    Args:
      channels: ``C``, the channels of ``x``.
      reduction: ``r``; the bottleneck has ``max(1, C // r)`` units (16, as in the official code).
      adaptive: GDCAN's adaptive sharing (True) or DCAN's always separate branches (False).
      eta: GDCAN's threshold ``η`` on ``domain_gap`` (0.2, the official code's default).
      use_bias: biases in the excitation layers (the official code has them).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the three layers (flax defaults).
    """

    def __init__(self, channels: int, *, reduction: int = 16, adaptive: bool = True, eta: float = 0.2,
                 use_bias: bool = True, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        hidden = reduced(channels, reduction)
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0 <= eta <= 1:
            raise ValueError(f"eta must be a number in [0, 1] (a threshold on a tanh), got {describe(eta)}")
        self.channels, self.adaptive, self.eta = channels, adaptive, float(eta)
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.reduce_source = nnx.Linear(channels, hidden, **common)
        self.reduce_target = nnx.Linear(channels, hidden, **common)
        self.expand = nnx.Linear(hidden, channels, **common)

    def check(self, x: jax.Array, domain: jax.Array) -> None:
        """``TypeError``/``ValueError`` naming the argument unless ``x [B, H, W, C]`` and ``domain [B]`` in {0, 1}."""
        check_image("x", x, self.channels)
        dtype = getattr(domain, "dtype", None)
        if dtype is None or not (jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_):
            raise TypeError(f"domain must be an integer array [batch] (0 = source, 1 = target), got {describe(domain)}")
        if domain.shape != (x.shape[0],):
            raise ValueError(f"domain must have shape [batch] = [{x.shape[0]}] for x of shape {list(x.shape)}, "
                             f"got {list(domain.shape)}")
        values = concrete_values(domain)
        if values is not None and not np.isin(values, (0, 1)).all():
            raise ValueError(f"domain must hold 0 (source) or 1 (target), got values {sorted(set(values.tolist()))}")

    def separate_domains(self, x: jax.Array, domain: jax.Array) -> jax.Array:
        """GDCAN's decision, a bool scalar: ``domain_gap(x, domain) ≥ η``, or True when a domain is absent."""
        self.check(x, domain)
        both = jnp.logical_and(jnp.any(domain == 0), jnp.any(domain == 1))
        return jnp.logical_or(jnp.logical_not(both), domain_gap(x, domain) >= self.eta)

    def __call__(self, x: jax.Array, domain: jax.Array, *, separate: Optional[Union[bool, jax.Array]] = None
                 ) -> jax.Array:
        """``x [B, H, W, C], domain [B] -> [B, H, W, C]``.

        Args:
          separate: whether target samples use their own branch; None: always (``adaptive=False``) or GDCAN's
            decision on this batch (``separate_domains``).
        """
        self.check(x, domain)
        if separate is None:
            separate = self.separate_domains(x, domain) if self.adaptive else True
        return domain_conditioned_attention(x, domain, linear_weights(self.reduce_source, x.dtype),
                                            linear_weights(self.reduce_target, x.dtype),
                                            *linear_weights(self.expand, x.dtype), separate)


def sentence_example(key: jax.Array) -> tuple:
    """A feature map ``[2, 5, 6, 16]`` and sentence embeddings ``[2, 8]``."""
    kx, ke = jax.random.split(key)
    return jax.random.normal(kx, (2, 5, 6, 16)), jax.random.normal(ke, (2, 8))


def domain_example(key: jax.Array) -> tuple:
    """Two source and two target feature maps ``[4, 5, 6, 16]`` whose statistics differ (GDCAN separates them),
    and their domains ``[0, 0, 1, 1]``."""
    x = jax.random.normal(key, (4, 5, 6, 16))
    return x.at[2:].add(3.0), jnp.array([0, 0, 1, 1], jnp.int32)


register_module(ModuleSpec("sentence_attention", SentenceAttentionBlock, dict(channels=16, embed_dim=8),
                           sentence_example, kind="other", paper="Khoshsirat & Kambhamettu 2023 (ICCV)"))
register_module(ModuleSpec("gdcan", DomainConditionedAttention, dict(channels=16, reduction=4), domain_example,
                           kind="other", paper="Li et al. 2021 (GDCAN, IEEE TPAMI)"))
register_module(ModuleSpec("dcan", DomainConditionedAttention, dict(channels=16, reduction=4, adaptive=False),
                           domain_example, kind="other", paper="Li et al. 2020 (DCAN, AAAI)"))
