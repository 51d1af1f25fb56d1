"""Positional schemes as values: rotary embeddings and additive bias rules computed per tile.

- ``rope``: RoPE and its context-extension scalings.
- ``alibi``: ALiBi's linear distance penalty.
- ``t5``: T5's bucketed, learned relative position bias.

A bias rule (a ``attnjax.bias.Bias``) is evaluated one tile at a time inside the blocked paths and
kernels, from positions, so no path forms ``[T, S]``; learned tables get gradients.
"""

from attnjax.positional.alibi import ALiBi, alibi_slopes
from attnjax.positional.rope import RoPE, RopeScaling
from attnjax.positional.t5 import T5Bias, t5_relative_buckets
from attnjax.positional.gpsa_position import GPSAPositionBias, grid_offsets
from attnjax.positional.relative import RelativeEmbeddingBias, relative_logits_reference, relative_logits_skewed
from attnjax.positional.grid import RelativeGridBias, relative_grid_index
from attnjax.positional.box import BoxRelativeBias, box_relative_bias, box_relative_bias_reference
from attnjax.positional.transformer_xl import TransformerXLBias, relative_sinusoids, transformer_xl_logits_reference

__all__ = ["RoPE", "RopeScaling", "alibi_slopes", "ALiBi", "T5Bias", "t5_relative_buckets"]
