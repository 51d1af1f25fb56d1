"""Positional schemes as values: rotary embeddings and additive bias rules computed per tile.

- ``rope``: RoPE and its context-extension scalings.
- ``alibi``: ALiBi's linear distance penalty.
- ``t5``: T5's bucketed, learned relative position bias.
- ``relative``: learned relative embeddings read by the queries (Shaw et al.; Music Transformer's skewing).
- ``transformer_xl``: Transformer-XL's sinusoidal relative terms with the ``u``/``v`` biases.
- ``grid``: a 2-D relative table over all tokens of a grid (Swin's table, CrossFormer's DPB).
- ``gpsa_position``: ConViT's positional logits ``v_pos·r_ij``.
- ``box``: Plain DETR's box-to-pixel relative bias (BoxRPB).

A bias rule (a ``attnjax.bias.Bias``) is evaluated one tile at a time inside the blocked paths and
kernels, from positions (and, for the rules that read them, the tile's queries), so no path forms
``[T, S]``; learned tables get gradients.
"""

from attnjax.positional.alibi import ALiBi, alibi_slopes
from attnjax.positional.box import BoxRelativeBias, box_relative_bias, box_relative_bias_reference
from attnjax.positional.gpsa_position import GPSAPositionBias, grid_offsets
from attnjax.positional.grid import RelativeGridBias, relative_grid_index
from attnjax.positional.relative import RelativeEmbeddingBias, relative_logits_reference, relative_logits_skewed
from attnjax.positional.rope import RoPE, RopeScaling
from attnjax.positional.t5 import T5Bias, t5_relative_buckets
from attnjax.positional.transformer_xl import TransformerXLBias, relative_sinusoids, transformer_xl_logits_reference

__all__ = [
    "RoPE", "RopeScaling", "alibi_slopes", "ALiBi", "T5Bias", "t5_relative_buckets", "RelativeEmbeddingBias",
    "relative_logits_reference", "relative_logits_skewed", "TransformerXLBias", "relative_sinusoids",
    "transformer_xl_logits_reference", "RelativeGridBias", "relative_grid_index", "GPSAPositionBias", "grid_offsets",
    "BoxRelativeBias", "box_relative_bias", "box_relative_bias_reference",
]
