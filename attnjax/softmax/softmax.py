"""Exact softmax attention: config, reference, and registry entry.

``out_i = Σ_j softmax_j(s_ij) v_j`` with ``s_ij = cap·tanh((scale·q_i·k_j + b_ij)/cap)`` over the
keys the mask allows (Vaswani et al., "Attention Is All You Need", 2017). Options: GQA/MQA,
K and V with different head counts (DiffQKV, Lin et al. 2025, "Sigma: Differential Rescaling of
Query, Key and Value for Efficient Language Models", Fig. 3: differentially compressed KV),
masks, an additive bias (array or ALiBi), a logit soft cap (Gemma 2), per-head sink logits (an
extra logit with no value, as in StreamingLLM / gpt-oss), attention dropout and the log-sum-exp. The fast path is ``flash_attention_xla`` (FlashAttention-2's algorithm in XLA).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.bias import as_bias
from attnjax.dropout import dropout_seed
from attnjax.masks import Mask
from attnjax.blocked.flash_xla import flash_attention_xla
from attnjax.blocked.scores import (allowed, dense_operands, dropout_multiplier, raw_logits, repeat_to_common_heads,
                                    score_spec, soft_cap, to_groups)
from pallas_kernels.flash.ops import flash_attention_pallas


def softmax_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None, dropout_rate: float = 0.0, rng: Optional[jax.Array] = None,
    return_lse: bool = False,
):
    """Naive softmax attention: the whole ``[B, H, T, S]`` logit matrix in float32.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hk, D]``; v: ``[B, S, Hv, Dv]`` with ``Hq % Hk == 0`` and
        ``Hq % Hv == 0``: query head ``h`` reads K head ``h // (Hq // Hk)`` and V head ``h // (Hq // Hv)``
        (when ``Hk != Hv`` both are repeated explicitly to ``lcm(Hk, Hv)`` heads first).
      mask: an ``attnjax.masks`` value; bias: array broadcastable to ``[B, Hq, T, S]`` or a Bias.
      scale: logit scale, default ``1/sqrt(D)``. logits_soft_cap: ``cap`` in ``cap·tanh(s/cap)``.
      sinks: ``[Hq]`` sink logits that join each row's normalizer with a zero value.
      dropout_rate, rng: attention-weight dropout (hash-based, see ``attnjax.dropout``).
      return_lse: also return the float32 log-sum-exp ``[B, T, Hq]`` (``-inf`` on empty rows).
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype, and ``lse`` if asked. A row with no allowed key is 0.
    """
    if k.shape[2] != v.shape[2]:
        k, v = repeat_to_common_heads(k, v)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    spec = score_spec(q, k, scale, logits_soft_cap, dropout_rate)
    qg, kt, vt, q_idx, kv_idx = dense_operands(q, k, v)

    s = soft_cap(raw_logits(qg, kt, q_idx, kv_idx, as_bias(bias), spec), logits_soft_cap)
    valid = allowed(mask, q_idx, kv_idx, spec)
    s = jnp.where(valid, s, -jnp.inf)
    if sinks is not None:
        sink = to_groups(jnp.asarray(sinks, jnp.float32)[None, :, None, None], Hkv)
        s = jnp.concatenate([s, jnp.broadcast_to(sink, s.shape[:-1] + (1,))], axis=-1)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    e = jnp.exp(s - row_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    lse = jnp.where(total > 0, row_max + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)[..., 0]
    if sinks is not None:
        p = p[..., :S]
    if dropout_rate > 0:
        p = p * dropout_multiplier(dropout_seed(rng), B, Hq, q_idx, kv_idx, spec)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", p, vt.astype(jnp.float32))
    out = out.reshape(B, Hq, T, -1).transpose(0, 2, 1, 3).astype(q.dtype)
    if return_lse:
        return out, lse.reshape(B, Hq, T).transpose(0, 2, 1)
    return out


@registry.register
@dataclasses.dataclass(frozen=True)
class Softmax:
    """Exact softmax attention.

    ``block_q``/``block_kv`` set the tile sizes of the ``xla`` path; the Pallas kernels pick
    their own per backend (``pallas_kernels.flash``).
    """

    block_q: int = 512
    block_kv: int = 512

    name: ClassVar[str] = "softmax"
    family: ClassVar[str] = "softmax"
    paper: ClassVar[str] = "Vaswani et al. 2017; FlashAttention-2 (Dao 2023)"
    supports: ClassVar[frozenset] = frozenset(registry.OPTIONS)
    decodes: ClassVar[bool] = True
    sequence_parallel: ClassVar[tuple] = ("ring", "allgather", "ulysses", "lasp2h")

    def implementations(self):
        return {
            "reference": softmax_attention_reference,
            "xla": functools.partial(flash_attention_xla, block_q=self.block_q, block_kv=self.block_kv),
            "pallas": flash_attention_pallas,
        }

