"""Softplus attention with a length scale and re-weighting: config, reference, fast paths, registry.

Gao & Spratling, "Softplus Attention with Re-weighting Boosts Length Extrapolation in Large
Language Models" (2025, arXiv:2501.13428). Softmax is split into a positive map and an
l1-normalization; the map becomes softplus, the logits get a length-dependent scale from
"invariance entropy", and a re-weighting raises the weights to a power ``p`` and renormalizes:

    λ_i    = log n_i / log n_train        (n_i: keys query i may see; n_train: training length)
    s_ij   = cap·tanh((λ_i·scale·q_i·k_j + a_ij)/cap)      (a: the optional additive bias)
    w_ij   = softplus(s_ij)^p / Σ_j softplus(s_ij)^p       (p = 1: l1-normalized softplus, "LSSA")
    out_i  = Σ_j w_ij v_j

``λ_i`` is row-dependent: under a causal mask ``n_i = i + 1`` (bottom-right aligned), so short
prefixes attend more uniformly and rows longer than the training length sharpen. ``p > 1``
sharpens the distribution (large weights gain, small ones lose), ``p = 1`` is plain LSSA.

Fast paths: ``λ_i`` is folded into the queries (``q_i ← λ_i q_i``, a constant factor, so autodiff
gives ``dq``), then the blocked XLA path / the Pallas flash kernels run with
``weights.SoftplusWeight(p)``, a softmax over ``u = p·log softplus(s)`` with a running max of
``u``: bf16 inputs and large ``p`` cannot overflow. No sinks and no log-sum-exp (the row
statistic is ``log Σ_j softplus(s_ij)^p``, not a log-sum-exp of the logits).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import registry
from attnjax.bias import as_bias
from attnjax.dropout import dropout_seed
from attnjax.checks import describe
from attnjax.masks import Mask, block_schedule
from attnjax.blocked.flash_xla import flash_attention_xla
from attnjax.blocked.scores import (allowed, dense_operands, dropout_multiplier, raw_logits, score_spec, soft_cap,
                                    to_groups)
from attnjax.softmax.sigmoid import check_unnormalized
from attnjax.blocked.weights import SoftplusWeight, softplus
from attnjax.tiling import num_tiles
from pallas_kernels.flash.ops import flash_attention_pallas

DEFAULT_TRAIN_LENGTH = 1024
"""``n_train`` of the default config; set it to the model's training context length."""


def visible_keys(mask: Optional[Mask], T: int, S: int, block: int = 512) -> jax.Array:
    """Number of keys each query row may see: int32 ``[Bm, Hm, T]`` (broadcastable to ``[B, Hq, T]``).

    Blocked over the mask's block schedule (O(T·block) memory): EMPTY tiles add nothing, FULL
    tiles add their key count, PARTIAL tiles count their allowed elements.
    """
    if mask is None:
        return jnp.full((1, 1, T), S, jnp.int32)
    bq, bk = min(block, T), min(block, S)
    codes, lo, hi = block_schedule(mask, T, S, bq, bk)
    lead = jax.eval_shape(lambda: mask.tile(jnp.arange(bq), jnp.arange(bk), T, S)).shape[:2]

    def q_tile(i):
        q_idx = i * bq + jnp.arange(bq)

        def partial(j, count):
            kv_idx = j * bk + jnp.arange(bk)
            ok = mask.tile(q_idx, kv_idx, T, S) & (kv_idx < S)
            return count + ok.sum(-1, dtype=jnp.int32)

        def full(j, count):
            return count + jnp.minimum(bk, S - j * bk).astype(jnp.int32)

        def body(j, count):
            return lax.switch(codes[i, j], [lambda c: c, lambda c: partial(j, c), lambda c: full(j, c)], count)

        return lax.fori_loop(lo[i], hi[i], body, jnp.zeros(lead + (bq,), jnp.int32))

    counts = lax.map(q_tile, jnp.arange(num_tiles(T, bq)))  # [nq, Bm, Hm, bq]
    return jnp.moveaxis(counts, 0, 2).reshape(lead + (-1,))[..., :T]


def length_scale(mask: Optional[Mask], T: int, S: int, train_length: Optional[int]) -> Optional[jax.Array]:
    """``λ_i = log n_i / log n_train`` as float32 ``[Bm, Hm, T]`` (0 on rows with ``n_i ≤ 1``);
    None when ``train_length`` is None (no length scale)."""
    if train_length is None:
        return None
    n = visible_keys(mask, T, S).astype(jnp.float32)
    return jnp.log(jnp.maximum(n, 1.0)) / math.log(train_length)


def _check_config(power: float, train_length: Optional[int]) -> None:
    if not power > 0:
        raise ValueError(f"softplus attention power must be positive, got {power}")
    if train_length is not None and (not isinstance(train_length, int) or train_length < 2):
        raise ValueError(f"train_length must be an int >= 2 or None, got {describe(train_length)}")


def softplus_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None, dropout_rate: float = 0.0, rng: Optional[jax.Array] = None,
    return_lse: bool = False, power: float = 1.0, train_length: Optional[int] = DEFAULT_TRAIN_LENGTH,
) -> jax.Array:
    """Naive softplus attention: the whole ``[B, H, T, S]`` weight matrix in float32.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` with ``Hq % Hkv == 0``.
      mask, bias, scale, logits_soft_cap, dropout_rate, rng: as in
        ``attnjax.softmax.softmax_attention_reference`` (the length scale multiplies
        ``scale·q·k``, not the additive ``bias``).
      sinks, return_lse: not supported (NotImplementedError).
      power: the re-weighting power ``p > 0``.
      train_length: ``n_train`` of the length scale ``log n_i / log n_train``; None = no scale.
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype, ``out_i = Σ_j softplus(s_ij)^p v_j / Σ_j softplus(s_ij)^p``
      (0 on rows with no allowed key).
    """
    check_unnormalized("softplus", sinks, return_lse)
    _check_config(power, train_length)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    spec = score_spec(q, k, scale, logits_soft_cap, dropout_rate)
    qg, kt, vt, q_idx, kv_idx = dense_operands(q, k, v)
    s = raw_logits(qg, kt, q_idx, kv_idx, None, spec)
    lam = length_scale(mask, T, S, train_length)
    if lam is not None:
        s = s * to_groups(lam[..., None], Hkv)
    if bias is not None:
        s = s + to_groups(as_bias(bias).tile(q_idx, kv_idx, T, S), Hkv)
    s = soft_cap(s, logits_soft_cap)
    valid = allowed(mask, q_idx, kv_idx, spec)
    sp = jnp.where(valid, softplus(jnp.where(valid, s, 0.0)), 0.0)
    top = lax.stop_gradient(jnp.max(sp, axis=-1, keepdims=True))  # the ratio is scale-free
    ratio = jnp.where(valid, sp / jnp.where(top > 0, top, 1.0), 1.0)  # 1 off the mask: no 0**p gradient
    a = jnp.where(valid, ratio ** power, 0.0)
    total = a.sum(-1, keepdims=True)
    w = a / jnp.where(total > 0, total, 1.0)
    if dropout_rate > 0:
        w = w * dropout_multiplier(dropout_seed(rng), B, Hq, q_idx, kv_idx, spec)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", w, vt.astype(jnp.float32))
    return out.reshape(B, Hq, T, -1).transpose(0, 2, 1, 3).astype(q.dtype)


def _length_scaled_queries(q: jax.Array, k: jax.Array, mask: Optional[Mask],
                           train_length: Optional[int]) -> jax.Array:
    """``q_i ← λ_i q_i`` (in float32, back to q's dtype); λ is a constant of the mask."""
    lam = length_scale(mask, q.shape[1], k.shape[1], train_length)
    if lam is None:
        return q
    lam = jnp.moveaxis(lam, 2, 1)[..., None]  # [Bm, T, Hm, 1]
    return (q.astype(jnp.float32) * lam).astype(q.dtype)


def softplus_attention_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None, dropout_rate: float = 0.0, rng: Optional[jax.Array] = None,
    return_lse: bool = False, power: float = 1.0, train_length: Optional[int] = DEFAULT_TRAIN_LENGTH,
    block_q: int = 512, block_kv: int = 512,
) -> jax.Array:
    """Blocked softplus attention (``flash_attention_xla`` with ``SoftplusWeight``): O(T·tile)
    memory, custom VJP. Arguments and result as ``softplus_attention_reference``."""
    check_unnormalized("softplus", sinks, return_lse)
    _check_config(power, train_length)
    return flash_attention_xla(_length_scaled_queries(q, k, mask, train_length), k, v, mask=mask, bias=bias,
                               scale=scale, logits_soft_cap=logits_soft_cap, dropout_rate=dropout_rate, rng=rng,
                               block_q=block_q, block_kv=block_kv, weight_fn=SoftplusWeight(power=float(power)))


def softplus_attention_pallas(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None, dropout_rate: float = 0.0, rng: Optional[jax.Array] = None,
    return_lse: bool = False, power: float = 1.0, train_length: Optional[int] = DEFAULT_TRAIN_LENGTH,
    block_q: Optional[int] = None, block_kv: Optional[int] = None, backend: Optional[str] = None,
    interpret: Optional[bool] = None,
) -> jax.Array:
    """Softplus attention by the Pallas flash kernels (``pallas_kernels.flash``) with ``SoftplusWeight``.

    Arguments and result as ``softplus_attention_reference``; ``block_q``, ``block_kv``,
    ``backend`` and ``interpret`` go to ``pallas_kernels.flash.flash_attention_pallas`` (on CPU the GPU
    kernel runs in interpret mode). Dropout raises NotImplementedError.
    """
    check_unnormalized("softplus", sinks, return_lse)
    _check_config(power, train_length)
    return flash_attention_pallas(_length_scaled_queries(q, k, mask, train_length), k, v, mask=mask, bias=bias,
                           scale=scale, logits_soft_cap=logits_soft_cap, dropout_rate=dropout_rate, rng=rng,
                           block_q=block_q, block_kv=block_kv, backend=backend, interpret=interpret,
                           weight_fn=SoftplusWeight(power=float(power)))


@registry.register
@dataclasses.dataclass(frozen=True)
class Softplus:
    """Softplus attention with the length scale and re-weighting power (LSSA/LSSAR).

    ``power`` is ``p`` (1 = no re-weighting); ``train_length`` is ``n_train`` in
    ``λ_i = log n_i / log n_train`` (None: no length scale). ``block_q``/``block_kv`` set the
    tile sizes of the ``xla`` path.
    """

    power: float = 1.0
    train_length: Optional[int] = DEFAULT_TRAIN_LENGTH
    block_q: int = 512
    block_kv: int = 512

    name: ClassVar[str] = "softplus"
    family: ClassVar[str] = "softmax"
    paper: ClassVar[str] = "Gao & Spratling 2025 (arXiv:2501.13428)"
    supports: ClassVar[frozenset] = frozenset({"mask", "bias", "logits_soft_cap", "dropout", "gqa", "cross"})
    decodes: ClassVar[bool] = True
    sequence_parallel: ClassVar[tuple] = ()

    def __post_init__(self):
        _check_config(self.power, self.train_length)

    def implementations(self):
        options = dict(power=self.power, train_length=self.train_length)
        return {
            "reference": functools.partial(softplus_attention_reference, **options),
            "xla": functools.partial(softplus_attention_xla, **options, block_q=self.block_q,
                                     block_kv=self.block_kv),
            "pallas": functools.partial(softplus_attention_pallas, **options),
        }


__all__ = ["Softplus", "softplus_attention_reference", "softplus_attention_xla", "softplus_attention_pallas",
           "visible_keys", "length_scale"]
