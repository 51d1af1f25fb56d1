"""Stick-breaking tile math shared by the blocked XLA path and the Pallas kernels.

Tan et al., "Scaling Stick-Breaking Attention" (ICLR 2025). The right-to-left walk over key
tiles (``forward_tile``/``backward_tile``), the remainder term, the strict-causality tile codes and
the request check live here, with the kernels, so that ``attnjax.softmax.stick_breaking`` (the
family) and ``pallas_kernels.stick_breaking`` (the kernels) import them from one floor below both.
The math is derived in ``attnjax.softmax.stick_breaking``'s module docstring.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax import masks
from attnjax.masks import FULL, PARTIAL, Mask



def implies_causal(mask: Optional[Mask]) -> bool:
    """Whether every pair ``mask`` allows has key position ≤ query position (decided statically)."""
    if isinstance(mask, (masks.Causal, masks.ChunkedCausal)):
        return True
    if isinstance(mask, masks.SlidingWindow):
        return mask.right == 0
    if isinstance(mask, masks.And):
        return implies_causal(mask.a) or implies_causal(mask.b)
    if isinstance(mask, masks.Or):
        return implies_causal(mask.a) and implies_causal(mask.b)
    return False


def check_request(q: jax.Array, k: jax.Array, *, mask, sinks, dropout_rate: float, return_lse: bool) -> None:
    """Refuse what stick-breaking attention does not define.

    Raises:
      NotImplementedError: a mask that does not imply causality (including ``None``), sinks,
        dropout, ``return_lse`` (there is no normalizer).
      ValueError: ``T > S`` (a query row would have no position and no own value).
    """
    if not implies_causal(mask):
        raise NotImplementedError(
            f"stick-breaking attention is causal only, got mask={mask!r}: pass mask=masks.Causal() (or "
            "SlidingWindow(left, 0) / ChunkedCausal(c), optionally & another mask such as Segments)")
    if sinks is not None:
        raise NotImplementedError("stick-breaking attention has no normalizer, so no sinks")
    if dropout_rate > 0:
        raise NotImplementedError("stick-breaking attention has no attention dropout")
    if return_lse:
        raise NotImplementedError("stick-breaking attention has no log-sum-exp; use return_remainder=True for "
                                  "the un-allocated stick")
    T, S = q.shape[1], k.shape[1]
    if T > S:
        raise ValueError(f"stick-breaking attention needs T <= S (queries are the last T of S positions), got "
                         f"q {q.shape}, k {k.shape}")


def softplus(x: jax.Array) -> jax.Array:
    """``log(1 + e^x)`` computed stably; elementwise ops that lower in XLA, Triton and Mosaic."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def own_key_allowed(mask: Optional[Mask], T: int, S: int) -> jax.Array:
    """Whether the mask allows each query its own position ``i + S − T``: bool ``[Bm, T, Hm]``.

    The remainder goes to the current token only where the mask allows it, so a row with no
    allowed key outputs 0, as in every other mechanism. O(T) mask evaluations, no ``[T, S]`` array.
    """
    if mask is None:
        return jnp.ones((1, T, 1), bool)
    rows = jnp.arange(T)
    diag = jax.vmap(lambda i: mask.tile(i[None], masks.query_positions(i[None], T, S), T, S)[..., 0, 0])(rows)
    return jnp.moveaxis(diag, 0, 1)  # [T, Bm, Hm] -> [Bm, T, Hm]


def with_remainder(o: jax.Array, row_softplus: jax.Array, v: jax.Array, mask: Optional[Mask],
                   dtype) -> tuple[jax.Array, jax.Array]:
    """``out_i = o_i + r_i v_{i+S−T}`` with ``r_i = exp(−row_softplus_i)``, the un-allocated stick,
    where the mask allows query ``i`` its own position (``own_key_allowed``); ``r_i = 0`` elsewhere.

    Args:
      o: ``[B, T, Hq, Dv]`` float32, ``Σ_j A_ij v_j``; row_softplus: ``[B, T, Hq]`` float32,
        ``Σ_k softplus(z_ik)`` over the row's keys; v: ``[B, S, Hkv, Dv]``; mask: the request's
        mask (None: none); dtype: output dtype.
    Returns:
      ``(out [B, T, Hq, Dv] in dtype, r [B, T, Hq] float32)``. K/V are not repeated for GQA.
    """
    B, T, Hq, Dv = o.shape
    S, Hkv = v.shape[1], v.shape[2]
    r = jnp.where(own_key_allowed(mask, T, S), jnp.exp(-row_softplus), 0.0)
    own = v[:, S - T:].astype(jnp.float32)[:, :, :, None, :]  # [B, T, Hkv, 1, Dv]
    out = o.reshape(B, T, Hkv, Hq // Hkv, Dv) + r.reshape(B, T, Hkv, Hq // Hkv, 1) * own
    return out.reshape(B, T, Hq, Dv).astype(dtype), r


def strict_codes(codes: jax.Array, T: int, S: int, block_q: int, block_kv: int) -> jax.Array:
    """``block_schedule`` codes with FULL lowered to PARTIAL on tiles that hold a diagonal pair.

    A causal mask's FULL tiles may contain ``key position == query position``, which
    stick-breaking excludes, so those tiles need the element mask.
    """
    nq, nk = codes.shape
    first_q = np.arange(nq)[:, None] * block_q + (S - T)
    last_k = np.minimum(np.arange(nk) * block_kv + block_kv, S)[None, :] - 1
    return jnp.where((codes == FULL) & jnp.asarray(last_k >= first_q), PARTIAL, codes)


def strictly_earlier(q_idx: jax.Array, kv_idx: jax.Array, T: int, S: int) -> jax.Array:
    """``key position < query position`` as ``[tq, tk]``."""
    return kv_idx[None, :] < masks.query_positions(q_idx, T, S)[:, None]


def masked_zero(x: jax.Array, ok: Optional[jax.Array]) -> jax.Array:
    """``x`` where ``ok`` allows, 0 elsewhere (``ok=None``: all allowed)."""
    return x if ok is None else jnp.where(ok, x, 0.0)


def xla_reverse_cumsum(x: jax.Array) -> jax.Array:
    """``y_j = Σ_{k≥j} x_k`` along the last axis."""
    return lax.cumsum(x, axis=x.ndim - 1, reverse=True)


def forward_tile(z: jax.Array, c: jax.Array, ok: Optional[jax.Array], reverse_cumsum=xla_reverse_cumsum):
    """One key tile of the right-to-left walk (module docstring), float32.

    Args:
      z: logits ``[..., tq, tk]``; c: ``[..., tq, 1]``, Σ softplus(z) of the keys right of the tile;
      ok: allowed pairs (None: all); reverse_cumsum: a backend's ``Σ_{k≥j}`` along the last axis.
    Returns:
      ``A = exp(z − c − Σ_{k≥j in tile} softplus(z_k))`` (0 where not allowed) and the carry for
      the next tile on the left, ``c + Σ_tile softplus(z)``.
    """
    sp = masked_zero(softplus(z), ok)
    a = masked_zero(jnp.exp(z - (c + reverse_cumsum(sp))), ok)
    return a, c + jnp.sum(sp, axis=-1, keepdims=True)


def backward_tile(z: jax.Array, da: jax.Array, c: jax.Array, s: jax.Array, dterm: jax.Array,
                  ok: Optional[jax.Array], reverse_cumsum=xla_reverse_cumsum):
    """The backward's step on one key tile (module docstring), float32.

    Args:
      z, c, ok, reverse_cumsum: as in ``forward_tile``; da: ``dO·vᵀ`` ``[..., tq, tk]``;
      s: ``[..., tq, 1]``, Σ A⊙dA of the keys right of the tile; dterm: ``[..., tq, 1]``, ``δ − dc``.
    Returns:
      ``(A, dZ, c_next, s_next)`` with ``dZ = A⊙dA − σ(z)⊙(dterm − Σ_{k>j} A⊙dA)``.
    """
    sp = masked_zero(softplus(z), ok)
    a = masked_zero(jnp.exp(z - (c + reverse_cumsum(sp))), ok)
    ada = a * da
    later = s + reverse_cumsum(ada) - ada
    dz = ada - masked_zero(jax.nn.sigmoid(z), ok) * (dterm - later)
    return a, dz, c + jnp.sum(sp, axis=-1, keepdims=True), s + jnp.sum(ada, axis=-1, keepdims=True)
