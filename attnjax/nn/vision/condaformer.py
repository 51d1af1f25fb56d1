"""The ConDaFormer block as a Flax NNX module on a dense voxel grid ``[B, F, H, W, C]`` (functional core:
``attnjax.vision.condaformer``).

Duan et al., "ConDaFormer: Disassembled Transformer with Local Structure Enhancement for 3D Point Cloud
Understanding", NeurIPS 2023; official code LHDuan/ConDaFormer, ``pcr/models/condaformer/modules.py``
(``BasicBlock_Attention``, ``Window_Attention``). The paper's block runs on sparse voxels with submanifold sparse
convolutions (``spconv.SubMConv3d``); on a dense grid every site is active, so a submanifold convolution is an
ordinary zero-padded 3-D convolution, which this module uses.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_features
from attnjax.nn.conv.partial_attention import batch_norm, check_norm
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.condaformer import condaformer_attention

LAYER_NORM_EPSILON = 1e-6
"""The block's LayerNorm epsilon (the official ``norm_fn_ln``)."""


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's ``nn.GELU`` default: the exact (erf) GELU."""
    return jax.nn.gelu(x, approximate=False)


def check_grid(name: str, x: jax.Array, channels: int) -> None:
    """``TypeError`` unless ``x`` is floating point, ``ValueError`` unless it is a dense voxel grid
    ``[batch, depth, height, width, channels]``."""
    check_features(name, x)
    if x.ndim != 5 or x.shape[-1] != channels:
        raise ValueError(f"{name} must have shape [batch, depth, height, width, {channels}], got {list(x.shape)}")


def apply(norm: Optional[nnx.Module], x: jax.Array) -> jax.Array:
    """``norm(x)``, or ``x`` when the normalization is off (``norm="none"``)."""
    return x if norm is None else norm(x)


class LocalStructureEnhancement(nnx.Module):
    """ConDaFormer's local structure enhancement (LSE), used before and after the attention::

        LSE(x) = [ BN(W₁ x),  BN(W₂ GELU(BN(DWConv₃(x)))) ]       # C/2 + C/2 = C channels

    ``W₁`` is the official 1×1×1 sparse convolution (``conv_1``: ``C -> C/2``, no bias), ``DWConv₃`` its 3×3×3
    depthwise sparse convolution (``conv_3``, no bias) followed by a linear ``W₂: C -> C/2``; the two halves
    are concatenated (``get_qkv_from_inp`` / ``get_feat_from_attn``). The depthwise convolution gives the local
    geometric prior and the context that the three plane attentions leave out (abstract).

    Parameters: ``C²`` weights and ``27·C`` depthwise weights, plus ``4·C`` BatchNorm scales and shifts with
    ``norm="batch"`` (``W₂`` has no bias there: BatchNorm's mean removes it) or ``C/2`` biases of ``W₂`` with
    ``norm="none"``.

    Args:
      channels: ``C`` (even).
      norm: "batch" (the official BatchNorms, PyTorch's defaults) or "none" (the identity: no state).
      use_running_average: BatchNorm's mode at construction (``model.train()`` / ``model.eval()`` switch it).
      dtype, param_dtype: computation and parameter dtypes.
      rngs: ``params`` initializes the layers (flax defaults).
    """

    def __init__(self, channels: int, *, norm: str = "batch", use_running_average: bool = False,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        check_norm(norm)
        if channels % 2:
            raise ValueError(f"channels must be even (two halves of C/2), got {channels}")
        half = channels // 2
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.point = nnx.Linear(channels, half, use_bias=False, **common)
        self.point_norm = batch_norm(half, norm, use_running_average, dtype, param_dtype, rngs)
        self.depthwise = nnx.Conv(channels, channels, (3, 3, 3), feature_group_count=channels, use_bias=False,
                                  **common)
        self.depthwise_norm = batch_norm(channels, norm, use_running_average, dtype, param_dtype, rngs)
        self.mix = nnx.Linear(channels, half, use_bias=norm == "none", **common)
        self.mix_norm = batch_norm(half, norm, use_running_average, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, F, H, W, C] -> [B, F, H, W, C]``."""
        local = self.mix(gelu(apply(self.depthwise_norm, self.depthwise(x))))
        return jnp.concatenate([apply(self.point_norm, self.point(x)), apply(self.mix_norm, local)], axis=-1)


class ConDaFormerBlock(nnx.Module):
    """The ConDaFormer block (official ``BasicBlock_Attention``) on a dense voxel grid::

        x ← x + Proj(LSE_post(DaAttn(QKV(LSE_pre(LN(x))))))
        x ← x + FC₂(GELU(FC₁(LN(x))))

    ``DaAttn`` is the disassembled window attention of ``attnjax.vision.condaformer.condaformer_attention``: the
    ``C / head_dim`` heads in three groups, each within the ``w × w`` plane windows of one orientation (xy, xz,
    yz of the cube; grid ``(F, H, W) = (z, y, x)``), logits scaled by ``head_dim^{−1/2}``, with the contextual
    relative position tables ``q_table``, ``k_table``, ``v_table`` ``[2w − 1, 3, heads/3, head_dim]`` shared by the
    groups (the official code asserts all three on). ``LSE`` is ``LocalStructureEnhancement``. ConDaFormer
    alternates ``shift=False`` and ``shift=True`` blocks (windows moved by ``⌊w/2⌋``, not wrapped).

    Example::

      block = ConDaFormerBlock(48, window_size=4, rngs=nnx.Rngs(0))     # 3 heads of 16: one per plane
      y = block(x)                                                      # x, y: [B, F, H, W, 48]

    Parameters (``norm="batch"``, ``M = mlp_ratio·C``): ``2·(C² + 27C + 4C)`` (two LSEs) ``+ 3C² + 3C`` (QKV)
    ``+ 3·(2w − 1)·C`` (tables) ``+ C² + C`` (Proj) ``+ 2C·M + M + C`` (MLP) ``+ 4C`` (two LayerNorms).

    Choices, following the official code where the paper leaves it open: LayerNorm epsilon 1e-6, exact GELU,
    PyTorch's BatchNorm defaults, tables initialized ``N(0, 0.02²)`` truncated at two standard deviations, the
    other layers flax's defaults. On a dense grid the relative positions step one voxel (tables of ``2w − 1``
    entries; the official ``quant_size`` subdivides voxels of continuous point coordinates). Left out: drop path
    and dropout (0 at inference), the sparse tensor bookkeeping, the down/up-sampling stages.

    Args:
      channels: ``C``, a multiple of ``head_dim`` with ``C / head_dim`` a multiple of 3, and even.
      head_dim: channels per head (16 in the official models).
      window_size: ``w``, the cube's edge (the official default 4; 10 in its ScanNet configuration).
      shift: move the windows by ``⌊w/2⌋`` (the official odd blocks).
      mlp_ratio: the MLP's hidden width over ``C`` (4).
      norm: "batch" (the official LSE BatchNorms) or "none" (a stateless block).
      use_running_average: the BatchNorms' mode at construction (``model.train()`` / ``model.eval()``).
      dtype, param_dtype: computation and parameter dtypes; the output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers.
    """

    def __init__(self, channels: int, *, head_dim: int = 16, window_size: int = 4, shift: bool = False,
                 mlp_ratio: float = 4.0, norm: str = "batch", use_running_average: bool = False,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, head_dim=head_dim, window_size=window_size)
        if channels % head_dim or (channels // head_dim) % 3:
            raise ValueError(f"channels ({channels}) must be head_dim ({head_dim}) times a multiple of 3 "
                             "(one group of heads per plane orientation)")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        self.channels, self.head_dim, self.num_heads = channels, head_dim, channels // head_dim
        self.window_size, self.shift = window_size, bool(shift)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = int(channels * mlp_ratio)
        self.norm1 = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.pre = LocalStructureEnhancement(channels, norm=norm, use_running_average=use_running_average, **common)
        self.qkv = nnx.Linear(channels, 3 * channels, **common)
        init = jax.nn.initializers.truncated_normal(0.02)
        shape = (2 * window_size - 1, 3, self.num_heads // 3, head_dim)
        self.q_table, self.k_table, self.v_table = (nnx.Param(init(rngs.params(), shape, param_dtype))
                                                    for _ in range(3))
        self.post = LocalStructureEnhancement(channels, norm=norm, use_running_average=use_running_average, **common)
        self.proj = nnx.Linear(channels, channels, **common)
        self.norm2 = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.fc1 = nnx.Linear(channels, hidden, **common)
        self.fc2 = nnx.Linear(hidden, channels, **common)

    def attend(self, x: jax.Array) -> jax.Array:
        """The attention branch ``Proj(LSE_post(DaAttn(QKV(LSE_pre(x)))))`` on a normalized grid."""
        B, F, H, W, C = x.shape
        qkv = self.qkv(self.pre(x)).reshape(B, F, H, W, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        tables = tuple(t[...].astype(q.dtype) for t in (self.q_table, self.k_table, self.v_table))
        out = condaformer_attention(q, k, v, self.window_size, shift=self.shift, tables=tables)
        return self.proj(self.post(out.reshape(B, F, H, W, C)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, F, H, W, C] -> [B, F, H, W, C]``."""
        check_grid("x", x, self.channels)
        x = x + self.attend(self.norm1(x)).astype(x.dtype)
        return x + self.fc2(gelu(self.fc1(self.norm2(x)))).astype(x.dtype)


# The example uses norm="none": the conformance suite traces the module inside a closure, where a training-mode
# BatchNorm cannot update its running averages (flax's TraceContextError); tests/nn/vision/test_condaformer.py
# checks norm="batch" under jit.
register_module(ModuleSpec(
    "condaformer", ConDaFormerBlock, dict(channels=12, head_dim=2, window_size=2, shift=True, norm="none"),
    lambda key: (jax.random.normal(key, (2, 3, 4, 5, 12), jnp.float32),), kind="other",
    paper="Duan et al. 2023 (ConDaFormer, NeurIPS)"))
register_module(ModuleSpec(
    "condaformer_lse", LocalStructureEnhancement, dict(channels=8, norm="none"),
    lambda key: (jax.random.normal(key, (2, 3, 4, 5, 8), jnp.float32),), kind="other",
    paper="Duan et al. 2023 (ConDaFormer, NeurIPS), local structure enhancement"))
