"""The MOAT block as a Flax NNX module on NHWC feature maps (window attention core: ``attnjax.vision.window``).

Yang et al., "MOAT: Alternating Mobile Convolution and Attention Brings Strong Vision Models", ICLR 2023:
a Transformer block whose MLP is replaced by a mobile convolution (MBConv, an inverted residual) moved in
front of the self-attention (sec. 3, the MOAT block). Official code: google-research/deeplab2,
``model/layers/moat_blocks.py`` (``MOATBlock``) and ``model/layers/moat_attention.py`` (``Attention``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.api import attention
from attnjax.checks import check_positive
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_image
from attnjax.nn.conv.mbconv import LAYER_NORM_EPSILON, MBConv
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.window import Window, window_attention, window_attention_inputs, window_shape

class MOATBlock(nnx.Module):
    """MOAT block (Yang et al., ICLR 2023, sec. 3): MBConv, then multi-head self-attention, each residual::

        x ← x + Proj(GELU(N(DWConv(GELU(N(Expand(N(x))))))))      # MBConv without SE, N = BatchNorm
        x ← x + Attn(LN(x))                                       # global or window attention

    ``Expand`` is a 1×1 convolution to ``expansion·C`` channels (no bias), ``DWConv`` a ``k × k`` depthwise
    convolution (no bias), ``Proj`` a 1×1 convolution back to ``C`` (with bias). Unlike MBConv, the block has
    no squeeze-and-excitation (the official ``MOATBlock`` has none). ``Attn`` is multi-head softmax
    attention with ``head_dim`` channels per head and q, v, o projections with biases, over all ``H·W`` pixels or,
    with ``window_size``, within non-overlapping windows without shifting: the depthwise convolution before it
    exchanges information across windows ("MOAT does not need the extra window-shifting mechanism", abstract).

    Example::

      block = MOATBlock(64, rngs=nnx.Rngs(0))                          # global attention, 2 heads of 32
      local = MOATBlock(64, window_size=7, relative_position=True, rngs=nnx.Rngs(0))
      y = block(x)                                                     # x, y: [B, H, W, 64]

    Parameters (``norm="batch"``, ``E = expansion·C``, ``k = kernel_size``): ``C + C·E + 2E + k²E + 2E + E·C + C``
    (MBConv) plus ``2C + 4C² + 3C`` (attention), plus ``heads·(2wh − 1)(2ww − 1)`` with ``relative_position``.

    Normalization: the paper's BatchNorm trains on the batch statistics and updates running averages, which
    ``model.eval()`` (``use_running_average=True``) then uses; outputs under ``nnx.jit`` equal eager ones in both
    modes. In training mode call it through ``nnx.jit`` / ``nnx.grad`` (or pass its state in), not inside a
    ``jax.jit`` / ``jax.eval_shape`` closure, where flax cannot update the averages (TraceContextError).
    ``norm="layer"`` swaps the three BatchNorms for per-pixel LayerNorms (no batch coupling, no state).

    Choices where the paper leaves it open, following the official code: exact GELU; BatchNorm epsilon 1e-3
    (Keras' default), LayerNorm epsilon 1e-5. Two departures drop parameters that the official code has but that
    never get a gradient: the key projection has no bias (it adds ``q·b_k``, the same for every key, to a
    query's logits, and the softmax cancels it), and with ``norm="batch"`` the first BatchNorm has no shift (a
    shift passes the bias-free 1×1 expansion as a per-channel constant, which the next BatchNorm's batch mean
    removes). Left out: the stride-2 first block of a stage (its avg-pool and 1×1 shortcut; here
    ``[B, H, W, C] -> [B, H, W, C]``), stochastic depth, and the official code's interpolation of a 7×7 relative
    position table to the window size (here the table has the window's own size).

    Args:
      channels: ``C``, the channels of ``x`` (a multiple of ``head_dim``).
      head_dim: channels per attention head (32 in the paper); ``heads = C // head_dim``.
      expansion: the MBConv's expansion ratio (4 in the paper).
      kernel_size: the depthwise convolution's kernel (3 in the paper).
      window_size: None for global attention (the paper's ImageNet models), or ``w`` / ``(wh, ww)`` for window
        attention (its detection and segmentation models); map sizes that are not multiples are padded and the
        padding masked (``attnjax.vision.window``).
      relative_position: add a learned relative position bias per head (CoAtNet's, which the official code
        uses by default), in Swin's layout and indexing (``attnjax.vision.window.relative_position_bias``). It needs
        ``window_size``: global attention on an ``H × W`` map with it is ``window_size=(H, W)``. Off by default
        (the official default is on) because the table's size must be known when the block is built.
      norm: the MBConv's normalization, one of ``NORMS`` ("batch" in the paper).
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax defaults; the table ``N(0, 0.02²)`` as the official code).
    """

    def __init__(self, channels: int, *, head_dim: int = 32, expansion: int = 4, kernel_size: int = 3,
                 window_size: Optional[Window] = None, relative_position: bool = False, norm: str = "batch",
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, head_dim=head_dim, expansion=expansion, kernel_size=kernel_size)
        if channels % head_dim:
            raise ValueError(f"channels ({channels}) must be a multiple of head_dim ({head_dim})")
        self.window_size = None if window_size is None else window_shape(window_size)
        if relative_position and self.window_size is None:
            raise ValueError("relative_position needs window_size (the table has the window's size); for global "
                             "attention on an H x W map pass window_size=(H, W)")
        self.channels, self.head_dim, self.num_heads = channels, head_dim, channels // head_dim
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mbconv = MBConv(channels, expansion=expansion, kernel_size=kernel_size, norm=norm, **common)
        self.attention_norm = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.query, self.value, self.out = (nnx.Linear(channels, channels, **common) for _ in range(3))
        self.key = nnx.Linear(channels, channels, use_bias=False, **common)
        if relative_position:
            wh, ww = self.window_size
            init = jax.nn.initializers.normal(0.02)
            self.relative_position = nnx.Param(init(rngs.params(), ((2 * wh - 1) * (2 * ww - 1), self.num_heads),
                                                    param_dtype))
        else:
            self.relative_position = None

    def attend(self, x: jax.Array) -> jax.Array:
        """The attention residual branch ``Attn(LN(x))``, global or in windows: ``[B, H, W, C] -> [B, H, W, C]``."""
        B, H, W, C = x.shape
        h = self.attention_norm(x)
        q, k, v = (layer(h).reshape(B, H, W, self.num_heads, self.head_dim)
                   for layer in (self.query, self.key, self.value))
        if self.window_size is None:
            q, k, v = (a.reshape(B, H * W, self.num_heads, self.head_dim) for a in (q, k, v))
            sow_attention_inputs(self, q, k, mask=None, scale=None, mechanism="softmax")
            o = attention(q, k, v)
        else:
            table = None if self.relative_position is None else self.relative_position[...].astype(q.dtype)
            if is_capturing():
                qw, kw, mask, bias = window_attention_inputs(q, k, window_size=self.window_size,
                                                             relative_bias_table=table)
                sow_attention_inputs(self, qw, kw, mask=mask, bias=bias, scale=None, mechanism="softmax")
            o = window_attention(q, k, v, window_size=self.window_size, relative_bias_table=table)
        return self.out(o.reshape(B, H, W, C))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        x = self.mbconv(x)
        return x + self.attend(x).astype(x.dtype)


# The examples use norm="layer": the conformance suite traces the module inside a closure
# (jax.eval_shape(lambda: model(x))), where a training-mode BatchNorm cannot update its running averages
# (flax's TraceContextError). Under nnx.jit / nnx.grad the default norm="batch" works (tests/nn/conv/test_moat.py).
PAPER = "Yang et al. 2023 (MOAT, ICLR)"
register_module(ModuleSpec("moat", MOATBlock, dict(channels=16, head_dim=8, norm="layer"), (2, 5, 6, 16),
                           kind="image", paper=PAPER))
register_module(ModuleSpec("moat_window", MOATBlock, dict(channels=16, head_dim=8, window_size=3,
                                                          relative_position=True, norm="layer"), (2, 6, 6, 16),
                           kind="image", paper=PAPER))
