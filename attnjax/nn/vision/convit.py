"""ConViT's gated positional self-attention (GPSA) and its Transformer block as Flax NNX modules on NHWC maps.

d'Ascoli et al., "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases" (ICML 2021),
sec. 3 (GPSA, eqs. 5-6; locality initialization, eq. 4). The functional core is ``attnjax.relative.gpsa``. Parameter
names follow the official code (facebookresearch/convit ``convit.py``, ``GPSA``: ``qk``, ``v``, ``proj``, ``pos_proj``,
``gating_param``), so its weights load with a transpose (``pos_proj.kernel = pos_proj.weight.T``; its bias, if any,
is dropped: it adds the same value to every key of a query, which the softmax cancels).

ConViT applies GPSA to the patch tokens of its first 10 blocks (the class token joins afterwards, for plain
self-attention blocks); these modules take the patch grid as an ``[B, H, W, C]`` map (kind "image"), so the grid
shape, needed for the offsets ``r_ij``, is the map's, square or not.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive, describe
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.nn.vision.swin import TransformerMLP
from attnjax.relative.gpsa import LOCALITY_STRENGTH, gpsa_attention, locality_v_pos

LAYER_NORM_EPSILON = 1e-6
"""The LayerNorm epsilon of the official ConViT models (``partial(nn.LayerNorm, eps=1e-6)``)."""

INIT_STD = 0.02
"""The official code's weight initialization, ``trunc_normal_(std=.02)`` (truncated at ±2, i.e. ±100σ: a normal)."""


class GPSA(nnx.Module):
    """Gated positional self-attention (ConViT, sec. 3, eqs. 5-6) on the ``N = H·W`` patches of a map::

        Q, K = split(x W_qk),  V = x W_v
        A^h = (1 − σ(λ_h))·softmax(Q^h K^hᵀ/√d) + σ(λ_h)·softmax(v_pos^hᵀ r),   r_ij = (δx, δy, δx² + δy²)
        y = concat_h(A^h V^h) W_proj + b_proj

    ``A^h`` rows already sum to 1 (the official code's ``attn /= attn.sum(-1)`` is the identity); the core
    ``attnjax.relative.gpsa.gpsa_attention`` runs the two softmaxes blockwise, never an ``[N, N]`` map.

    Initialization (official ``GPSA.__init__`` and ``local_init``, the paper's eq. 4 with ``W_val = I``):
    ``qk`` and ``proj`` kernels ``N(0, 0.02²)``, biases 0; ``v`` the identity; ``gating_param`` ``λ = 1``; with
    ``local_init``, the first ``K² = ⌊√heads⌋²`` heads get ``v_pos^h = α·(2Δx^h, 2Δy^h, −1)`` with centres ``Δ^h`` on
    a ``K × K`` grid around the query (``attnjax.relative.gpsa.locality_offsets``), the other heads ``α·N(0, 0.02²)``.
    The positional attention of head ``h`` then peaks at the offset ``Δ^h``: a soft ``K × K`` convolution.

    Example::

      gpsa = GPSA(432, 9, rngs=nnx.Rngs(0))                     # ConViT-S: 9 heads of 48 channels
      y = gpsa(x)                                                # x, y: [B, 14, 14, 432]

    Parameters: ``3C² + C² + C`` (``qk``, ``v``, ``proj``) ``+ 3C`` with ``qkv_bias`` ``+ 3·heads`` (``pos_proj``)
    ``+ heads`` (``gating_param``).

    Args:
      channels: ``C``, the channels of ``x`` (a multiple of ``num_heads``; ConViT uses 48 per head).
      num_heads: attention heads (4, 9, 16 in ConViT-Ti, -S, -B: squares, so every head gets a centre).
      locality_strength: ``α`` (1 in the paper).
      local_init: the locality initialization of ``v_pos`` and ``v`` (True in ConViT; False leaves ``v_pos``
        ``N(0, 0.02²)``·α and ``v`` ``N(0, 0.02²)``).
      qkv_bias: biases in ``qk`` and ``v`` (False in ConViT).
      implementation: passed to ``attnjax.attention`` for both softmax passes.
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers. Left out: attention and projection dropout (0 in ConViT).
    """

    def __init__(self, channels: int, num_heads: int, *, locality_strength: float = LOCALITY_STRENGTH,
                 local_init: bool = True, qkv_bias: bool = False, implementation: str = "auto",
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, num_heads=num_heads)
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be a multiple of num_heads ({num_heads})")
        if isinstance(locality_strength, bool) or not isinstance(locality_strength, (int, float)) \
                or not locality_strength > 0:
            raise ValueError(f"locality_strength must be a positive number, got {describe(locality_strength)}")
        self.channels, self.num_heads, self.implementation = channels, num_heads, implementation
        self.head_dim = channels // num_heads
        normal, zeros = jax.nn.initializers.normal(INIT_STD), jax.nn.initializers.zeros
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qk = nnx.Linear(channels, 2 * channels, use_bias=qkv_bias, kernel_init=normal, bias_init=zeros,
                             **common)
        self.v = nnx.Linear(channels, channels, use_bias=qkv_bias, kernel_init=identity if local_init else normal,
                            bias_init=zeros, **common)
        self.proj = nnx.Linear(channels, channels, kernel_init=normal, bias_init=zeros, **common)
        self.pos_proj = nnx.Linear(3, num_heads, use_bias=False,
                                   kernel_init=positional_init(num_heads, float(locality_strength), local_init),
                                   **common)
        self.gating_param = nnx.Param(jnp.ones((num_heads,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, C = x.shape
        q, k = jnp.split(self.qk(x).reshape(B, H, W, 2 * self.num_heads, self.head_dim), 2, axis=3)
        v = self.v(x).reshape(B, H, W, self.num_heads, self.head_dim)
        v_pos = self.pos_proj.kernel[...].T.astype(jnp.float32)
        gate = self.gating_param[...].astype(jnp.float32)
        o = gpsa_attention(q, k, v, gate, v_pos, implementation=self.implementation)
        return self.proj(o.reshape(B, H, W, C)).astype(x.dtype)


def identity(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
    """The identity kernel ``[C, C]`` (ConViT's ``W_val = I``, eq. 4; official ``v.weight.data.copy_(eye)``)."""
    return jnp.eye(shape[0], shape[1], dtype=dtype)


def positional_init(num_heads: int, locality_strength: float, local_init: bool):
    """A kernel initializer of ``pos_proj`` (``[3, heads]``, the transpose of ``v_pos``): ``α·N(0, 0.02²)``, with
    the first ``⌊√heads⌋²`` columns set to ``locality_v_pos`` when ``local_init`` (the official ``local_init``)."""

    def init(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
        v_pos = jax.nn.initializers.normal(INIT_STD)(key, (num_heads, 3), jnp.float32)
        if local_init:
            local = locality_v_pos(num_heads, 1.0)
            v_pos = v_pos.at[: local.shape[0]].set(jnp.asarray(local))
        return (locality_strength * v_pos).T.astype(dtype)

    return init


class ConViTBlock(nnx.Module):
    """ConViT's local block (sec. 3, Fig. 1; official ``Block`` with ``use_gpsa=True``), pre-norm with two residuals::

        x ← x + GPSA(LN(x))
        x ← x + MLP(LN(x))

    on the patch map ``[B, H, W, C]``. ConViT stacks 10 of these, then plain self-attention blocks with a class
    token (``attnjax.nn.MultiHeadAttention``).

    Parameters: ``GPSA``'s plus ``4C`` (two LayerNorms) plus ``TransformerMLP``'s ``2·C·E + E + C``,
    ``E = int(mlp_ratio·C)``.

    Args:
      channels, num_heads, locality_strength, local_init, qkv_bias, implementation: as ``GPSA``.
      mlp_ratio: the MLP's hidden units per channel (4 in ConViT).
      dtype, param_dtype, rngs: as ``GPSA`` (LayerNorm epsilon ``1e-6``; the MLP has flax's default initializers,
        not the official ``N(0, 0.02²)``). Left out: dropout and stochastic depth.
    """

    def __init__(self, channels: int, num_heads: int, *, mlp_ratio: float = 4.0,
                 locality_strength: float = LOCALITY_STRENGTH, local_init: bool = True, qkv_bias: bool = False,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(channels=channels)
        self.channels = channels
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.attn = GPSA(channels, num_heads, locality_strength=locality_strength, local_init=local_init,
                         qkv_bias=qkv_bias, implementation=implementation, **common)
        self.norm2 = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.mlp = TransformerMLP(channels, mlp_ratio=mlp_ratio, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        x = x + self.attn(self.norm1(x).astype(x.dtype))
        return x + self.mlp(self.norm2(x)).astype(x.dtype)


PAPER = "d'Ascoli et al. 2021 (ConViT, ICML), gated positional self-attention"
register_module(ModuleSpec("gpsa", GPSA, dict(channels=16, num_heads=4), (2, 5, 7, 16), kind="image", paper=PAPER))
register_module(ModuleSpec("convit_block", ConViTBlock, dict(channels=16, num_heads=4), (2, 5, 7, 16), kind="image",
                           paper=PAPER))
