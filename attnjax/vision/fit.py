"""FIT's grouped attention: tokens split into contiguous groups, attention only inside a group.

Chen & Li, "FIT: Far-reaching Interleaved Transformers", arXiv 2305.12689, 2023, sec. 2: the ``L`` data tokens
are divided into ``G`` groups of ``n = L/G`` tokens, and each group owns ``m`` latent tokens. Local layers run
self-attention among the data tokens of one group; global layers run self-attention among all ``G·m`` latents;
cross-attention moves information between the data tokens and the latents *of the same group* (data → latent:
latents read their group's data tokens; latent → data: data tokens read their group's latents). Each of the
three grouped patterns is one call of ``grouped_attention``: queries of group ``g`` attend to keys of group ``g``
only. The global layers are plain attention over the latents (``attnjax.attention``).

Layout: token sets ``[B, T, heads, D]`` as ``attnjax.attention`` takes them, grouped contiguously: token ``t``
of a ``T``-token set is in group ``t // (T/G)``. For images, fold spatial patches into contiguous groups first
(e.g. ``attnjax.vision.window.window_partition``), as the official code's ``[b, t, n, c]`` input does.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.api import attention
from attnjax.checks import check_positive, describe


def check_groups(name: str, tokens: int, num_groups: int) -> int:
    """The group size ``tokens / num_groups``; ``ValueError`` naming ``name`` unless it divides evenly.

    FIT groups need equal sizes (the official code raises for ``x_size % num_groups != 0``).
    """
    check_positive(num_groups=num_groups)
    if tokens % num_groups:
        raise ValueError(f"{name} has {tokens} tokens, not a multiple of num_groups={num_groups} "
                         "(FIT splits a token set into equal groups)")
    return tokens // num_groups


def group_tokens(x: jax.Array, num_groups: int) -> jax.Array:
    """Fold the groups into the batch: ``[B, T, ...] -> [B·G, T/G, ...]``; group ``g`` of ``b`` is row ``b·G + g``."""
    if getattr(x, "ndim", 0) < 2:
        raise ValueError(f"x must have shape [batch, tokens, ...], got {describe(x)}")
    n = check_groups("x", x.shape[1], num_groups)
    return x.reshape(x.shape[0] * num_groups, n, *x.shape[2:])


def ungroup_tokens(x: jax.Array, num_groups: int) -> jax.Array:
    """The inverse of ``group_tokens``: ``[B·G, n, ...] -> [B, G·n, ...]``."""
    if getattr(x, "ndim", 0) < 2 or x.shape[0] % num_groups:
        raise ValueError(f"x must have shape [batch·{num_groups}, tokens, ...], got {describe(x)}")
    return x.reshape(x.shape[0] // num_groups, num_groups * x.shape[1], *x.shape[2:])


def check_grouped_qkv(q: jax.Array, k: jax.Array, v: jax.Array, num_groups: int) -> None:
    """``ValueError`` unless q ``[B, T, Hq, D]``, k ``[B, S, Hkv, D]``, v ``[B, S, Hkv, Dv]`` split into
    ``num_groups`` equal groups."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if getattr(a, "ndim", None) != 4:
            raise ValueError(f"{name} must have shape [batch, tokens, heads, head_dim], got {describe(a)}")
    check_groups("q", q.shape[1], num_groups)
    check_groups("k", k.shape[1], num_groups)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_groups: int, *, scale: Optional[float] = None,
                      implementation: str = "auto") -> jax.Array:
    """Softmax attention within groups: query group ``g`` attends to key group ``g`` only (FIT, sec. 2).

    ``out[b, t] = Σ_{s: g(s) = g(t)} softmax_s(scale·q[b, t]·k[b, s]) v[b, s]`` with ``g(t) = t // (T/G)`` for
    queries and ``g(s) = s // (S/G)`` for keys. With q, k, v from the data tokens this is FIT's local
    self-attention; with q from the latents ``[B, G·m, ...]`` and k, v from the data tokens it is the data → latent
    cross-attention; swapped, the latent → data cross-attention.

    Fast path: the groups are folded into the batch and attended with ``attnjax.attention``; the logits of one
    call are ``[B·G, heads, T/G, S/G]`` (``B·heads·T·S/G`` entries, at most), never the dense ``[T, S]``, and the
    "xla" path tiles even those.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``T`` and ``S`` multiples of
        ``num_groups``; GQA as ``attnjax.attention``.
      num_groups: ``G``.
      scale: logit scale, default ``1/√D``.
      implementation: as ``attnjax.attention``.

    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    check_grouped_qkv(q, k, v, num_groups)
    out = attention(group_tokens(q, num_groups), group_tokens(k, num_groups), group_tokens(v, num_groups),
                    scale=scale, implementation=implementation)
    return ungroup_tokens(out, num_groups)


def group_mask(queries: int, keys: int, num_groups: int) -> np.ndarray:
    """``bool [T, S]``: True where query ``t`` and key ``s`` are in the same group (block diagonal)."""
    q_group = np.arange(queries) // check_groups("q", queries, num_groups)
    k_group = np.arange(keys) // check_groups("k", keys, num_groups)
    return q_group[:, None] == k_group[None, :]


def grouped_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, num_groups: int, *,
                                scale: Optional[float] = None) -> jax.Array:
    """``grouped_attention`` as one dense masked softmax over all ``T × S`` pairs (``group_mask``), float32.

    Memory: the ``[B, Hq, T, S]`` logits. For tests and small inputs.
    """
    check_grouped_qkv(q, k, v, num_groups)
    T, Hq, D = q.shape[1:]
    S, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    kr, vr = (jnp.repeat(a.astype(jnp.float32), Hq // Hkv, axis=2) for a in (k, v))
    logits = scale * jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kr, precision="highest")
    logits = jnp.where(group_mask(T, S, num_groups), logits, -jnp.inf)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), vr, precision="highest")
    return out.astype(q.dtype)


__all__ = ["check_groups", "group_tokens", "ungroup_tokens", "grouped_attention", "group_mask",
           "grouped_attention_reference"]
