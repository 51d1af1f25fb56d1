"""CrossViT's cross-attention fusion as a Flax NNX module (functional core: ``attnjax.vision.crossvit``).

Chen, Fan & Panda, "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification", ICCV 2021,
sec. 3.4. Official code: IBM/CrossViT, ``models/crossvit.py`` (``MultiScaleBlock``: ``projs``, ``fusion``,
``revert_projs``; ``CrossAttentionBlock`` with ``has_mlp=False``; ``CrossAttention``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.capture import sow_attention_inputs
from attnjax.nn.checks import check_input
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.crossvit import cls_cross_attention, fusion_tokens

LAYER_NORM_EPSILON = 1e-6
"""The LayerNorm epsilon of the official models (``partial(nn.LayerNorm, eps=1e-6)``)."""


class CrossViTCrossAttention(nnx.Module):
    """One direction of CrossViT's cross-attention fusion (sec. 3.4): branch ``i``'s CLS token reads branch ``j``::

        c   = f(x_i[:, 0])                    # f = Linear(GELU(LN(·))): width C_i -> C_j
        x'  = [c ‖ x_j[:, 1:]]                # branch j's patch tokens; its own CLS is not used
        h   = LN(x')
        y   = c + W_o · MCA(q = W_q h_0, k = W_k h, v = W_v h)      # the CLS is the only query
        out = [g(y) ‖ x_i[:, 1:]]             # g = Linear(GELU(LN(·))): width C_j -> C_i

    The attention (``attnjax.vision.crossvit.cls_cross_attention``) has one query, so its cost is linear in the
    other branch's length. The full fusion runs one module per direction on the pre-fusion tokens of both
    branches, as the official ``MultiScaleBlock`` does::

      small_reads_large = CrossViTCrossAttention(192, 384, 12, rngs=nnx.Rngs(0))   # heads of the large branch
      large_reads_small = CrossViTCrossAttention(384, 192, 6, rngs=nnx.Rngs(1))    # heads of the small branch
      x_small, x_large = small_reads_large(x_small, x_large), large_reads_small(x_large, x_small)

    (The pair is not one module returning both branches: registered modules return one array.)

    Parameters: ``3C_i + 2·C_i·C_j + 4·C_j² + 8·C_j`` (``6·C_j`` without ``qkv_bias``).

    Choices where the paper is brief, following the official code: ``f`` and ``g`` are LayerNorm, exact GELU and a
    linear layer (the paper: "projection functions for dimension alignment"); the attention's LayerNorm normalizes
    all of ``x'``, the query included; one cross-attention layer without an MLP (``has_mlp=False``, every released
    model). The key projection has no bias (the official one has, with ``qkv_bias=True``): it adds ``q·b_k`` to every
    logit, which the softmax cancels, so it never changes the output and its gradient is identically zero.

    Args:
      dim: ``C_i``, the width of this branch (the CLS token that queries).
      other_dim: ``C_j``, the width of the other branch; the attention runs at this width.
      num_heads: heads of the attention (the other branch's heads in the official code); must divide ``C_j``.
      qkv_bias: biases in the query and value projections (True in the released models).
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax defaults).
    """

    def __init__(self, dim: int, other_dim: int, num_heads: int, *, qkv_bias: bool = True,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(dim=dim, other_dim=other_dim, num_heads=num_heads)
        if other_dim % num_heads:
            raise ValueError(f"other_dim ({other_dim}) must be a multiple of num_heads ({num_heads})")
        self.dim, self.other_dim, self.num_heads = dim, other_dim, num_heads
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.project_norm = nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPSILON, **common)
        self.project = nnx.Linear(dim, other_dim, **common)
        self.norm = nnx.LayerNorm(other_dim, epsilon=LAYER_NORM_EPSILON, **common)
        self.query = nnx.Linear(other_dim, other_dim, use_bias=qkv_bias, **common)
        self.key = nnx.Linear(other_dim, other_dim, use_bias=False, **common)
        self.value = nnx.Linear(other_dim, other_dim, use_bias=qkv_bias, **common)
        self.out = nnx.Linear(other_dim, other_dim, **common)
        self.revert_norm = nnx.LayerNorm(other_dim, epsilon=LAYER_NORM_EPSILON, **common)
        self.revert = nnx.Linear(other_dim, dim, **common)

    def __call__(self, x: jax.Array, other: jax.Array) -> jax.Array:
        """``x [B, 1 + N_i, C_i], other [B, 1 + N_j, C_j] -> [B, 1 + N_i, C_i]`` (CLS first in both)."""
        check_input("x", x, self.dim)
        check_input("other", other, self.other_dim)
        if other.shape[0] != x.shape[0] or x.shape[1] < 1 or other.shape[1] < 1:
            raise ValueError(f"x and other must share the batch and hold a CLS token first: x {list(x.shape)}, "
                             f"other {list(other.shape)}")
        B, H = x.shape[0], self.num_heads
        cls = self.project(jax.nn.gelu(self.project_norm(x[:, :1]), approximate=False))
        h = self.norm(fusion_tokens(cls, other[:, 1:]))
        q = self.query(h[:, :1]).reshape(B, 1, H, -1)
        k, v = (layer(h).reshape(B, h.shape[1], H, -1) for layer in (self.key, self.value))
        sow_attention_inputs(self, q, k, mask=None, scale=None, mechanism="softmax")
        y = cls + self.out(cls_cross_attention(q, k, v).reshape(B, 1, self.other_dim))
        back = self.revert(jax.nn.gelu(self.revert_norm(y), approximate=False))
        return jnp.concatenate([back.astype(x.dtype), x[:, 1:]], axis=1)


def branches_example(key: jax.Array) -> tuple:
    """A small-patch branch ``[2, 1 + 12, 8]`` and a large-patch branch ``[2, 1 + 5, 16]``."""
    ks, kl = jax.random.split(key)
    return jax.random.normal(ks, (2, 13, 8)), jax.random.normal(kl, (2, 6, 16))


register_module(ModuleSpec("crossvit_cross_attention", CrossViTCrossAttention,
                           dict(dim=8, other_dim=16, num_heads=2), branches_example, kind="other",
                           paper="Chen, Fan & Panda 2021 (CrossViT, ICCV)"))
