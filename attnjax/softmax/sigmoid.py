"""Sigmoid attention (FlashSigmoid): config, reference, fast paths and registry entry.

``out_i = Σ_j sigmoid(s_ij + b) v_j`` with ``s_ij = cap·tanh((scale·q_i·k_j + a_ij)/cap)`` over
the keys the mask allows, and no normalization over ``j`` (Ramapuram et al., "Theory, Analysis,
and Best Practices for Sigmoid Self-Attention", 2024, arXiv:2409.04431). The paper's default
``b = −log n`` (``n`` = number of keys) keeps the attention mass ``Σ_j sigmoid(s_ij + b) ≈ E[e^s]``
of order 1 at initialization whatever the length, so the output norm does not grow with ``n``.

Fast paths: the blocked XLA path and the Pallas flash kernels with ``weights.SigmoidWeight``
("the flash kernel variant with no running max"). Being unnormalized, sigmoid attention has no
sinks and no log-sum-exp. Any ``MultiHeadAttention(mechanism="sigmoid")`` uses it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.bias import as_bias
from attnjax.checks import check_scalar
from attnjax.dropout import dropout_seed
from attnjax.masks import Mask
from attnjax.blocked.flash_xla import flash_attention_xla
from attnjax.blocked.scores import allowed, dense_operands, dropout_multiplier, raw_logits, score_spec, soft_cap
from attnjax.blocked.weights import SigmoidWeight
from pallas_kernels.flash.ops import flash_attention_pallas


def default_bias(num_keys: int) -> float:
    """The paper's logit bias ``b = −log n`` for ``n`` keys."""
    return -math.log(num_keys)


def sigmoid_weight(k: jax.Array, sigmoid_bias: Optional[float]) -> SigmoidWeight:
    """The weight function for keys ``k [B, S, Hkv, D]``: ``b = sigmoid_bias`` or ``−log S``."""
    return SigmoidWeight(bias=default_bias(k.shape[1]) if sigmoid_bias is None else float(sigmoid_bias))


def check_unnormalized(name: str, sinks, return_lse: bool) -> None:
    """NotImplementedError for the options an unnormalized mechanism has no meaning for."""
    if sinks is not None:
        raise NotImplementedError(f"{name} attention has no row normalizer, so no sinks")
    if return_lse:
        raise NotImplementedError(f"{name} attention has no row normalizer, so no log-sum-exp to return")


def sigmoid_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None, dropout_rate: float = 0.0, rng: Optional[jax.Array] = None,
    return_lse: bool = False, sigmoid_bias: Optional[float] = None,
) -> jax.Array:
    """Naive sigmoid attention: the whole ``[B, H, T, S]`` weight matrix in float32.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` with ``Hq % Hkv == 0``.
      mask, bias, scale, logits_soft_cap, dropout_rate, rng: as in
        ``attnjax.softmax.softmax_attention_reference`` (``bias`` is the additive logit term).
      sinks, return_lse: not supported (NotImplementedError): there is no normalizer.
      sigmoid_bias: ``b`` in ``sigmoid(s + b)``; None = ``−log S``.
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype; ``out_i = Σ_j sigmoid(s_ij + b) v_j``.
    """
    check_unnormalized("sigmoid", sinks, return_lse)
    B, T, Hq, D = q.shape
    spec = score_spec(q, k, scale, logits_soft_cap, dropout_rate)
    b = sigmoid_weight(k, sigmoid_bias).bias
    qg, kt, vt, q_idx, kv_idx = dense_operands(q, k, v)
    s = soft_cap(raw_logits(qg, kt, q_idx, kv_idx, as_bias(bias), spec), logits_soft_cap)
    w = jnp.where(allowed(mask, q_idx, kv_idx, spec), jax.nn.sigmoid(s + b), 0.0)
    if dropout_rate > 0:
        w = w * dropout_multiplier(dropout_seed(rng), B, Hq, q_idx, kv_idx, spec)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", w, vt.astype(jnp.float32))
    return out.reshape(B, Hq, T, -1).transpose(0, 2, 1, 3).astype(q.dtype)


def sigmoid_attention_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None, dropout_rate: float = 0.0, rng: Optional[jax.Array] = None,
    return_lse: bool = False, sigmoid_bias: Optional[float] = None, block_q: int = 512, block_kv: int = 512,
) -> jax.Array:
    """Blocked sigmoid attention (``flash_attention_xla`` with ``SigmoidWeight``): O(T·tile) memory,
    no running max, custom VJP. Arguments and result as ``sigmoid_attention_reference``."""
    check_unnormalized("sigmoid", sinks, return_lse)
    return flash_attention_xla(q, k, v, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                               dropout_rate=dropout_rate, rng=rng, block_q=block_q, block_kv=block_kv,
                               weight_fn=sigmoid_weight(k, sigmoid_bias))


def sigmoid_attention_pallas(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None, dropout_rate: float = 0.0, rng: Optional[jax.Array] = None,
    return_lse: bool = False, sigmoid_bias: Optional[float] = None, block_q: Optional[int] = None,
    block_kv: Optional[int] = None, backend: Optional[str] = None, interpret: Optional[bool] = None,
) -> jax.Array:
    """FlashSigmoid: the Pallas flash kernels (``pallas_kernels.flash``) with ``SigmoidWeight``.

    Arguments and result as ``sigmoid_attention_reference``; ``block_q``, ``block_kv``,
    ``backend`` and ``interpret`` go to ``pallas_kernels.flash.flash_attention_pallas`` (on CPU the GPU
    kernel runs in interpret mode). Dropout raises NotImplementedError.
    """
    check_unnormalized("sigmoid", sinks, return_lse)
    return flash_attention_pallas(q, k, v, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                           dropout_rate=dropout_rate, rng=rng, block_q=block_q, block_kv=block_kv,
                           backend=backend, interpret=interpret, weight_fn=sigmoid_weight(k, sigmoid_bias))


@registry.register
@dataclasses.dataclass(frozen=True)
class Sigmoid:
    """Sigmoid attention: ``Σ_j sigmoid(s_ij + b) v_j``, unnormalized.

    ``bias`` is ``b``; None means ``−log n`` with ``n`` the number of keys of each call (the
    paper's default). ``block_q``/``block_kv`` set the tile sizes of the ``xla`` path.
    """

    bias: Optional[float] = None
    block_q: int = 512
    block_kv: int = 512

    def __post_init__(self):
        if self.bias is not None:
            check_scalar("Sigmoid.bias", self.bias)

    name: ClassVar[str] = "sigmoid"
    family: ClassVar[str] = "softmax"
    paper: ClassVar[str] = "Ramapuram et al. 2024 (FlashSigmoid)"
    supports: ClassVar[frozenset] = frozenset({"mask", "bias", "logits_soft_cap", "dropout", "gqa", "cross"})
    sequence_parallel: ClassVar[tuple] = ()

    @property
    def decodes(self) -> bool:
        """A fixed ``bias`` decodes from a KV cache; the default ``−log n`` changes with the cache length."""
        return self.bias is not None

    def implementations(self):
        return {
            "reference": functools.partial(sigmoid_attention_reference, sigmoid_bias=self.bias),
            "xla": functools.partial(sigmoid_attention_xla, sigmoid_bias=self.bias, block_q=self.block_q,
                                     block_kv=self.block_kv),
            "pallas": functools.partial(sigmoid_attention_pallas, sigmoid_bias=self.bias),
        }


__all__ = ["Sigmoid", "sigmoid_attention_reference", "sigmoid_attention_xla", "sigmoid_attention_pallas",
           "default_bias"]
