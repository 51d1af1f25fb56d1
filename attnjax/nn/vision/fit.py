"""FIT (Far-reaching Interleaved Transformers) as Flax NNX modules on token sets (functional core:
``attnjax.vision.fit.grouped_attention``).

Chen & Li, "FIT: Far-reaching Interleaved Transformers", arXiv 2305.12689, 2023, sec. 2. Official code:
google-research/pix2seq, ``architectures/transformers.py`` (classes ``FIT``, ``TransformerEncoderLayer``,
``TransformerDecoderLayer``), whose order of operations these modules follow.

* ``FITLayer``: a pre-LN transformer layer whose self-attention runs within ``G`` contiguous token groups (a
  local layer) or over all tokens (``num_groups=1``: a global layer).
* ``FITCrossAttention``: pre-LN residual cross-attention from one token set to another, group ``g`` to group ``g``.
* ``FITBlock``: local layers on the data tokens, data → latent cross-attention, global layers on the latents,
  latent → data cross-attention.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_input
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.fit import check_groups, group_tokens, grouped_attention

LAYER_NORM_EPSILON = 1e-6
"""The LayerNorm epsilon of the official code."""


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``[B, T, H·D] -> [B, T, H, D]``."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """``[B, T, H, D] -> [B, T, H·D]``."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class FITLayer(nnx.Module):
    """A transformer layer of FIT (sec. 2; the official ``TransformerEncoderLayer``), attention within groups::

        x ← x + W_o · GroupedMHA(LN(x))                 # groups of T/G tokens; G = 1: all tokens
        x ← x + W_2 · GELU(W_1 · LN(x) + b_1) + b_2

    Local layers call it with ``num_groups = G`` on the data tokens, global layers with ``num_groups=1`` on the
    latents. ``GroupedMHA`` is ``attnjax.vision.fit.grouped_attention`` (memory ``O(heads·T²/G)`` at most).

    Example::

      layer = FITLayer(64, 4, rngs=nnx.Rngs(0))
      y = layer(x, num_groups=16)                    # x, y: [B, T, 64], T a multiple of 16

    Parameters: ``4C² + 2rC² + 8C + rC`` (``r = mlp_ratio``).

    The key projection has no bias (the official Keras layer has one): it adds ``q·b_k`` to every logit of a
    query, which the softmax cancels, so its gradient is identically zero. Exact (erf) GELU and LayerNorm epsilon
    1e-6, as the official code. Dropout and stochastic depth are left out.

    Args:
      dim: ``C``, the token width.
      num_heads: attention heads; must divide ``C``.
      mlp_ratio: ``r``, the MLP's hidden width is ``r·C`` (4 in the official code).
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax defaults).
    """

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: int = 4, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        self.dim, self.num_heads = dim, num_heads
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPSILON, **common)
        self.query, self.value, self.out = (nnx.Linear(dim, dim, **common) for _ in range(3))
        self.key = nnx.Linear(dim, dim, use_bias=False, **common)
        self.mlp_norm = nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPSILON, **common)
        self.mlp_in = nnx.Linear(dim, mlp_ratio * dim, **common)
        self.mlp_out = nnx.Linear(mlp_ratio * dim, dim, **common)

    def __call__(self, x: jax.Array, *, num_groups: int = 1) -> jax.Array:
        """``x [B, T, C] -> [B, T, C]``, attention within ``num_groups`` contiguous groups of ``T / num_groups``."""
        check_input("x", x, self.dim)
        check_groups("x", x.shape[1], num_groups)
        h = self.attention_norm(x)
        q, k, v = (split_heads(layer(h), self.num_heads) for layer in (self.query, self.key, self.value))
        if is_capturing():  # the groups as the batch, as grouped_attention's call
            sow_attention_inputs(self, group_tokens(q, num_groups), group_tokens(k, num_groups), mask=None, scale=None,
                                 mechanism="softmax")
        x = x + self.out(merge_heads(grouped_attention(q, k, v, num_groups))).astype(x.dtype)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x)), approximate=False)).astype(x.dtype)


class FITCrossAttention(nnx.Module):
    """FIT's cross-attention between data tokens and latents of the same group (sec. 2; the official
    ``TransformerDecoderLayer`` with only its cross-attention, ``use_enc_ln=True``, no MLP)::

        x ← x + W_o · GroupedMHA(Q = W_q LN_x(x) + b_q, K = W_k LN_s(s), V = W_v LN_s(s) + b_v)

    Query group ``g`` (of ``T/G`` tokens of ``x``) attends to source group ``g`` (of ``S/G`` tokens of ``s``).
    Memory ``O(heads·T·S/G)`` at most.

    Example::

      read = FITCrossAttention(32, 64, 2, rngs=nnx.Rngs(0))   # latents (width 32) read data tokens (width 64)
      latents = read(latents, x, num_groups=16)              # latents [B, 16·m, 32], x [B, 16·n, 64]

    Parameters: ``2Cq + 2Cs + (Cq + 2Cs)·A + 2A + A·Cq + Cq`` with ``A = attention_dim``; no key bias (see
    ``FITLayer``).

    Args:
      query_dim: ``Cq``, the width of ``x`` (and of the output).
      source_dim: ``Cs``, the width of the source tokens ``s``.
      num_heads: attention heads; must divide ``attention_dim``.
      attention_dim: ``A``, the width of q, k, v; default ``min(Cq, Cs)`` (the official ``dim_x_att``).
      dtype, param_dtype, rngs: as ``FITLayer``.
    """

    def __init__(self, query_dim: int, source_dim: int, num_heads: int, *, attention_dim: Optional[int] = None,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        attention_dim = min(query_dim, source_dim) if attention_dim is None else attention_dim
        check_positive(query_dim=query_dim, source_dim=source_dim, num_heads=num_heads, attention_dim=attention_dim)
        if attention_dim % num_heads:
            raise ValueError(f"attention_dim ({attention_dim}) must be a multiple of num_heads ({num_heads})")
        self.query_dim, self.source_dim, self.num_heads = query_dim, source_dim, num_heads
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_norm = nnx.LayerNorm(query_dim, epsilon=LAYER_NORM_EPSILON, **common)
        self.source_norm = nnx.LayerNorm(source_dim, epsilon=LAYER_NORM_EPSILON, **common)
        self.query = nnx.Linear(query_dim, attention_dim, **common)
        self.key = nnx.Linear(source_dim, attention_dim, use_bias=False, **common)
        self.value = nnx.Linear(source_dim, attention_dim, **common)
        self.out = nnx.Linear(attention_dim, query_dim, **common)

    def __call__(self, x: jax.Array, source: jax.Array, *, num_groups: int = 1) -> jax.Array:
        """``x [B, T, Cq], source [B, S, Cs] -> [B, T, Cq]``; ``T``, ``S`` multiples of ``num_groups``."""
        check_input("x", x, self.query_dim)
        check_input("source", source, self.source_dim)
        if source.shape[0] != x.shape[0]:
            raise ValueError(f"x and source must share the batch: x {list(x.shape)}, source {list(source.shape)}")
        check_groups("x", x.shape[1], num_groups)
        check_groups("source", source.shape[1], num_groups)
        s = self.source_norm(source)
        q = split_heads(self.query(self.query_norm(x)), self.num_heads)
        k, v = (split_heads(layer(s), self.num_heads) for layer in (self.key, self.value))
        if is_capturing():  # the groups as the batch, as grouped_attention's call
            sow_attention_inputs(self, group_tokens(q, num_groups), group_tokens(k, num_groups), mask=None, scale=None,
                                 mechanism="softmax")
        return x + self.out(merge_heads(grouped_attention(q, k, v, num_groups))).astype(x.dtype)


class FITBlock(nnx.Module):
    """One interleaved FIT block (sec. 2; one ``(local)global`` stage of the official ``FIT.call``)::

        x       ← LocalLayers(x)                    # self-attention within each group of n = N/G data tokens
        latents ← CrossAttn(latents ← x)            # data → latent: group g's m latents read group g's data
        latents ← GlobalLayers(latents)             # self-attention among all G·m latents
        x       ← CrossAttn(x ← latents)            # latent → data: group g's data read group g's latents

    Data tokens ``x [B, N, Cx]`` are grouped contiguously (group ``g`` = tokens ``g·n .. (g+1)·n − 1``) and the
    latents ``[B, G·m, Cl]`` likewise (group ``g`` = latents ``g·m .. (g+1)·m − 1``). The latents are carried
    from block to block: the network initializes them once from a learned ``[G·m, Cl]`` table (the official
    ``latent_pos_emb``, tiled over the batch) and passes each block's latents to the next. Attention memory per
    block: ``O(heads·N²/G)`` local, ``O(heads·N·m)`` cross, ``O(heads·(G·m)²)`` global, never ``O(N²)``.

    Example::

      block = FITBlock(64, 128, 16, data_heads=4, latent_heads=8, rngs=nnx.Rngs(0))
      x, latents = block(x, latents)                 # x [B, 16·n, 64], latents [B, 16·m, 128]

    The official network ends with local layers only (its layer string, e.g. ``"(2)4(2)"``, closes with a
    ``(local)`` stage whose latents do not write back): compose ``FITBlock``s and a final run of ``FITLayer``s.
    Left out: the causal chunk mask of the global layers (the official ``mask='causal'``, for autoregressive
    decoding), dropout and stochastic depth.

    Args:
      data_dim: ``Cx``, the data tokens' width.
      latent_dim: ``Cl``, the latents' width.
      num_groups: ``G``; ``N`` and the number of latents must be multiples of it.
      data_heads: heads of the local layers; latent_heads: heads of the global layers; the cross-attentions use
        ``min(data_heads, latent_heads)`` heads of width ``min(Cx, Cl)`` (as the official code).
      local_layers, global_layers: layers per block (2 and 4: the official code's example stage ``"(2)4"``).
      mlp_ratio: the MLPs' expansion (4 in the official code).
      dtype, param_dtype, rngs: as ``FITLayer``.
    """

    def __init__(self, data_dim: int, latent_dim: int, num_groups: int, *, data_heads: int, latent_heads: int,
                 local_layers: int = 2, global_layers: int = 4, mlp_ratio: int = 4, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(num_groups=num_groups, local_layers=local_layers, global_layers=global_layers)
        self.data_dim, self.latent_dim, self.num_groups = data_dim, latent_dim, num_groups
        common = dict(mlp_ratio=mlp_ratio, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.local_layers = nnx.List([FITLayer(data_dim, data_heads, **common) for _ in range(local_layers)])
        cross = dict(num_heads=min(data_heads, latent_heads), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.data_to_latent = FITCrossAttention(latent_dim, data_dim, **cross)
        self.global_layers = nnx.List([FITLayer(latent_dim, latent_heads, **common) for _ in range(global_layers)])
        self.latent_to_data = FITCrossAttention(data_dim, latent_dim, **cross)

    def __call__(self, x: jax.Array, latents: jax.Array, *, return_latents: bool = True
                 ) -> Union[tuple[jax.Array, jax.Array], jax.Array]:
        """``x [B, N, Cx], latents [B, G·m, Cl] -> (x [B, N, Cx], latents [B, G·m, Cl])``.

        Args:
          return_latents: False returns the data tokens alone (e.g. after the block that feeds a dense head).
        """
        check_input("x", x, self.data_dim)
        check_input("latents", latents, self.latent_dim)
        if latents.shape[0] != x.shape[0]:
            raise ValueError(f"x and latents must share the batch: x {list(x.shape)}, latents {list(latents.shape)}")
        check_groups("x", x.shape[1], self.num_groups)
        check_groups("latents", latents.shape[1], self.num_groups)
        for layer in self.local_layers:
            x = layer(x, num_groups=self.num_groups)
        latents = self.data_to_latent(latents, x, num_groups=self.num_groups)
        for layer in self.global_layers:
            latents = layer(latents)
        x = self.latent_to_data(x, latents, num_groups=self.num_groups)
        return (x, latents) if return_latents else x


def tokens_example(key: jax.Array) -> tuple:
    """Data tokens ``[2, 12, 16]`` (3 groups of 4) and latents ``[2, 6, 8]`` (3 groups of 2)."""
    kx, kl = jax.random.split(key)
    return jax.random.normal(kx, (2, 12, 16)), jax.random.normal(kl, (2, 6, 8))


PAPER = "Chen & Li 2023 (FIT, arXiv 2305.12689)"
register_module(ModuleSpec("fit_layer", FITLayer, dict(dim=16, num_heads=2), (2, 12, 16), kind="other",
                           paper=PAPER, call_kwargs=dict(num_groups=3)))
register_module(ModuleSpec("fit_cross_attention", FITCrossAttention, dict(query_dim=8, source_dim=16, num_heads=2),
                           lambda key: tokens_example(key)[::-1], kind="other", paper=PAPER,
                           call_kwargs=dict(num_groups=3)))
register_module(ModuleSpec("fit_block", FITBlock, dict(data_dim=16, latent_dim=8, num_groups=3, data_heads=2,
                                                       latent_heads=2, local_layers=1, global_layers=1),
                           tokens_example, kind="other", paper=PAPER, call_kwargs=dict(return_latents=False)))
