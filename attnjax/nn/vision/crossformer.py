"""CrossFormer's block (LSDA with dynamic position bias, then an MLP) and cross-scale embedding layer as NNX modules.

Wang et al., "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention", ICLR 2022, sec. 3;
official code: cheerss/CrossFormer, ``models/crossformer.py`` (``DynamicPosBias``, ``Attention``,
``CrossFormerBlock``, ``PatchEmbed``, ``PatchMerging``). Functional core: ``attnjax.vision.crossformer``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive, describe
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_features, check_image
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional.grid import RelativeGridBias
from attnjax.vision.crossformer import (GROUP_SIZE, INTERVAL, cross_scale_channels, cross_scale_embedding,
                                        lsda_attention, lsda_group, relative_offsets)
from attnjax.vision.window import Window, grid_attention_inputs, window_attention_inputs, window_shape

LAYER_NORM_EPSILON = 1e-5
"""PyTorch's ``nn.LayerNorm`` default, which the official code keeps."""


def gelu(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU of PyTorch's ``nn.GELU``, the official MLP's activation."""
    return jax.nn.gelu(x, approximate=False)


class DynamicPositionBias(nnx.Module):
    """CrossFormer's dynamic position bias (DPB, sec. 3.3): an MLP from an offset ``(Δy, Δx)`` to one bias per head::

        h = FC_{2→P}(Δ);  h = FC_{P→P}(ReLU(LN(h)));  h = FC_{P→P}(ReLU(LN(h)));  bias = FC_{P→heads}(ReLU(LN(h)))

    as the official ``DynamicPosBias(residual=False)`` (without the last layer's bias by default). Applied to ``relative_offsets(group)`` it gives the
    ``[(2Gh − 1)·(2Gw − 1), heads]`` table that ``attnjax.vision.crossformer.lsda_attention`` gathers per pair of
    tokens, for a group of any size (the point of DPB over a fixed relative position table).

    Parameters: ``3P`` (first layer) ``+ 2·(2P + P² + P)`` (two hidden layers with their LayerNorms) ``+ 2P + P·heads``
    (last LayerNorm and layer) ``+ heads`` with ``use_bias``.

    Args:
      num_heads: outputs per offset.
      hidden: ``P``, the MLP's width (at least 2: a LayerNorm over one feature outputs its bias only).
      use_bias: a bias on the last layer. The official code has one, but inside attention it adds the same
        constant to every logit of a head, which the softmax cancels (a parameter that never gets a gradient),
        so it is off by default.
      dtype, param_dtype: computation and parameter dtypes.
      rngs: ``params`` initializes the layers (flax's defaults).
    """

    def __init__(self, num_heads: int, *, hidden: int, use_bias: bool = False, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(num_heads=num_heads, hidden=hidden)
        if hidden < 2:
            raise ValueError(f"hidden must be at least 2 (a LayerNorm over one feature outputs its bias only), "
                             f"got {hidden}")
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = num_heads
        self.project = nnx.Linear(2, hidden, **common)
        self.norms = nnx.List([nnx.LayerNorm(hidden, epsilon=LAYER_NORM_EPSILON, **common) for _ in range(3)])
        self.layers = nnx.List([nnx.Linear(hidden, hidden, **common), nnx.Linear(hidden, hidden, **common),
                                nnx.Linear(hidden, num_heads, use_bias=use_bias, **common)])

    def __call__(self, offsets: jax.Array) -> jax.Array:
        """``offsets [P, 2] (Δy, Δx) -> [P, heads]``."""
        check_features("offsets", offsets)
        if offsets.ndim != 2 or offsets.shape[-1] != 2:
            raise ValueError(f"offsets must have shape [offsets, 2] (Δy, Δx), got {describe(offsets)}")
        h = self.project(offsets)
        for norm, layer in zip(self.norms, self.layers):
            h = layer(jax.nn.relu(norm(h)))
        return h

    def grid_bias(self, grid: Window) -> RelativeGridBias:
        """The DPB as a bias rule for global attention over all ``gh·gw`` pixels of a map of any size.

        The MLP runs once over the ``(2gh − 1)·(2gw − 1)`` offsets of ``relative_offsets(grid)`` (sec. 3.3: "DPB
        ... generates the relative position bias for any group size"); the returned
        ``attnjax.positional.grid.RelativeGridBias`` gathers ``b[h, i, j] = DPB(y_i − y_j, x_i − x_j)[h]`` per tile
        inside the blocked paths, never ``[gh·gw, gh·gw]``, and ``jax.grad`` through ``attnjax.attention`` reaches the
        MLP's weights. Cost: ``O(gh·gw·P²)`` for the MLP, ``O(gh·gw·heads)`` for the table. Example::

          bias = dpb.grid_bias((H, W))
          out = attention(q.reshape(B, H * W, heads, D), k.reshape(...), v.reshape(...), bias=bias)

        Args:
          grid: ``(gh, gw)`` (or ``g``), the map's height and width in tokens; tokens are row-major.
        """
        gh, gw = window_shape(grid, "grid")
        offsets = jnp.asarray(relative_offsets((gh, gw)))
        return RelativeGridBias(self(offsets), grid=(gh, gw))


class CrossFormerBlock(nnx.Module):
    """CrossFormer block (sec. 3.2, Fig. 3a): LSDA with dynamic position bias, then an MLP, each pre-norm residual::

        x ← x + Proj(LSDA(Q, K, V; DPB)),  [Q, K, V] = LN(x) W_qkv + b_qkv
        x ← x + FC₂(GELU(FC₁(LN(x))))

    ``LSDA`` is short-distance attention (``G × G`` windows of adjacent embeddings) or, with ``long_distance``,
    long-distance attention (the embeddings ``I`` apart, ``⌈H/I⌉ × ⌈W/I⌉`` per group); the paper alternates them,
    SDA in even blocks and LDA in odd ones (``attnjax.vision.crossformer.lsda_attention``). The per-head position
    bias of a group comes from the ``DynamicPositionBias`` MLP on the group's offsets, so the block takes maps of
    any size (not multiples of ``G`` or ``I`` are padded and the padding masked).

    Example::

      sda = CrossFormerBlock(96, num_heads=3, rngs=nnx.Rngs(0))                       # G = 7
      lda = CrossFormerBlock(96, num_heads=3, long_distance=True, rngs=nnx.Rngs(0))   # I = 8
      y = lda(sda(x))                                                                 # x, y: [B, 56, 56, 96]

    Parameters (``M = int(mlp_ratio·C)``): ``2C + 3C² + 3C + C² + C`` (norm, QKV, output projection)
    ``+ 2C + C·M + M + M·C + C`` (norm, MLP) plus the DPB's (``DynamicPositionBias``).

    Following the official code (one departure: the DPB's last layer has no bias, see ``DynamicPositionBias``):
    fused QKV projection with biases (the key bias adds ``q·b_k`` to every logit of a
    query, which the softmax cancels: its slice of the gradient is zero); ``scale = head_dim^-½``; exact GELU;
    LayerNorm epsilon 1e-5; DPB width ``C // 16`` (the official ``Attention`` builds ``DynamicPosBias(dim // 4)``,
    which takes a quarter again). Left out: dropout and stochastic depth, and the official code's fallback to SDA
    over the whole map when ``min(H, W) ≤ G`` (here SDA on a map smaller than the group attends over the whole map
    anyway, and LDA with ``I ≥ H, W`` within single tokens).

    Args:
      channels: ``C``, the channels of ``x`` (a multiple of ``num_heads``).
      num_heads: attention heads (3, 6, 12, 24 over the stages of CrossFormer-T).
      group_size: SDA's ``G`` or ``(Gh, Gw)`` (7 in the paper).
      interval: LDA's ``I`` or ``(Ih, Iw)`` (8, 4, 2, 1 over the stages at 224×224).
      long_distance: LDA if True, else SDA.
      mlp_ratio: the MLP's hidden width over ``C`` (4 in the paper).
      dpb_dim: the DPB's width ``P``; default ``C // 16`` (the official code's), at least 2.
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax's defaults).
    """

    def __init__(self, channels: int, *, num_heads: int, group_size: Window = GROUP_SIZE, interval: Window = INTERVAL,
                 long_distance: bool = False, mlp_ratio: float = 4.0, dpb_dim: Optional[int] = None,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, num_heads=num_heads)
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be a multiple of num_heads ({num_heads})")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {describe(mlp_ratio)}")
        self.group_size, self.interval = window_shape(group_size, "group_size"), window_shape(interval, "interval")
        self.channels, self.num_heads, self.long_distance = channels, num_heads, bool(long_distance)
        hidden = int(channels * mlp_ratio)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.qkv = nnx.Linear(channels, 3 * channels, **common)
        self.position_bias = DynamicPositionBias(num_heads, hidden=channels // 16 if dpb_dim is None else dpb_dim,
                                                 **common)
        self.proj = nnx.Linear(channels, channels, **common)
        self.mlp_norm = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.fc1 = nnx.Linear(channels, hidden, **common)
        self.fc2 = nnx.Linear(hidden, channels, **common)

    def attend(self, x: jax.Array) -> jax.Array:
        """The attention branch ``Proj(LSDA(LN(x)))``: ``[B, H, W, C] -> [B, H, W, C]``."""
        B, H, W, C = x.shape
        qkv = self.qkv(self.attention_norm(x)).reshape(B, H, W, 3, self.num_heads, C // self.num_heads)
        q, k, v = (qkv[:, :, :, i] for i in range(3))
        group = lsda_group(H, W, long_distance=self.long_distance, group_size=self.group_size,
                           interval=self.interval)
        table = self.position_bias(jnp.asarray(relative_offsets(group), q.dtype)).astype(q.dtype)
        if is_capturing():  # the groups as the batch, as lsda_attention's grid_attention / window_attention call
            qg, kg, mask, bias = (grid_attention_inputs(q, k, interval=self.interval, relative_bias_table=table)
                                  if self.long_distance else
                                  window_attention_inputs(q, k, window_size=self.group_size, relative_bias_table=table))
            sow_attention_inputs(self, qg, kg, mask=mask, bias=bias, scale=None, mechanism="softmax")
        o = lsda_attention(q, k, v, long_distance=self.long_distance, group_size=self.group_size,
                           interval=self.interval, position_table=table)
        return self.proj(o.reshape(B, H, W, C))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        x = x + self.attend(x).astype(x.dtype)
        return x + self.fc2(gelu(self.fc1(self.mlp_norm(x)))).astype(x.dtype)


NORMS = ("after", "before")
"""Where ``CrossScaleEmbedding`` puts its LayerNorm: "after" the concatenation (the official ``PatchEmbed`` of the
first stage) or "before" the convolutions (the official ``PatchMerging`` between stages)."""


class CrossScaleEmbedding(nnx.Module):
    """CrossFormer's cross-scale embedding layer (CEL, sec. 3.1, Fig. 2, Table 1)::

        y = concat_i(Conv_{K_i×K_i, stride s, pad (K_i − s)/2}(x))        # [B, ⌊H/s⌋, ⌊W/s⌋, D]

    with a LayerNorm after the concatenation (first stage) or before the convolutions (between stages). Kernel
    ``i`` (ascending size) gets ``D/2^(i+1)`` channels and the largest as many as the one before it
    (``attnjax.vision.crossformer.cross_scale_channels``): the paper's first CEL samples 4, 8, 16, 32-pixel
    patches at stride 4 into ``D/2, D/4, D/8, D/8`` channels, the later ones 2 and 4 at stride 2 into ``D/2, D/2``.

    Example::

      embed = CrossScaleEmbedding(3, 64, rngs=nnx.Rngs(0))                                    # stage 1
      merge = CrossScaleEmbedding(64, 128, kernel_sizes=(2, 4), stride=2, norm="before", rngs=nnx.Rngs(0))
      y = merge(embed(images))                                     # [B, 224, 224, 3] -> [B, 28, 28, 128]

    Parameters: ``Σ_i (K_i²·C_in·D_i + D_i)`` plus ``2D`` (norm "after") or ``2·C_in`` (norm "before").

    The output grid is ``⌊H/s⌋ × ⌊W/s⌋``, not the input's, so the module is registered with kind "other".

    Args:
      in_channels: ``C_in``, the channels of ``x``.
      out_channels: ``D`` (a multiple of ``2^(len(kernel_sizes) − 1)``).
      kernel_sizes: the square kernels' sizes, ascending; each ``≥ stride`` with ``K − stride`` even.
      stride: ``s``, shared by every kernel (4 in the first stage, 2 later).
      norm: one of ``NORMS``.
      dtype, param_dtype: computation and parameter dtypes. rngs: ``params`` initializes the layers.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_sizes: Sequence[int] = (4, 8, 16, 32),
                 stride: int = 4, norm: str = "after", dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(in_channels=in_channels, stride=stride)
        sizes = tuple(kernel_sizes)
        if (not sizes or list(sizes) != sorted(sizes)
                or any(isinstance(k, bool) or not isinstance(k, int) or k < stride or (k - stride) % 2 for k in sizes)):
            raise ValueError(f"kernel_sizes must be ascending ints, each >= stride ({stride}) with K - stride even, "
                             f"got {describe(kernel_sizes)}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {describe(norm)}")
        channels = cross_scale_channels(out_channels, len(sizes))
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_channels, self.stride, self.norm_place = in_channels, stride, norm
        self.convs = nnx.List([nnx.Conv(in_channels, c, (k, k), strides=stride, padding=[((k - stride) // 2,) * 2] * 2,
                                        **common) for k, c in zip(sizes, channels)])
        self.norm = nnx.LayerNorm(out_channels if norm == "after" else in_channels, epsilon=LAYER_NORM_EPSILON,
                                  **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C_in] -> [B, ⌊H/s⌋, ⌊W/s⌋, D]``."""
        check_image("x", x, self.in_channels)
        if self.norm_place == "before":
            x = self.norm(x)
        y = cross_scale_embedding(x, [conv.kernel[...] for conv in self.convs],
                                  [conv.bias[...] for conv in self.convs], stride=self.stride)
        return (self.norm(y) if self.norm_place == "after" else y).astype(x.dtype)


def example_offsets(key: jax.Array) -> tuple[jax.Array]:
    """``relative_offsets`` of a 3×4 group, the input of the DPB example (``key`` unused: offsets are fixed)."""
    del key
    return (jnp.asarray(relative_offsets((3, 4))),)


def example_image(shape: tuple[int, int, int, int]):
    """A ``key -> (x,)`` builder of a standard normal float32 map of ``shape``."""
    return lambda key: (jax.random.normal(key, shape, jnp.float32),)


PAPER = "Wang et al. 2022 (CrossFormer, ICLR)"
register_module(ModuleSpec("crossformer_sda", CrossFormerBlock,
                           dict(channels=16, num_heads=2, group_size=3, dpb_dim=4), (2, 5, 7, 16), kind="image",
                           paper=PAPER))
register_module(ModuleSpec("crossformer_lda", CrossFormerBlock,
                           dict(channels=16, num_heads=2, interval=2, long_distance=True, dpb_dim=4), (2, 5, 7, 16),
                           kind="image", paper=PAPER))
register_module(ModuleSpec("crossformer_dpb", DynamicPositionBias, dict(num_heads=2, hidden=4), example_offsets,
                           kind="other", paper=PAPER))
register_module(ModuleSpec("cross_scale_embedding", CrossScaleEmbedding, dict(in_channels=3, out_channels=16),
                           example_image((2, 8, 12, 3)), kind="other", paper=PAPER))
register_module(ModuleSpec("cross_scale_merging", CrossScaleEmbedding,
                           dict(in_channels=8, out_channels=16, kernel_sizes=(2, 4), stride=2, norm="before"),
                           example_image((2, 5, 6, 8)), kind="other", paper=PAPER))
