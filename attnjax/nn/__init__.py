"""Flax NNX modules over the functional core; usable from Linen through ``flax.nnx.bridge``."""

from attnjax.nn.attention import KVCache, MultiHeadAttention

__all__ = ["MultiHeadAttention", "KVCache"]
