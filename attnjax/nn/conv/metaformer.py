"""PoolFormer's pooling token mixer and the MetaFormer block on NHWC feature maps (functional core of the mixer:
``attnjax.vision.pooling_mixer``).

Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022. The block (eqs. 2-3)
``Y = X + γ₁ ⊙ TokenMixer(Norm(X))``, ``Z = Y + γ₂ ⊙ σ(Norm(Y) W₁) W₂`` takes any token mixer of this library:
an image module ``[B, H, W, C] -> [B, H, W, C]`` (``PoolingMixer``, ``LargeKernelAttention``, ``SqueezeExcite``,
...) or a token-mixing layer ``[B, T, d] -> [B, T, d]`` of ``attnjax.nn`` (``MultiHeadAttention``, ...) called on
the ``H·W`` tokens. Parameter names follow the official code (sail-sg/poolformer, ``models/poolformer.py``,
``PoolFormerBlock``: ``norm1``, ``token_mixer``, ``norm2``, ``layer_scale_1``, ``layer_scale_2``; its
``mlp.fc1``/``mlp.fc2`` ``1×1`` convolutions are the ``nnx.Linear`` layers ``fc1``/``fc2`` here).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive, describe
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, modules, register_module
from attnjax.vision.pooling_mixer import check_pool_size, pooling_mixer

MIXER_INPUTS = ("image", "tokens")
"""What ``MetaFormerBlock`` hands its token mixer: the feature map ``[B, H, W, C]`` or its tokens ``[B, H·W, C]``."""

NORMS = ("group", "layer")
"""``MetaFormerBlock``'s norms: GroupNorm with one group (over ``H, W, C``, PoolFormer's choice) or LayerNorm over
``C`` (the official code's ``LayerNormChannel``)."""

MixerFactory = Callable[..., Any]
"""``(channels, *, rngs) -> mixer``: builds a ``MetaFormerBlock``'s token mixer, e.g. a module class of this
library (``LargeKernelAttention``) or ``functools.partial(MultiHeadAttention, num_heads=4)``."""


class PoolingMixer:
    """PoolFormer's token mixer ``y = AvgPool(x) − x`` (Yu et al. 2022, eq. 4): ``pool_size × pool_size``
    average pooling, stride 1, padding ``pool_size // 2``, averaging over the positions inside the image only
    (``count_include_pad=False``, as the official code). ``x [B, H, W, C] -> [B, H, W, C]``.

    It has no parameters, so it is a plain callable rather than an ``nnx.Module``; as an attribute of a block it
    is static (part of the graph definition, equal by ``channels`` and ``pool_size``). Its constructor is a ``MixerFactory``, so
    ``MetaFormerBlock(C, mixer=PoolingMixer, ...)`` is PoolFormer's block; ``rngs`` is accepted and unused.

    Args:
      channels: ``C``, the channels of ``x``.
      pool_size: the window (3 in the paper); odd, so ``H`` and ``W`` are kept.
      rngs: unused (the factory signature).
    """

    def __init__(self, channels: int, *, pool_size: int = 3, rngs: Optional[nnx.Rngs] = None):
        check_positive(channels=channels)
        check_pool_size(pool_size)
        self.channels, self.pool_size = channels, pool_size

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        return pooling_mixer(x, self.pool_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PoolingMixer) and (other.channels, other.pool_size) == (self.channels,
                                                                                           self.pool_size)

    def __hash__(self) -> int:
        return hash((PoolingMixer, self.channels, self.pool_size))

    def __repr__(self) -> str:
        return f"PoolingMixer(channels={self.channels}, pool_size={self.pool_size})"


def mixes_tokens(mixer: Any) -> bool:
    """Whether ``mixer`` is a token mixer ``[B, T, d] -> [B, T, d]``: an instance of a module registered with
    kind "layer" or "block" (``attnjax.nn.registry``)."""
    token_mixers = tuple(spec.module for spec in modules() if spec.kind in ("layer", "block"))
    return isinstance(mixer, token_mixers)


class MetaFormerBlock(nnx.Module):
    """The MetaFormer block (Yu et al. 2022, eqs. 2-3, with LayerScale as the official code):

    ``Y = X + γ₁ ⊙ TokenMixer(Norm₁(X))``,  ``Z = Y + γ₂ ⊙ GELU(Norm₂(Y) W₁ + b₁) W₂ + b₂``,

    with ``γ₁, γ₂ [C]`` learnable (LayerScale, Touvron et al. 2021, initialized to ``layer_scale_init``),
    ``W₁ [C, r·C]``, ``W₂ [r·C, C]`` the channel MLP (``1×1`` convolutions), exact (erf) GELU. With the default
    ``PoolingMixer`` it is PoolFormer's block.

    The token mixer is built by the block from a factory, ``mixer(channels, rngs=rngs)``, so it initializes
    from the block's ``rngs`` like every other layer (also under the Linen bridge, ``nnx.eval_shape`` and an
    orbax restore, which rebuild the block) and is never shared between blocks. An image mixer gets the
    normalized feature map ``[B, H, W, C]``; a token mixer (``mixer_input="tokens"``) gets its ``H·W`` tokens
    ``[B, H·W, C]`` in row-major order and is called ``mixer(tokens)``: full, non-causal mixing with any
    ``attnjax.nn`` layer's defaults (e.g. ``MultiHeadAttention``'s softmax attention without a mask).

    Example::

      poolformer = MetaFormerBlock(64, rngs=nnx.Rngs(0))                             # PoolFormer
      van_like = MetaFormerBlock(64, mixer=LargeKernelAttention, rngs=nnx.Rngs(0))
      vit_like = MetaFormerBlock(64, mixer=functools.partial(MultiHeadAttention, num_heads=4), norm="layer",
                                 rngs=nnx.Rngs(0))
      z = poolformer(x)                                                              # x, z: [B, H, W, 64]

    Parameters: the mixer's, ``4C`` for the norms (``2C`` without ``norm_bias``), ``2·r·C² + r·C + C`` for the
    MLP and ``2C`` for LayerScale.

    Args:
      channels: ``C``, the channels of ``x``.
      mixer: a ``MixerFactory`` ``(channels, *, rngs) -> mixer`` (default ``PoolingMixer``); not a built module.
      mixer_input: "image" or "tokens"; default: "tokens" for a mixer whose class is registered as a "layer" or
        "block" (``MultiHeadAttention`` and the other ``attnjax.nn`` layers), else "image".
      norm: "group" (GroupNorm with one group, PoolFormer's default) or "layer" (LayerNorm over channels).
      mlp_ratio: ``r``; the MLP has ``int(r·C)`` hidden units (4 in the paper).
      layer_scale_init: the initial ``γ`` (1e-5, the official code's ``layer_scale_init_value``), or ``None`` for
        no LayerScale (``use_layer_scale=False`` there).
      norm_epsilon: the norms' ``ε`` (1e-5, PyTorch's default that the official code uses).
      norm_bias: the norms' shift ``β`` (the official code has it). Before ``PoolingMixer`` the shift of
        ``Norm₁`` does nothing: ``AvgPool(c) − c = 0`` for a map ``c`` constant over ``H, W``, so its gradient is
        exactly zero; PoolFormerV2 (Yu et al., "MetaFormer Baselines for Vision", 2023; timm's
        ``GroupNorm1NoBias``) has no shift.
      dtype: computation dtype of the norms and the MLP; param_dtype: their parameter dtype. The output takes
        ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax's defaults) and is passed to ``mixer``.
    """

    def __init__(self, channels: int, mixer: MixerFactory = PoolingMixer, *, mixer_input: Optional[str] = None,
                 norm: str = "group", mlp_ratio: float = 4.0, layer_scale_init: Optional[float] = 1e-5,
                 norm_epsilon: float = 1e-5, norm_bias: bool = True, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        factory = ("a factory (channels, *, rngs) -> module, e.g. the class LargeKernelAttention or "
                   "functools.partial(MultiHeadAttention, num_heads=4)")
        if isinstance(mixer, nnx.Module):
            raise TypeError(f"mixer must be {factory}, not a built module (got a {type(mixer).__name__}); the "
                            "block builds its mixer with its own rngs")
        if not callable(mixer):
            raise TypeError(f"mixer must be {factory}, got {describe(mixer)}")
        if mixer_input is not None and mixer_input not in MIXER_INPUTS:
            raise ValueError(f"mixer_input must be one of {MIXER_INPUTS} or None, got {mixer_input!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or int(channels * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must be a number with int(mlp_ratio * channels) >= 1, got "
                             f"{describe(mlp_ratio)} for channels={channels}")
        if layer_scale_init is not None and (isinstance(layer_scale_init, bool)
                                             or not isinstance(layer_scale_init, (int, float))):
            raise TypeError(f"layer_scale_init must be a float or None, got {describe(layer_scale_init)}")
        self.channels = channels
        self.token_mixer = mixer(channels, rngs=rngs)
        self.mixer_input = mixer_input or ("tokens" if mixes_tokens(self.token_mixer) else "image")
        layers = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norms = dict(epsilon=norm_epsilon, use_bias=norm_bias, **layers)
        if norm == "group":
            self.norm1 = nnx.GroupNorm(channels, num_groups=1, **norms)
            self.norm2 = nnx.GroupNorm(channels, num_groups=1, **norms)
        else:
            self.norm1 = nnx.LayerNorm(channels, **norms)
            self.norm2 = nnx.LayerNorm(channels, **norms)
        hidden = int(channels * mlp_ratio)
        self.fc1 = nnx.Linear(channels, hidden, **layers)
        self.fc2 = nnx.Linear(hidden, channels, **layers)
        if layer_scale_init is None:
            self.layer_scale_1 = self.layer_scale_2 = None
        else:
            self.layer_scale_1 = nnx.Param(jnp.full((channels,), layer_scale_init, param_dtype))
            self.layer_scale_2 = nnx.Param(jnp.full((channels,), layer_scale_init, param_dtype))

    def mix(self, x: jax.Array) -> jax.Array:
        """The token mixer on the (normalized) feature map ``x [B, H, W, C]``, on its ``H·W`` tokens when
        ``mixer_input`` is "tokens". Returns ``[B, H, W, C]``."""
        if self.mixer_input == "image":
            return self.token_mixer(x)
        b, h, w, c = x.shape
        return self.token_mixer(x.reshape(b, h * w, c)).reshape(b, h, w, c)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        y = x + scaled(self.layer_scale_1, self.mix(self.norm1(x)))
        z = y + scaled(self.layer_scale_2, self.fc2(jax.nn.gelu(self.fc1(self.norm2(y)), approximate=False)))
        return z.astype(x.dtype)


def scaled(gamma: Optional[nnx.Param], x: jax.Array) -> jax.Array:
    """LayerScale ``γ ⊙ x`` over the last axis (``x`` itself when ``γ`` is ``None``)."""
    return x if gamma is None else gamma[...] * x


PAPER = "Yu et al. 2022 (MetaFormer Is Actually What You Need for Vision), eqs. 2-4"
# norm_bias=False: with the pooling mixer the default block's norm1 shift has an exactly zero gradient (see
# MetaFormerBlock), which the conformance suite's every-parameter-gets-a-gradient check would pass on rounding
# noise only; tests/nn/conv/test_metaformer.py checks the default configuration against the paper's formula.
register_module(ModuleSpec("metaformer_pool", MetaFormerBlock, dict(channels=16, norm_bias=False), (2, 5, 6, 16),
                           kind="image", paper=PAPER + "; without norm shifts as PoolFormerV2 (Yu et al. 2023)"))
register_module(ModuleSpec("metaformer_attention", MetaFormerBlock,
                           dict(channels=16, mixer=functools.partial(MultiHeadAttention, num_heads=2)),
                           (2, 5, 6, 16), kind="image", paper=PAPER))
