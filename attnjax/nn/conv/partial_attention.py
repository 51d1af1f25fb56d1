"""PAT, partial visual attention, as Flax NNX modules on NHWC feature maps (functional core:
``attnjax.vision.partial_attention``).

Huang et al., "Partial Convolution Meets Visual Attention" (PATNet, arXiv:2503.03148, 2025); details the
block descriptions leave open follow the authors' official code (github.com/haiduo/PartialNet, ``models/partialnet.py``,
which also holds the PAT blocks of their PartialNet paper, arXiv:2502.01303). ``PartialChannelAttention`` is
PAT_ch's token mixer, ``PartialSelfAttention`` PAT_sf's, ``PartialSpatialAttention`` PAT_sp (the end of the
MLP), and ``PATBlock`` the residual PATNet block that puts them together.

BatchNorm (``norm="batch"``, the paper's) follows flax's convention: batch statistics while training, running
averages with ``use_running_average=True`` or after ``model.eval()`` (``nnx.BatchNorm.use_running_average``);
``norm="none"`` drops every BatchNorm for a stateless module.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.partial_attention import (partial_channel_attention, partial_self_attention,
                                              partial_spatial_attention, relative_position_bias, rpe_bucket_count)

NORMS = ("batch", "none")
"""``"batch"``: BatchNorm where the paper's code has it; ``"none"``: the identity there (no state)."""

MIXERS = ("channel", "self")
"""``PATBlock``'s token mixer: PAT_ch (stages 1-3 of PATNet) or PAT_sf (the last stage)."""

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu}
"""The MLP's activation: ReLU in the released T2/S/M/L configurations, GELU in T0/T1."""

BATCH_NORM_MOMENTUM = 0.9
"""flax's ``momentum`` for PyTorch's default running-average update (``momentum=0.1`` there)."""


def split_sizes(channels: int, n_div: int) -> tuple[int, int]:
    """``(C // n_div, C - C // n_div)``: the convolved and the attended channels, both nonempty."""
    check_positive(channels=channels, n_div=n_div)
    if n_div < 2 or channels < n_div:
        raise ValueError(f"n_div must be at least 2 and at most channels ({channels}), got {n_div}: both parts "
                         "of the channel split must be nonempty")
    return channels // n_div, channels - channels // n_div


def check_norm(norm: str) -> None:
    """``ValueError`` unless ``norm`` is one of ``NORMS``."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def batch_norm(features: int, norm: str, use_running_average: bool, dtype: Optional[Dtype], param_dtype: Dtype,
               rngs: nnx.Rngs) -> Optional[nnx.BatchNorm]:
    """An ``nnx.BatchNorm`` with PyTorch's defaults (``eps = 1e-5``, running-average momentum 0.1, two-pass
    variance) when ``norm`` is ``"batch"``, else ``None`` (the identity)."""
    check_norm(norm)
    if norm == "none":
        return None
    return nnx.BatchNorm(features, use_running_average=use_running_average, momentum=BATCH_NORM_MOMENTUM,
                         use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def check_spatial(name: str, x: jax.Array) -> None:
    """``ValueError`` unless ``x`` has at least two positions (PAT_ch's standard deviation needs ``H·W >= 2``)."""
    if x.shape[1] * x.shape[2] < 2:
        raise ValueError(f"{name} must have at least 2 positions (H·W >= 2) for the channel standard deviation, "
                         f"got {list(x.shape)}")


class PartialChannelAttention(nnx.Module):
    """PAT_ch's token mixer: ``[Conv3×3(x₁), BN(x₂ ⊙ HardSigmoid(BN(W [μ(x₂); σ(x₂)])))]`` (Huang et al. 2025,
    PAT_ch; the official ``Partial_conv3`` with ``channel_type='se'`` and ``SRM``).

    PConv convolves the first ``C₁ = C // n_div`` channels; the other ``C₂ = C - C₁`` get the enhanced Gaussian
    channel attention: each channel's mean and standard deviation over the positions, mixed across all
    channels by ``W [2C₂, C₂]``, normalized, through a Hard-Sigmoid, scale the channel.

    Example::

      mixer = PartialChannelAttention(64, rngs=nnx.Rngs(0))
      y = mixer(x)                                   # x, y: [B, H, W, 64], H·W >= 2

    Parameters: ``9·C₁² + 2·C₂²`` weights, plus ``4·C₂`` BatchNorm scales and biases with ``norm="batch"``.

    Args:
      channels: ``C``.
      n_div: the split, ``C₁ = C // n_div`` (4 in the paper: a quarter of the channels convolved).
      norm: "batch" (the official code's two BatchNorms) or "none".
      use_running_average: BatchNorm's mode at construction: batch statistics (``False``, training) or running
        averages (``True``, inference); ``model.train()`` / ``model.eval()`` switch it later.
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the convolution and ``W`` (flax's defaults).
    """

    def __init__(self, channels: int, *, n_div: int = 4, norm: str = "batch", use_running_average: bool = False,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_norm(norm)
        c1, c2 = split_sizes(channels, n_div)
        self.channels = channels
        self.conv = nnx.Conv(c1, c1, (3, 3), use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = nnx.Linear(2 * c2, c2, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_norm = batch_norm(c2, norm, use_running_average, dtype, param_dtype, rngs)
        self.norm = batch_norm(c2, norm, use_running_average, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        check_spatial("x", x)
        return partial_channel_attention(x, self.conv.kernel[...], self.gate.kernel[...], gate_norm=self.gate_norm,
                                         out_norm=self.norm)


class PartialSpatialAttention(nnx.Module):
    """PAT_sp: ``[BN(x₁ ⊙ HardSigmoid(x₁ · w)), Conv1×1(BN(x₂))]`` (Huang et al. 2025, PAT_sp; the official
    ``partial_spatial_attn_layer_reverse``), the last layer of a PATNet block's MLP.

    The first ``C - C // n_div`` channels are gated by one spatial map from a 1×1 convolution ``w``; the last
    ``C₂ = C // n_div`` go through a 1×1 convolution ``W [C₂, C₂]`` (which the paper merges with the MLP's
    preceding 1×1 convolution at inference).

    Parameters: ``(C - C₂) + C₂²`` weights, plus ``2·C`` BatchNorm scales and biases with ``norm="batch"``.

    Args:
      channels: ``C``.
      n_div: the split, ``C₂ = C // n_div`` (2 in the paper: half and half).
      norm, use_running_average, dtype, param_dtype, rngs: as ``PartialChannelAttention``.
    """

    def __init__(self, channels: int, *, n_div: int = 2, norm: str = "batch", use_running_average: bool = False,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_norm(norm)
        c2, c1 = split_sizes(channels, n_div)
        self.channels = channels
        self.attn = nnx.Conv(c1, 1, (1, 1), use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = batch_norm(c1, norm, use_running_average, dtype, param_dtype, rngs)
        self.conv_norm = batch_norm(c2, norm, use_running_average, dtype, param_dtype, rngs)
        self.conv = nnx.Conv(c2, c2, (1, 1), use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        return partial_spatial_attention(x, self.attn.kernel[...][0, 0, :, 0], self.conv.kernel[...][0, 0],
                                         attn_norm=self.attn_norm, conv_norm=self.conv_norm)


class PartialSelfAttention(nnx.Module):
    """PAT_sf's token mixer: ``[Conv3×3(x₁), MHSA(LN(x₂))]`` (Huang et al. 2025, PAT_sf; the official
    ``Partial_conv3`` with ``channel_type='self'`` and ``RPEAttention``).

    The first ``C₁ = C // n_div`` channels are convolved; the other ``C₂ = C - C₁`` are layer-normalized over
    channels and attend over all ``H·W`` positions (``attnjax.attention``, scale ``1/√(C₂/heads)``), with a
    learned iRPE bias ``table[h, bucket(‖p_i - p_j‖)]`` on the logits (Wu et al. 2021; Euclidean buckets,
    ``α, β, γ = 20, 40, 160`` as in the official ``get_rpe_config(ratio=20, method="euc", mode="bias")``).
    The bias is a dense ``[heads, H·W, H·W]`` array (PAT_sf runs at the last, smallest stage).

    Parameters: ``9·C₁² + 4·C₂² + C₂`` (convolution, ``W_qkv`` without bias, projection with bias), ``2·C₂``
    (LayerNorm), ``heads·(2⌊2·rpe_ratio⌋ + 1)`` (the iRPE table, initialized to 0) with ``relative_position``.

    Args:
      channels: ``C``.
      n_div: the split, ``C₁ = C // n_div`` (4 in the paper).
      num_heads: heads over ``C₂`` channels (4 in the official code's released models); ``C₂ % num_heads == 0``.
      relative_position: add the iRPE bias (the official code's); ``False`` for plain self-attention.
      rpe_ratio: iRPE's ``α = ratio``, ``β = 2·ratio``, ``γ = 8·ratio`` (20 in the official code).
      dtype, param_dtype: as ``PartialChannelAttention``.
      rngs: ``params`` initializes the convolution and projections (flax's defaults).

    The official attention and projection dropout (0.1 each) is left out: wrap the module to regularize.
    """

    def __init__(self, channels: int, *, n_div: int = 4, num_heads: int = 4, relative_position: bool = True,
                 rpe_ratio: float = 20.0, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        c1, c2 = split_sizes(channels, n_div)
        check_positive(num_heads=num_heads)
        if c2 % num_heads:
            raise ValueError(f"the attended channels C - C // n_div = {c2} must be a multiple of num_heads "
                             f"({num_heads})")
        if not rpe_ratio > 0:
            raise ValueError(f"rpe_ratio must be positive, got {rpe_ratio!r}")
        self.channels, self.num_heads, self.rpe_ratio = channels, num_heads, float(rpe_ratio)
        self.conv = nnx.Conv(c1, c1, (3, 3), use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(c2, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(c2, 3 * c2, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = nnx.Linear(c2, c2, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.rpe = (nnx.Param(jnp.zeros((num_heads, rpe_bucket_count(self.rpe_ratio)), param_dtype))
                    if relative_position else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        bias = None if self.rpe is None else relative_position_bias(self.rpe[...], x.shape[1], x.shape[2],
                                                                    self.rpe_ratio)
        if is_capturing():  # multi_head_self_attention's q, k over the H·W positions of LN(x₂), the iRPE bias
            B, H, W, C = x.shape
            x2 = self.norm(x[..., C - self.norm.num_features:]).astype(x.dtype).reshape(B, H * W, -1)
            qkv = (x2 @ self.qkv.kernel[...].astype(x.dtype)).reshape(B, H * W, 3, self.num_heads, -1)
            sow_attention_inputs(self, qkv[:, :, 0], qkv[:, :, 1], mask=None, bias=bias, scale=None,
                                 mechanism="softmax")
        proj_bias = None if self.proj.bias is None else self.proj.bias[...]
        return partial_self_attention(x, self.conv.kernel[...], self.qkv.kernel[...], self.proj.kernel[...],
                                      proj_bias, self.num_heads, norm=self.norm, bias=bias)


class PATBlock(nnx.Module):
    """A PATNet block: a partial token mixer, then the MLP ``Conv1×1 -> BN -> act -> Conv1×1 [-> PAT_sp]``, with
    residual connections (Huang et al. 2025, the PATNet block of its architecture figure; the official
    ``MLPBlock``).

    * ``mixer="channel"`` (PAT_ch, stages 1-3): ``y = x + MLP(PAT_ch(x))`` (the mixer sits inside the residual
      branch, as FasterNet's PConv).
    * ``mixer="self"`` (PAT_sf, the last stage): ``z = x + PAT_sf(x)``, ``y = z + MLP(z)``.

    Example::

      block = PATBlock(64, rngs=nnx.Rngs(0))                  # PAT_ch + PAT_sp
      last = PATBlock(512, mixer="self", rngs=nnx.Rngs(0))    # PAT_sf + PAT_sp
      y = block(x)                                            # x, y: [B, H, W, 64]

    Parameters: the mixer's, ``2·r·C²`` (the MLP's convolutions, no bias) and ``2·r·C`` (its BatchNorm), and
    PAT_sp's with ``spatial``.

    Args:
      channels: ``C``.
      mixer: "channel" (PAT_ch) or "self" (PAT_sf).
      spatial: end the MLP with PAT_sp (the paper's PATNet; the released configurations mostly switch it off).
      mlp_ratio: ``r``, the MLP's hidden width ``int(r·C)`` (2 in the paper).
      n_div: the mixer's split (4); num_heads: PAT_sf's heads (4).
      activation: "relu" (the released T2/S/M/L configurations) or "gelu" (T0/T1).
      norm, use_running_average, dtype, param_dtype, rngs: as ``PartialChannelAttention`` (also for the MLP's
        BatchNorm).

    Layer scale and stochastic depth (off, resp. training-only, in the released models) are left out. With
    ``mixer="channel"`` and BatchNorm, PAT_ch's last BatchNorm bias is followed by the MLP's 1×1 convolution and
    BatchNorm, which remove a per-channel shift: in training it gets a zero gradient (so in the official code).
    """

    def __init__(self, channels: int, *, mixer: str = "channel", spatial: bool = True, mlp_ratio: float = 2.0,
                 n_div: int = 4, num_heads: int = 4, activation: str = "relu", norm: str = "batch",
                 use_running_average: bool = False, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        check_norm(norm)
        check_positive(channels=channels)
        hidden = int(mlp_ratio * channels)
        check_positive(hidden=hidden)
        self.channels, self.mixer_kind, self.activation = channels, mixer, activation
        if mixer == "channel":
            self.mixer = PartialChannelAttention(channels, n_div=n_div, norm=norm,
                                                 use_running_average=use_running_average, dtype=dtype,
                                                 param_dtype=param_dtype, rngs=rngs)
        else:
            self.mixer = PartialSelfAttention(channels, n_div=n_div, num_heads=num_heads, dtype=dtype,
                                              param_dtype=param_dtype, rngs=rngs)
        self.fc1 = nnx.Conv(channels, hidden, (1, 1), use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = batch_norm(hidden, norm, use_running_average, dtype, param_dtype, rngs)
        self.fc2 = nnx.Conv(hidden, channels, (1, 1), use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.spatial = (PartialSpatialAttention(channels, norm=norm, use_running_average=use_running_average,
                                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                        if spatial else None)

    def mlp(self, x: jax.Array) -> jax.Array:
        """The block's MLP ``[B, H, W, C] -> [B, H, W, C]``."""
        h = self.fc1(x)
        h = ACTIVATIONS[self.activation](h if self.mlp_norm is None else self.mlp_norm(h))
        h = self.fc2(h)
        return (h if self.spatial is None else self.spatial(h)).astype(x.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        if self.mixer_kind == "self":
            x = x + self.mixer(x)
            return x + self.mlp(x)
        return x + self.mlp(self.mixer(x))


PAPER = "Huang et al. 2025, Partial Convolution Meets Visual Attention (PATNet), arXiv:2503.03148"
# BatchNorm on running averages (inference mode): the conformance suite traces the example module with
# jax.eval_shape, where a training-mode BatchNorm can't write its batch statistics. Training mode is checked
# against the reference formula in tests/nn/conv/test_partial_attention.py.
EVAL = dict(use_running_average=True)
register_module(ModuleSpec("pat_ch", PartialChannelAttention, dict(channels=16, **EVAL), (2, 5, 6, 16),
                           kind="image", paper=PAPER))
register_module(ModuleSpec("pat_sp", PartialSpatialAttention, dict(channels=16, **EVAL), (2, 5, 6, 16),
                           kind="image", paper=PAPER))
register_module(ModuleSpec("pat_sf", PartialSelfAttention, dict(channels=16), (2, 5, 6, 16), kind="image",
                           paper=PAPER))
register_module(ModuleSpec("pat_block", PATBlock, dict(channels=16, **EVAL), (2, 5, 6, 16), kind="image",
                           paper=PAPER))
