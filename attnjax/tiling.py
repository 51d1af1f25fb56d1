"""Small helpers shared by every blocked (tiled) path: tile counts, padding, tile gathers."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_tiles(length: int, block: int) -> int:
    """Number of tiles of size ``block`` that cover ``length`` (the last may be partial)."""
    return -(-length // block)


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pad ``x`` along ``axis`` up to a multiple of ``multiple``."""
    extra = num_tiles(x.shape[axis], multiple) * multiple - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def take_tile(x: jax.Array, q_idx: jax.Array, kv_idx: jax.Array) -> jax.Array:
    """Rows ``q_idx`` and columns ``kv_idx`` of a ``[..., Tx, Sx]`` array that broadcasts.

    A trailing dim of size 1 is kept as 1 (it broadcasts); indices past the end are clipped,
    which callers use for padding rows/columns that they mask or drop anyway.
    """
    if x.shape[-2] != 1:
        x = jnp.take(x, q_idx, axis=-2, mode="clip")
    if x.shape[-1] != 1:
        x = jnp.take(x, kv_idx, axis=-1, mode="clip")
    return x


def rank4(x: jax.Array) -> jax.Array:
    """Prepend unit dims so an array broadcastable to ``[B, H, T, S]`` has rank 4."""
    x = jnp.asarray(x)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def check_broadcastable(name: str, x: jax.Array, expected: tuple) -> None:
    """``ValueError`` unless ``x`` (rank 2 to 4) broadcasts to ``expected`` = ``(B, H, T, S)``."""
    if not 2 <= x.ndim <= 4 or any(d not in (1, e) for d, e in zip(rank4(x).shape, expected)):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected one broadcastable to "
                         f"[B, H, T, S] = {list(expected)}")
