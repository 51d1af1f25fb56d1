"""PPMA's polyline path masked attention as a Flax NNX module on NHWC feature maps (core:
``attnjax.relative.polyline``).

Zhao et al., "Polyline Path Masked Attention for Vision Transformer", NeurIPS 2025 (arXiv 2506.15940). The
layer follows the authors' code, ``zhongchenzhao/PPMA``, ``classification/models/PPMA.py``:
``MambaAttentionAllDouble`` (the attention layer of the "whole" stages), its ``PathEmbeding2D`` (the decay
projection) and ``RotaryPositionEmbedding2D`` / ``theta_shift`` (the rotary embedding it inherits from RMT).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.dispatch import check_implementation
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.relative.polyline import PATHS, polyline_attention


def flat_rotary(x: jax.Array) -> jax.Array:
    """The official PPMA/RMT rotary embedding of ``x [B, N, H, D]`` at the flattened token index ``l = r·W + c``.

    Interleaved pairs ``(x_2i, x_2i+1)`` rotate by ``l·θ_i`` with ``θ_i = 10000^(−i/(D/2 − 1))``
    (``1 / 10000 ** linspace(0, 1, D/2)``; ``θ_0 = 1`` when ``D = 2``): ``theta_shift`` of the official code,
    ``x·cos + rotate_every_two(x)·sin``. ``D`` must be even.
    """
    N, D = x.shape[1], x.shape[-1]
    theta = 1.0 / 10000.0 ** jnp.linspace(0.0, 1.0, D // 2)
    angle = jnp.arange(N, dtype=jnp.float32)[:, None] * theta[None, :]     # [N, D/2]
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]       # [N, 1, D/2]
    even, odd = x[..., 0::2].astype(jnp.float32), x[..., 1::2].astype(jnp.float32)
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


class PolylinePathAttention(nnx.Module):
    """Polyline path masked attention (PPMA; official ``MambaAttentionAllDouble``) on ``[B, H, W, C]``::

        Q, K, V = x W_q + b_q, x W_k + b_k, x W_v + b_v               # heads of d = C / heads channels
        Q, K = RoPE(Q), RoPE(K)                                     # flat_rotary, at l = r·W + c
        Δα, Δβ = x_h W_Δ                                            # x_h: head h's d channels of x, W_Δ [d, 2]
        log α = −exp(A_log)·softplus(Δα + dt_bias),  log β likewise  # per token and head, ≤ 0
        O = ½·softmax(QKᵀ/√d + log M_v2h)·V + ½·softmax(QKᵀ/√d + log M_h2v)·V
        y = (O + DWConv5×5(V)) W_o + b_o                            # LePE on the values

    ``M_v2h``/``M_h2v`` are the polyline path masks of the decays (``attnjax.relative.polyline``: products of
    ``α`` along a row and ``β`` along a column of the L-shaped path between query and key, Mamba2's structured
    mask in 2-D). The decay projection is shared by the heads, as in the official ``PathEmbeding2D``
    (``Linear(C / heads, 2)`` on each head's channels); ``dt_bias`` and ``A_log`` are per head and shared by the
    two directions, initialized as Mamba2's (``dt`` log-uniform in ``[dt_min, dt_max]``, ``A ~ U(a_init_range)``).
    The fast path (``implementation="auto"``/``"xla"``) never forms ``[N, N]``: O(B·heads·N·tile) memory.

    Example::

      ppma = PolylinePathAttention(64, num_heads=4, rngs=nnx.Rngs(0))
      y = ppma(x)                                    # x, y: [B, H, W, 64]

    Parameters: ``4·(C² + C)`` (Q, K, V, output projections) ``+ 2·C/heads`` (decay projection, no bias)
    ``+ 2·heads`` (``dt_bias``, ``A_log``) ``+ 26·C`` (the 5×5 depth-wise LePE convolution with bias).

    Initialization: projections ``N(0, 0.02²)`` with zero biases, as ``PPMAViT._init_weights`` leaves every
    ``nn.Linear`` (timm's ``trunc_normal_(std=.02)``, whose ±2 cut-off is 100σ); the LePE convolution keeps flax's
    default (PyTorch's ``Conv2d`` default in the official code).

    Args:
      channels: ``C``, a multiple of ``num_heads``.
      num_heads: heads (4 in PPMA-T's first stages); ``C / num_heads`` must be even for the rotary embedding.
      rope: apply the official rotary embedding to Q and K (True in the official layer).
      lepe: add the depth-wise 5×5 convolution of V (True in the official layer).
      paths: the polyline directions averaged (both in the official layer).
      a_init_range, dt_min, dt_max, dt_init_floor: Mamba2's decay initialization (official values).
      implementation: "auto", "xla" or "reference" (``attnjax.relative.polyline.polyline_attention``).
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers.
    """

    def __init__(self, channels: int, *, num_heads: int = 4, rope: bool = True, lepe: bool = True,
                 paths: Sequence[str] = PATHS, a_init_range: tuple[float, float] = (1.0, 1.1),
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, implementation: str = "auto",
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, num_heads=num_heads)
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be a multiple of num_heads ({num_heads})")
        head_dim = channels // num_heads
        if rope and head_dim % 2:
            raise ValueError(f"the rotary embedding needs an even head dimension channels // num_heads, got {head_dim}")
        if not 0 < a_init_range[0] <= a_init_range[1]:
            raise ValueError(f"a_init_range must be (low, high) with 0 < low <= high, got {a_init_range}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        if not paths or any(path not in PATHS for path in paths):
            raise ValueError(f"paths must be a non-empty sequence of {PATHS}, got {paths!r}")
        check_implementation(implementation)
        self.channels, self.num_heads, self.head_dim = channels, num_heads, head_dim
        self.rope, self.paths, self.implementation = rope, tuple(paths), implementation
        init = nnx.initializers.normal(0.02)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = nnx.Linear(channels, channels, kernel_init=init, **common)
        self.key = nnx.Linear(channels, channels, kernel_init=init, **common)
        self.value = nnx.Linear(channels, channels, kernel_init=init, **common)
        self.out = nnx.Linear(channels, channels, kernel_init=init, **common)
        self.decay = nnx.Linear(head_dim, 2, use_bias=False, kernel_init=init, **common)
        self.lepe = (nnx.Conv(channels, channels, (5, 5), padding="SAME", feature_group_count=channels, **common)
                     if lepe else None)
        key_dt, key_a = jax.random.split(rngs.params())
        u = jax.random.uniform(key_dt, (num_heads,))
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), dt_init_floor)
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))   # softplus⁻¹(dt)
        a = jax.random.uniform(key_a, (num_heads,), minval=a_init_range[0], maxval=a_init_range[1])
        self.a_log = nnx.Param(jnp.log(a).astype(param_dtype))

    def log_decays(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The horizontal and vertical log decays ``(log α, log β)``, each float32 ``[B, H·W, heads]``."""
        B, H, W, _ = x.shape
        dt = self.decay(x.reshape(B, H * W, self.num_heads, self.head_dim)).astype(jnp.float32)
        A = -jnp.exp(self.a_log[...].astype(jnp.float32))
        bias = self.dt_bias[...].astype(jnp.float32)
        return A * jax.nn.softplus(dt[..., 0] + bias), A * jax.nn.softplus(dt[..., 1] + bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, C = x.shape
        heads = (B, H * W, self.num_heads, self.head_dim)
        q, k, v = self.query(x).reshape(heads), self.key(x).reshape(heads), self.value(x)
        if self.rope:
            q, k = flat_rotary(q), flat_rotary(k)
        log_alpha, log_beta = self.log_decays(x)
        o = polyline_attention(q, k, v.reshape(heads), log_alpha, log_beta, grid=(H, W), paths=self.paths,
                               implementation=self.implementation).reshape(B, H, W, C)
        if self.lepe is not None:
            o = o + self.lepe(v)
        return self.out(o).astype(x.dtype)


PAPER = "Zhao et al. 2025, Polyline Path Masked Attention for Vision Transformer (NeurIPS 2025, arXiv 2506.15940)"
register_module(ModuleSpec("ppma", PolylinePathAttention, dict(channels=16, num_heads=2), (2, 5, 7, 16),
                           kind="image", paper=PAPER))
