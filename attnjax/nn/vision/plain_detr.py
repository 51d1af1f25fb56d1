"""Plain DETR's global cross-attention with the box-to-pixel relative position bias (BoxRPB) as an NNX module.

Lin et al., "DETR Doesn't Need Multi-Scale or Locality Design", ICCV 2023, sec. 3 ("Box-to-pixel relative
position bias", Fig. 2); official code: impiga/Plain-DETR, ``models/global_rpe_decomp_decoder.py``
(``GlobalCrossAttention``). Functional core: ``attnjax.positional.box``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.api import attention
from attnjax.checks import check_positive, describe
from attnjax.nn.capture import sow_attention_inputs
from attnjax.nn.checks import check_image, check_input
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional.box import FEATURE_STRIDE, OFFSET_TRANSFORMS, box_relative_bias, check_boxes

RPE_HIDDEN_DIM = 512
"""The BoxRPB MLPs' hidden width (the official ``--decoder_rpe_hidden_dim`` default)."""


class BoxRPBMLP(nnx.Module):
    """One of BoxRPB's MLPs: ``[..., 2] -> [..., heads]``, ``FC_{hidden→heads}(ReLU(FC_{2→hidden}(δ)))``.

    As the official ``build_cpb_mlp``: the first layer with a bias, the last without (a per-head constant would add
    the same value to every logit of a head, which the softmax cancels). Parameters ``3·hidden + hidden·heads``.

    Args:
      num_heads: outputs per pair of offsets; hidden: the width (512 in the paper's code).
      dtype, param_dtype: computation and parameter dtypes. rngs: ``params`` initializes the layers (flax defaults).
    """

    def __init__(self, num_heads: int, *, hidden: int = RPE_HIDDEN_DIM, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(num_heads=num_heads, hidden=hidden)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hidden = nnx.Linear(2, hidden, **common)
        self.out = nnx.Linear(hidden, num_heads, use_bias=False, **common)

    def __call__(self, offsets: jax.Array) -> jax.Array:
        """``offsets [..., 2] -> [..., heads]``."""
        if offsets.shape[-1:] != (2,):
            raise ValueError(f"offsets must have shape [..., 2], got {list(offsets.shape)}")
        return self.out(jax.nn.relu(self.hidden(offsets)))


class BoxRPBCrossAttention(nnx.Module):
    """Plain DETR's global cross-attention (sec. 3): object queries attend to every pixel of one feature map, with
    the decomposed box-to-pixel relative position bias::

        q = W_q·x_i + b_q,   k = W_k·(f_p + e_p),   v = W_v·f_p + b_v                         (per head)
        out_i = W_o · Σ_p softmax_p(q·k_p/√d + B_x(i, p_x) + B_y(i, p_y)) v_p + b_o
        B_x(i, x) = MLP_1(x1_i − x, x2_i − x),   B_y(i, y) = MLP_2(y1_i − y, y2_i − y)

    with query ``i``'s box corners in input pixels and pixel centres ``((x + ½)·s, (y + ½)·s)`` for the stride ``s``
    (``attnjax.positional.box``). The attention runs through ``attnjax.attention`` with the ``BoxRelativeBias``
    rule: the MLPs see ``Nq·(Hh + W)`` offsets, the blocked paths add ``B_x + B_y`` per tile and never hold the
    ``[B, heads, Nq, Hh·W]`` bias, and gradients reach both MLPs (and the boxes).

    Parameters (``P`` = ``rpe_hidden_dim``): ``4C² + 3C`` (q, k, v, output projections; ``C`` fewer per bias left
    out by ``qkv_bias=False``) ``+ 2·(3P + P·heads)`` (the two MLPs).

    Following the official ``GlobalCrossAttention`` (rpe_type "linear" by default, "abs_log8" as ``"log8"``):
    separate q, k, v projections, ``scale = head_dim^-½``, boxes ``(cx, cy, w, h)`` normalized to the map's extent.
    One departure: the key projection has no bias (the official one has, with ``qkv_bias=True``): it adds
    ``q·b_k`` to every logit of a query, which the softmax cancels, so its gradient is identically zero. Left out:
    dropout, and the official padding mask and ``valid_ratios`` of batches padded to a common size (every map here
    is whole), and the ``reparam`` variant (boxes given in pixels).

    Args:
      dim: ``C``, the width of the queries and of the feature map (a multiple of ``num_heads``).
      num_heads: attention heads (8 in the paper).
      rpe_hidden_dim: the BoxRPB MLPs' hidden width (512).
      feature_stride: the feature map's stride in input pixels (16).
      offset_transform: one of ``attnjax.positional.box.OFFSET_TRANSFORMS`` ("linear").
      qkv_bias: biases in the query and value projections (True).
      implementation: the ``attnjax.attention`` path ("auto").
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``queries``' dtype.
      rngs: ``params`` initializes the layers (flax defaults).
    """

    def __init__(self, dim: int, num_heads: int, *, rpe_hidden_dim: int = RPE_HIDDEN_DIM,
                 feature_stride: float = FEATURE_STRIDE, offset_transform: str = "linear", qkv_bias: bool = True,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(dim=dim, num_heads=num_heads, rpe_hidden_dim=rpe_hidden_dim)
        if not feature_stride > 0:
            raise ValueError(f"feature_stride must be positive, got {describe(feature_stride)}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        if offset_transform not in OFFSET_TRANSFORMS:
            raise ValueError(f"offset_transform must be one of {OFFSET_TRANSFORMS}, got {offset_transform!r}")
        self.dim, self.num_heads = dim, num_heads
        self.feature_stride, self.offset_transform = float(feature_stride), offset_transform
        self.implementation = implementation
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = nnx.Linear(dim, dim, use_bias=qkv_bias, **common)
        self.key = nnx.Linear(dim, dim, use_bias=False, **common)
        self.value = nnx.Linear(dim, dim, use_bias=qkv_bias, **common)
        self.proj = nnx.Linear(dim, dim, **common)
        self.mlp_x = BoxRPBMLP(num_heads, hidden=rpe_hidden_dim, **common)
        self.mlp_y = BoxRPBMLP(num_heads, hidden=rpe_hidden_dim, **common)

    def __call__(self, queries: jax.Array, boxes: jax.Array, features: jax.Array,
                 position: Optional[jax.Array] = None) -> jax.Array:
        """``queries [B, Nq, C]``, ``boxes [B, Nq, 4]`` (cx, cy, w, h in [0, 1]), ``features [B, Hh, W, C]``,
        ``position``: the map's position embedding ``[B, Hh, W, C]`` added to the keys' input, or None
        -> ``[B, Nq, C]``."""
        check_input("queries", queries, self.dim)
        check_image("features", features, self.dim)
        check_boxes(boxes)
        B, Nq, C = queries.shape
        _, Hh, W, _ = features.shape
        if boxes.shape[:2] != (B, Nq) or features.shape[0] != B:
            raise ValueError(f"queries [B, Nq, C], boxes [B, Nq, 4] and features [B, Hh, W, C] must share B and Nq: "
                             f"queries {list(queries.shape)}, boxes {list(boxes.shape)}, "
                             f"features {list(features.shape)}")
        if position is not None and position.shape != features.shape:
            raise ValueError(f"position must have the shape of features {list(features.shape)}, "
                             f"got {list(position.shape)}")
        heads, S = self.num_heads, Hh * W
        pixels = features.reshape(B, S, C)
        keys_in = pixels if position is None else pixels + position.reshape(B, S, C).astype(pixels.dtype)
        q = self.query(queries).reshape(B, Nq, heads, C // heads)
        k = self.key(keys_in).reshape(B, S, heads, C // heads)
        v = self.value(pixels).reshape(B, S, heads, C // heads)
        bias = box_relative_bias(boxes, self.mlp_x, self.mlp_y, Hh, W, stride=self.feature_stride,
                                 transform=self.offset_transform)
        sow_attention_inputs(self, q, k, mask=None, bias=bias, scale=None, mechanism="softmax")
        out = attention(q, k, v, bias=bias, implementation=self.implementation)
        return self.proj(out.reshape(B, Nq, C)).astype(queries.dtype)


def detr_example(key: jax.Array) -> tuple:
    """Queries ``[2, 5, 16]``, their boxes ``[2, 5, 4]`` (centres in [0.2, 0.8], sizes in [0.1, 0.5]) and a
    ``[2, 3, 4, 16]`` feature map."""
    kq, kc, ks, kf = jax.random.split(key, 4)
    centres = jax.random.uniform(kc, (2, 5, 2), minval=0.2, maxval=0.8)
    sizes = jax.random.uniform(ks, (2, 5, 2), minval=0.1, maxval=0.5)
    return (jax.random.normal(kq, (2, 5, 16)), jnp.concatenate([centres, sizes], axis=-1),
            jax.random.normal(kf, (2, 3, 4, 16)))


PAPER = "Lin et al. 2023 (Plain DETR, ICCV), BoxRPB"

register_module(ModuleSpec("boxrpb_cross_attention", BoxRPBCrossAttention,
                           dict(dim=16, num_heads=2, rpe_hidden_dim=8, feature_stride=1.0), detr_example,
                           kind="other", paper=PAPER))
register_module(ModuleSpec("boxrpb_mlp", BoxRPBMLP, dict(num_heads=2, hidden=8),
                           lambda key: (jax.random.normal(key, (2, 5, 2)),), kind="other", paper=PAPER))
