"""Argument checks shared by the NNX modules, with messages that name the argument."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.checks import check_positive


def resolve_head_dim(d_model: int, num_heads: int, head_dim: Optional[int]) -> int:
    """``head_dim`` if given, else ``d_model // num_heads`` (which must divide evenly)."""
    check_positive(d_model=d_model, num_heads=num_heads)
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads}) "
                             "unless head_dim is given")
        head_dim = d_model // num_heads
    check_positive(head_dim=head_dim)
    return head_dim


def check_features(name: str, x: jax.Array) -> None:
    """``TypeError`` unless ``x`` holds floating-point features (not, e.g., integer token ids)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array of features (embed token ids first), "
                        f"got dtype {dtype}")


def check_input(name: str, x: jax.Array, features: int) -> None:
    """``TypeError`` unless ``x`` is floating point, ``ValueError`` unless it is ``[batch, seq, features]``."""
    check_features(name, x)
    if x.ndim != 3 or x.shape[-1] != features:
        raise ValueError(f"{name} must have shape [batch, seq, {features}], got {list(x.shape)}")


def check_step(name: str, x_t: jax.Array, features: int, batch: int) -> None:
    """``TypeError`` unless ``x_t`` is floating point, ``ValueError`` unless it is one decoding step
    ``[batch, 1, features]``."""
    check_features(name, x_t)
    if x_t.ndim != 3 or x_t.shape != (batch, 1, features):
        raise ValueError(f"{name} must have shape [B, 1, d_model] = {[batch, 1, features]} for this cache, "
                         f"got {list(x_t.shape)}")


def check_chunk(name: str, x: jax.Array, features: int, batch: int) -> None:
    """``TypeError`` unless ``x`` is floating point, ``ValueError`` unless it is ``[batch, T, features]``: tokens for
    ``prefill`` into a cache of ``batch`` sequences."""
    check_input(name, x, features)
    if x.shape[0] != batch:
        raise ValueError(f"{name} has batch {x.shape[0]}, the cache {batch}: {name} {list(x.shape)}")


def check_causal_mask(layer: str, mask: Optional[masks.Mask]) -> None:
    """``NotImplementedError`` unless ``mask`` is ``None`` or ``masks.Causal()``: what a layer that is
    causal by construction (a recurrence, a prefix scan) computes either way."""
    if mask is not None and not isinstance(mask, masks.Causal):
        raise NotImplementedError(f"{layer} takes mask=None or masks.Causal() only, got {type(mask).__name__}")


def check_image(name: str, x: jax.Array, channels: int) -> None:
    """``TypeError`` unless ``x`` is floating point, ``ValueError`` unless it is an NHWC feature map
    ``[batch, height, width, channels]``."""
    check_features(name, x)
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"{name} must have shape [batch, height, width, {channels}] (NHWC), got {list(x.shape)}")
