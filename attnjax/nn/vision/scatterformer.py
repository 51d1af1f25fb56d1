"""The ScatterFormer layer as a Flax NNX module on batch-first voxel sets (core: ``attnjax.vision.scatterformer``).

He, Li, Zhang & Zhang, "ScatterFormer: Efficient Voxel Transformer with Scattered Linear Attention", ECCV 2024
(arXiv 2401.00912), sec. 3 and Fig. 2; official code skyhehe123/ScatterFormer,
``pcdet/models/backbones_3d/scatterformer.py`` (``ScatterFormerLayer3x``, ``SLALayer``, ``CWI_FFN_Layer``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive, describe
from attnjax.nn.checks import check_features
from attnjax.nn.conv.partial_attention import check_norm
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.dsvt import check_voxels
from attnjax.vision.scatterformer import check_grid, cross_window_interaction, scatterformer_attention

BATCH_NORM_EPSILON = 1e-3
"""The official ``nn.BatchNorm1d(eps=1e-3, momentum=0.01)``."""

BATCH_NORM_MOMENTUM = 0.99
"""flax's ``momentum`` for PyTorch's ``momentum=0.01`` (the running average keeps 0.99 of its value)."""


class ScatterFormerLayer(nnx.Module):
    """One ScatterFormer layer (official ``ScatterFormerLayer3x``, one of its layers) on voxels ``[B, N, C]``::

        x ← x + SLA(BN₀(x))                              # SLA: Q, K, V = x W_qkv; ReLU maps; proj (bias)
        y ← BN₁(x);  y ← y + CWI(y)                       # cross-window interaction (eq. 4-7)
        x ← y + fc₂(ReLU(fc₁(BN₂(y))))                     # FFN, 2C hidden units

    ``SLA`` is normalized linear attention within each window (eq. 2-3; ``scatterformer_attention``: the voxels
    sorted by window into one packed sequence), with ``num_heads`` heads; windows are BEV columns of
    ``S_w × S_h`` voxels in ``(x, y)`` spanning the grid's depth, as the official code. ``CWI`` splits the
    channels in four groups: a 3×3×3 depthwise conv, ``S_w + 1`` taps along x, ``S_h + 1`` taps along y, identity
    (submanifold depthwise convolutions, no bias; here a dense scatter onto ``grid_shape``, see
    ``attnjax.vision.scatterformer.sparse_depthwise_conv``). BatchNorm statistics cover the valid voxels of the
    batch (PyTorch's ``BatchNorm1d`` over the official flat voxel list); padding voxels output 0.

    Example::

      layer = ScatterFormerLayer(128, grid_shape=(468, 468, 32), rngs=nnx.Rngs(0))   # 4 heads, 12 × 12 windows
      y = layer(features, coords, valid)    # features, y: [B, N, 128]; coords: int [B, N, 3] (x, y, z)

    Parameters (``g = C // 4``; ``norm="batch"``): ``3C²`` (QKV, no bias) ``+ C² + C`` (projection) ``+ 6C`` (three
    BatchNorms) ``+ (27 + S_w + 1 + S_h + 1)·g`` (CWI) ``+ 4C² + 3C`` (FFN) ``= 8C² + 10C + (29 + S_w + S_h)·g``.

    Choices, following the official code where the paper leaves it open: ReLU feature maps (the paper cites
    Katharopoulos et al.'s map), the BatchNorm placement and its ``eps = 1e-3``, the FFN width ``2C``, the CWI
    channel order, and no window shift (CWI replaces it; ``shift=True`` moves the windows by half a window in
    x and y, Swin-style). PyTorch's running variance is unbiased, flax's biased. Left out: the sparse
    convolutional stem (CPE), the downsampling between stages and the pillar pooling of the backbone, and dropout.

    Args:
      channels: ``C`` (a multiple of ``num_heads``, at least 4).
      grid_shape: ``(X, Y, Z)``, the voxel grid; coordinates lie in ``[0, grid_shape)``.
      num_heads: attention heads (4 in the paper).
      window_size: ``S`` or ``(S_w, S_h)`` in voxels along x and y, even (CWI kernels of ``S + 1`` taps are
        centred); 12 on Waymo (20 on nuScenes).
      mlp_ratio: the FFN's hidden width over ``C`` (2).
      shift: shift the windows by ``(S_w/2, S_h/2, 0)`` (not in the paper).
      norm: "batch" (the official BatchNorms) or "none" (identity: a stateless layer).
      use_running_average: the BatchNorms' mode at construction (``model.train()`` / ``model.eval()``).
      dtype, param_dtype: computation and parameter dtypes; the output takes the features' dtype.
      rngs: ``params`` initializes the layers (flax defaults; CWI kernels ``N(0, 1)`` as the official
        ``torch.randn``).
    """

    def __init__(self, channels: int, *, grid_shape: Sequence[int], num_heads: int = 4,
                 window_size: Union[int, Sequence[int]] = 12, mlp_ratio: float = 2.0, shift: bool = False,
                 norm: str = "batch", use_running_average: bool = False, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, num_heads=num_heads)
        check_norm(norm)
        if channels % num_heads or channels < 4:
            raise ValueError(f"channels ({channels}) must be a multiple of num_heads ({num_heads}) and at least 4 "
                             "(four CWI channel groups)")
        sizes = (window_size,) * 2 if isinstance(window_size, int) else tuple(window_size)
        if len(sizes) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 and s % 2 == 0
                                      for s in sizes):
            raise ValueError(f"window_size must be a positive even int or two (S_w, S_h): CWI kernels of S + 1 taps "
                             f"are centred, got {describe(window_size)}")
        grid = tuple(grid_shape) if isinstance(grid_shape, (tuple, list)) else ()
        if len(grid) != 3:
            raise ValueError(f"grid_shape must be (X, Y, Z), got {describe(grid_shape)}")
        check_positive(**{f"grid_shape[{a}]": n for a, n in enumerate(grid)})
        hidden = int(channels * mlp_ratio) if isinstance(mlp_ratio, (int, float)) else 0
        if hidden < 1:
            raise ValueError(f"mlp_ratio must be a number with int(mlp_ratio * channels) >= 1, got "
                             f"{describe(mlp_ratio)} for channels={channels}")
        self.channels, self.num_heads, self.grid_shape = channels, num_heads, grid
        self.window_shape = (*sizes, grid[2])
        self.shift = (sizes[0] // 2, sizes[1] // 2, 0) if shift else False
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norms = dict(epsilon=BATCH_NORM_EPSILON, momentum=BATCH_NORM_MOMENTUM, use_fast_variance=False,
                     use_running_average=use_running_average, **common)
        self.norm0, self.norm1, self.norm2 = ((nnx.BatchNorm(channels, **norms) if norm == "batch" else None)
                                              for _ in range(3))
        self.qkv = nnx.Linear(channels, 3 * channels, use_bias=False, **common)
        self.proj = nnx.Linear(channels, channels, **common)
        g = channels // 4
        normal = jax.nn.initializers.normal(1.0)
        self.local_kernel = nnx.Param(normal(rngs.params(), (3, 3, 3, g), param_dtype))
        self.x_kernel = nnx.Param(normal(rngs.params(), (sizes[0] + 1, g), param_dtype))
        self.y_kernel = nnx.Param(normal(rngs.params(), (sizes[1] + 1, g), param_dtype))
        self.fc1 = nnx.Linear(channels, hidden, **common)
        self.fc2 = nnx.Linear(hidden, channels, **common)

    def normalize(self, norm: Optional[nnx.BatchNorm], x: jax.Array, valid: jax.Array) -> jax.Array:
        """``norm(x)`` with statistics over the valid voxels, or ``x`` when ``norm="none"``."""
        return x if norm is None else norm(x, mask=valid[..., None])

    def attend(self, x: jax.Array, coords: jax.Array, valid: jax.Array) -> jax.Array:
        """``SLA(x)``: the QKV projection, scattered linear attention per window, the output projection."""
        B, N, C = x.shape
        q, k, v = (t.reshape(B, N, self.num_heads, C // self.num_heads) for t in jnp.split(self.qkv(x), 3, axis=-1))
        out = scatterformer_attention(q, k, v, coords, valid, self.window_shape, shift=self.shift)
        return self.proj(out.reshape(B, N, C))

    def __call__(self, features: jax.Array, coords: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
        """``features [B, N, C]``, int ``coords [B, N, 3]`` = ``(x, y, z)``, bool ``valid [B, N]`` (None: all
        valid; valid voxels at distinct coordinates) ``-> [B, N, C]``."""
        check_features("features", features)
        if features.ndim != 3 or features.shape[-1] != self.channels:
            raise ValueError(f"features must have shape [batch, voxels, {self.channels}], got {list(features.shape)}")
        check_voxels(coords, valid)
        if coords.shape != (*features.shape[:2], 3):
            raise ValueError(f"coords must have shape [batch, voxels, 3] = {[*features.shape[:2], 3]} (x, y, z), "
                             f"got {list(coords.shape)}")
        check_grid(coords, valid, self.grid_shape)
        valid = jnp.ones(features.shape[:2], bool) if valid is None else valid
        x = features
        x = x + self.attend(self.normalize(self.norm0, x, valid), coords, valid).astype(x.dtype)
        y = self.normalize(self.norm1, x, valid)
        y = y + cross_window_interaction(y, coords, valid, self.grid_shape, self.local_kernel[...],
                                         self.x_kernel[...], self.y_kernel[...])
        y = y + self.fc2(jax.nn.relu(self.fc1(self.normalize(self.norm2, y, valid))))
        return jnp.where(valid[..., None], y, 0).astype(features.dtype)


def example_voxels(key: jax.Array, batch: int = 2, voxels: int = 9, channels: int = 8,
                   grid_shape: Sequence[int] = (6, 5, 2)) -> tuple:
    """``(features [B, N, C], coords [B, N, 3], valid [B, N])``: distinct random cells of ``grid_shape`` per row,
    the last voxel of every row but the first padding."""
    cells = jnp.stack([jax.random.permutation(k, int(np.prod(grid_shape)))[:voxels]
                       for k in jax.random.split(key, batch)])
    coords = jnp.stack(jnp.unravel_index(cells, tuple(grid_shape)), axis=-1).astype(jnp.int32)
    valid = jnp.ones((batch, voxels), bool).at[1:, -1].set(False)
    return jax.random.normal(jax.random.fold_in(key, 1), (batch, voxels, channels), jnp.float32), coords, valid


# The example uses norm="none": the conformance suite traces the module inside a closure, where a training-mode
# BatchNorm cannot update its running averages; tests/nn/vision/test_scatterformer.py checks norm="batch".
register_module(ModuleSpec(
    "scatterformer", ScatterFormerLayer, dict(channels=8, grid_shape=(6, 5, 2), num_heads=2, window_size=2,
                                              norm="none"),
    example_voxels, kind="other", paper="He et al. 2024 (ScatterFormer, ECCV)"))
