"""SLAB's simplified linear attention (SLA) and Transformer block with PRepBN, as Flax NNX modules on NHWC maps.

Guo et al., "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch
Normalization", ICML 2024 (arXiv 2405.11582): SLA (sec. 3, core ``attnjax.vision.slab``) and PRepBN
(sec. 3, ``attnjax.nn.normalization``). Layouts and names follow the official code (xinghaochen/SLAB
``models/slab_swin.py``: ``qkv``, ``dwc``, ``positional_encoding``, ``proj``; the block's ``norm1``, ``attn``,
``norm2``, ``mlp``). SLA attends over the whole map: SLAB-Swin's linear stages use a window of 56 at 224²
input, i.e. the whole feature map, as SLAB-DeiT and SLAB-PVT do.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive, describe
from attnjax.nn.checks import check_image, resolve_head_dim
from attnjax.nn.normalization import EPSILON, TOTAL_STEPS, ProgressiveRepBatchNorm
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.nn.vision.swin import TransformerMLP
from attnjax.vision.slab import simplified_linear_attention
from attnjax.vision.window import Window, window_shape

NORMS = ("prepbn", "layernorm")
"""``SLABBlock``'s normalization: PRepBN (the paper's) or LayerNorm (the softmax-free baseline with SLA only)."""


class SimplifiedLinearAttention(nnx.Module):
    """SLA (SLAB, sec. 3): ReLU-kernel linear attention over the map plus a depth-wise convolution of V::

        Q, K, V = x W_qkv + b_qkv                 (K += P, a learned position encoding, with input_size)
        O_h = ReLU(Q_h)(ReLU(K_h)ᵀV_h) / (ReLU(Q_h)(ReLU(K_h)ᵀ1) + ε) + DWC(V_h)
        y = concat_h(O_h) W_proj + b_proj

    ``DWC`` is one ``k × k`` depth-wise convolution over a head's ``d`` channels shared by all heads (the
    official ``nn.Conv2d(head_dim, head_dim, 5, groups=head_dim)``). Computed right product first
    (``attnjax.vision.slab.simplified_linear_attention``): O(H·W·C·d) for the attention, no ``[HW, HW]`` array.

    Example::

      sla = SimplifiedLinearAttention(96, 3, rngs=nnx.Rngs(0))
      y = sla(x)                                                  # x, y: [B, H, W, 96]

    Parameters: ``3C² + 3C`` (qkv) ``+ k²·d + d`` (dwc) ``+ C² + C`` (proj) ``+ H·W·C`` (with ``input_size``).

    Args:
      channels: ``C``, the channels of ``x``.
      num_heads: attention heads; ``d = C // num_heads`` unless ``head_dim`` is given.
      kernel_size: ``k``, odd (5 in the official code).
      qkv_bias: biases in ``qkv`` (True in SLAB-Swin).
      input_size: ``(H, W)`` (or ``H`` for a square map) to add the official code's learned position encoding
        ``P [H·W, heads·d]`` (zero-initialized) to K before the ReLU; the module then takes ``H × W`` maps only.
        None (the default): no encoding, the paper's equation, any map size.
      head_dim: channels per head.
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax's defaults).
    """

    def __init__(self, channels: int, num_heads: int, *, kernel_size: int = 5, qkv_bias: bool = True,
                 input_size: Optional[Window] = None, head_dim: Optional[int] = None, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.head_dim = resolve_head_dim(channels, num_heads, head_dim)
        check_positive(kernel_size=kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the convolution keeps H and W), got {kernel_size}")
        self.channels, self.num_heads = channels, num_heads
        self.input_size = None if input_size is None else window_shape(input_size, "input_size")
        inner = num_heads * self.head_dim
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(channels, 3 * inner, use_bias=qkv_bias, **common)
        self.dwc = nnx.Conv(self.head_dim, self.head_dim, (kernel_size, kernel_size),
                            feature_group_count=self.head_dim, **common)
        if self.input_size is not None:
            self.positional_encoding = nnx.Param(jnp.zeros((self.input_size[0] * self.input_size[1], inner),
                                                           param_dtype))
        self.proj = nnx.Linear(inner, channels, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, _ = x.shape
        qkv = self.qkv(x)
        q, k, v = jnp.split(qkv.reshape(B, H, W, 3 * self.num_heads, self.head_dim), 3, axis=3)
        if self.input_size is not None:
            if (H, W) != self.input_size:
                raise ValueError(f"x is a {H}x{W} map but the position encoding was built for input_size="
                                 f"{self.input_size}")
            k = k + self.positional_encoding[...].astype(k.dtype).reshape(H, W, self.num_heads, self.head_dim)
        o = simplified_linear_attention(q, k, v, self.dwc.kernel[...], self.dwc.bias[...])
        return self.proj(o.reshape(B, H, W, self.num_heads * self.head_dim)).astype(x.dtype)


class SLABBlock(nnx.Module):
    """The SLAB Transformer block (SLAB, fig. 1; official ``SwinTransformerBlock`` with ``attn_type='L'``)::

        x ← x + SLA(PRepBN₁(x))
        x ← x + MLP(PRepBN₂(x))

    with PRepBN (``ProgressiveRepBatchNorm``) in place of LayerNorm. Drive the schedule with
    ``attnjax.nn.normalization.set_progress(model, step)`` in the training step; when it is over
    (``γ = 0``), ``model.eval()`` then ``reparameterize()`` gives the inference block whose norms are plain
    BatchNorms (which a compiler can fold into ``qkv`` and ``fc1``).

    Example::

      block = SLABBlock(96, 3, total_steps=60000, rngs=nnx.Rngs(0))
      y = nnx.jit(lambda m, x, t: (set_progress(m, t), m(x))[1])(block, x, step)   # training
      block.eval(); deployed = block.reparameterize()                             # after the schedule

    Parameters: ``SimplifiedLinearAttention``'s plus ``TransformerMLP``'s plus ``2·(4C + 1)`` (two PRepBNs)
    or ``4C`` (two LayerNorms).

    Args:
      channels, num_heads, kernel_size, qkv_bias, input_size, head_dim: as ``SimplifiedLinearAttention``.
      mlp_ratio: the MLP's hidden units per channel (4).
      norm: one of ``NORMS`` ("prepbn", the paper's).
      total_steps, warmup_steps, initial_step, use_running_average: the PRepBNs' (see
        ``ProgressiveRepBatchNorm``); ``use_running_average`` is the inference mode (``model.eval()`` sets it).
      dtype, param_dtype, rngs: as ``SimplifiedLinearAttention``. Left out: dropout and stochastic depth.
    """

    def __init__(self, channels: int, num_heads: int, *, mlp_ratio: float = 4.0, kernel_size: int = 5,
                 qkv_bias: bool = True, input_size: Optional[Window] = None, head_dim: Optional[int] = None,
                 norm: str = "prepbn", total_steps: int = TOTAL_STEPS, warmup_steps: int = 0, initial_step: int = 0,
                 use_running_average: bool = False, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {describe(norm)}")
        self.channels = channels
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def normalization() -> nnx.Module:
            if norm == "layernorm":
                return nnx.LayerNorm(channels, epsilon=EPSILON, **common)
            return ProgressiveRepBatchNorm(channels, total_steps=total_steps, warmup_steps=warmup_steps,
                                           initial_step=initial_step, use_running_average=use_running_average,
                                           **common)

        self.norm1 = normalization()
        self.attn = SimplifiedLinearAttention(channels, num_heads, kernel_size=kernel_size, qkv_bias=qkv_bias,
                                              input_size=input_size, head_dim=head_dim, **common)
        self.norm2 = normalization()
        self.mlp = TransformerMLP(channels, mlp_ratio=mlp_ratio, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        x = x + self.attn(self.norm1(x).astype(x.dtype))
        return x + self.mlp(self.norm2(x).astype(x.dtype)).astype(x.dtype)

    def reparameterize(self) -> SLABBlock:
        """A copy of this block with each PRepBN replaced by its folded inference BatchNorm
        (``ProgressiveRepBatchNorm.reparameterize``): the same outputs as this block in eval mode once the
        schedule is over; ``ValueError`` before. A LayerNorm block is returned as a copy unchanged."""
        deployed = nnx.clone(self)
        for name in ("norm1", "norm2"):
            layer = getattr(self, name)
            if isinstance(layer, ProgressiveRepBatchNorm):
                setattr(deployed, name, layer.reparameterize())
        return deployed


PAPER = "Guo et al. 2024 (SLAB, ICML)"
register_module(ModuleSpec("slab_attention", SimplifiedLinearAttention,
                           dict(channels=8, num_heads=2, kernel_size=3), (2, 5, 7, 8),
                           kind="image", paper=PAPER + ", sec. 3, SLA"))
# Eval mode mid-schedule (see attnjax/nn/normalization.py): both the LayerNorms and the RepBNs get gradients.
register_module(ModuleSpec("slab_block", SLABBlock, dict(channels=8, num_heads=2, kernel_size=3, total_steps=4,
                                                         initial_step=1, use_running_average=True), (2, 5, 7, 8),
                           kind="image", paper=PAPER))
register_module(ModuleSpec("slab_block_layernorm", SLABBlock, dict(channels=8, num_heads=2, kernel_size=3,
                                                                   norm="layernorm"), (2, 5, 7, 8),
                           kind="image", paper=PAPER))
