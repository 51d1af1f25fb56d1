"""Attention dropout from a counter-based hash of (seed, batch, head, query, key).

The keep decision for one attention weight depends only on its coordinates, never on how the
computation is tiled, so a blocked forward pass, its recomputing backward pass and the dense
reference all drop exactly the same weights for the same ``rng``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijective avalanche mix of uint32 values."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_seed(rng: jax.Array) -> jax.Array:
    """Two uint32 words drawn from a PRNG key (raw or typed)."""
    return jax.random.bits(rng, (2,), jnp.uint32)


def keep_mask(seed: jax.Array, batch_idx: jax.Array, head_idx: jax.Array,
              q_idx: jax.Array, kv_idx: jax.Array, rate: float) -> jax.Array:
    """Keep decisions ``[B', H', tq, tk]`` for the given index vectors; P(keep) = 1 - rate."""
    u = lambda x: jnp.asarray(x).astype(jnp.uint32)
    bh = _fmix32(u(batch_idx)[:, None] * jnp.uint32(0x9E3779B9) + u(head_idx)[None, :] + seed[0])
    qh = _fmix32(u(q_idx) * jnp.uint32(0x27D4EB2F) + seed[1])
    kh = u(kv_idx) * jnp.uint32(0x165667B1)
    x = _fmix32(_fmix32(bh[:, :, None, None] ^ qh[None, None, :, None]) ^ kh[None, None, None, :])
    threshold = jnp.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
    return x >= threshold
