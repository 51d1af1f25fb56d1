"""The MaxViT block as a Flax NNX module: MBConv, then block attention, then grid attention.

Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022, sec. 3: multi-axis attention decomposes full
attention into local block attention (non-overlapping ``P × P`` windows) and sparse global grid attention (a
fixed ``G × G`` grid of pixels spread over the map), each in a pre-norm Transformer layer, preceded by an MBConv
with squeeze-and-excitation (Fig. 2, eq. 4-5). The attention cores are ``attnjax.vision.window``'s
``window_attention`` and ``grid_attention`` through ``attnjax.nn.vision.swin.SwinBlock`` (``partition``
"window" and "grid"). Choices where the paper is silent follow the official code
(tensorflow/models ``official/projects/maxvit/modeling/layers.py``); the MBConv is ``attnjax.nn.conv.mbconv``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_image
from attnjax.nn.conv.mbconv import MBConv
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.nn.vision.swin import SwinBlock
from attnjax.vision.window import Window


class MaxViTBlock(nnx.Module):
    """MaxViT block (Tu et al. 2022, sec. 3.2-3.3, Fig. 2), three residual stages::

        x ← x + Proj(SE(GELU(N(DWConv(GELU(N(Expand(N(x)))))))))      # MBConv, N = BatchNorm
        x ← x + Block-Attention(LN(x));  x ← x + MLP(LN(x))            # P × P windows
        x ← x + Grid-Attention(LN(x));   x ← x + MLP(LN(x))            # G × G grid, interval ⌈H/G⌉

    Both attentions have a learned relative position bias over their window's offsets (the paper's
    "relative attention", eq. 3), here in Swin's ``[(2P − 1)², heads]`` layout (the official code stores the same
    numbers as ``[heads, 2P − 1, 2P − 1]``); ``q, k, v`` come from one ``qkv`` layer (the official code has three,
    the concatenation of theirs). Maps that are not multiples of ``P`` (or ``G``) are padded and the padding masked
    (``attnjax.vision.window``); the official code requires multiples.

    Example::

      block = MaxViTBlock(64, rngs=nnx.Rngs(0))            # 2 heads of 32, P = G = 7
      y = block(x)                                         # x, y: [B, H, W, 64]

    Parameters (``norm="batch"``, ``E = 4C``, ``S = ⌊C/4⌋``): MBConv ``C + C·E + 2E + 9E + 2E + (E·S + S + S·E + E)
    + E·C + C``, plus twice ``SwinBlock``'s (window ``P``, then ``G``).

    Args:
      channels: ``C``, a multiple of ``head_dim``.
      head_dim: channels per head (32 in the paper); ``heads = C // head_dim``.
      block_size: ``P``, the block attention's window (7 in the paper).
      grid_size: ``G``, the grid attention's grid (7 in the paper).
      expansion: the MBConv's expansion ratio (4), and the MLP ratio of both Transformer layers (4).
      kernel_size: the depthwise convolution's kernel (3).
      norm: the MBConv's normalization, one of ``attnjax.nn.conv.mbconv.NORMS`` ("batch" in the paper; BatchNorm
        behaves as in ``MOATBlock``: call it through ``nnx.jit`` in training mode, ``model.eval()`` for inference).
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax's defaults; the relative tables ``N(0, 0.02²)``).

    Left out: the stride-2 first block of a stage (pooled shortcut), dropout and stochastic depth.
    """

    def __init__(self, channels: int, *, head_dim: int = 32, block_size: Window = 7, grid_size: Window = 7,
                 expansion: int = 4, kernel_size: int = 3, norm: str = "batch", dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, head_dim=head_dim, expansion=expansion, kernel_size=kernel_size)
        if channels % head_dim:
            raise ValueError(f"channels ({channels}) must be a multiple of head_dim ({head_dim})")
        self.channels = channels
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mbconv = MBConv(channels, expansion=expansion, kernel_size=kernel_size, squeeze_excite=True, norm=norm,
                             **common)
        heads = channels // head_dim
        layer = dict(mlp_ratio=expansion, head_dim=head_dim, **common)
        self.block_attention = SwinBlock(channels, heads, window_size=block_size, partition="window", **layer)
        self.grid_attention = SwinBlock(channels, heads, window_size=grid_size, partition="grid", **layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        x = self.mbconv(x)
        return self.grid_attention(self.block_attention(x))


# norm="layer" in the example: the conformance suite traces the module in a closure, where a training-mode
# BatchNorm cannot update its averages (see MOATBlock); the BatchNorm default is tested under nnx.jit.
register_module(ModuleSpec("maxvit", MaxViTBlock, dict(channels=16, head_dim=8, block_size=3, grid_size=2,
                                                       norm="layer"), (2, 5, 7, 16), kind="image",
                           paper="Tu et al. 2022 (MaxViT, ECCV)"))
