"""DCAL's global-local and pair-wise cross-attention as Flax NNX modules (functional core: ``attnjax.vision.dcal``).

Zhu et al., "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification",
CVPR 2022, sec. 3.2 (GLCA) and sec. 3.3 (PWCA). The projections follow the DeiT / ViT self-attention the paper builds
on (sec. 3.1; q, k, v and output linear layers).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_input, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.dcal import (GLCA_RATIO, gather_tokens, global_local_cross_attention, local_query_count,
                                 local_query_positions, pair_keys_values, pairwise_cross_attention)


def vit_projections(d_model: int, *, qkv_bias: bool, dtype: Optional[Dtype], param_dtype: Dtype,
                    rngs: nnx.Rngs) -> tuple[nnx.Linear, nnx.Linear, nnx.Linear, nnx.Linear]:
    """The ``(query, key, value, out)`` linear layers ``C -> C`` of a ViT multi-head attention.

    ``4C² + 3C`` parameters (``4C² + C`` without ``qkv_bias``). The key projection has no bias: it adds ``q·b_k`` to
    every logit of a query, which the softmax cancels, so its gradient is identically zero.
    """
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return (nnx.Linear(d_model, d_model, use_bias=qkv_bias, **common),
            nnx.Linear(d_model, d_model, use_bias=False, **common),
            nnx.Linear(d_model, d_model, use_bias=qkv_bias, **common),
            nnx.Linear(d_model, d_model, **common))


def split_heads(layer: nnx.Linear, x: jax.Array, num_heads: int) -> jax.Array:
    """``layer(x)`` split into heads: ``[B, T, C] -> [B, T, heads, C / heads]``."""
    y = layer(x)
    return y.reshape(*y.shape[:2], num_heads, y.shape[-1] // num_heads)


def merge_heads(out: nnx.Linear, o: jax.Array) -> jax.Array:
    """The output projection of the heads: ``[B, R, heads, D] -> [B, R, C]``."""
    return out(o.reshape(*o.shape[:2], o.shape[2] * o.shape[3]))


class GlobalLocalCrossAttention(nnx.Module):
    """GLCA (DCAL sec. 3.2): the top-``R`` tokens by attention rollout query all tokens::

        p   = [CLS, top_R(row 0 of rollout(S_1 .. S_L))]     # local_query_positions, R = ⌊ratio·N⌋
        out = W_o · softmax(Q[p] Kᵀ / √d) V                  # Q, K, V = x W_q + b_q, x W_k, x W_v + b_v

    ``S_1 .. S_L`` are the attention maps of the self-attention layers before it (the paper's accumulated
    ``Ŝ_i = S̄_i ⊗ ··· ⊗ S̄_1``, ``S̄ = 0.5·S + 0.5·E``, ``attnjax.vision.rollout.attention_rollout``). The paper uses
    ``M = 1`` GLCA block after the self-attention layers, with weights of its own (not shared with SA); this module is
    its attention layer (a block adds LayerNorm, the residual of the selected tokens and an MLP).

    Example::

      glca = GlobalLocalCrossAttention(192, 3, rngs=nnx.Rngs(0))
      y = glca(x, maps)           # x [B, 1 + 784, 192], maps [12, B, 3, 785, 785] -> y [B, 1 + 78, 192]

    Parameters: ``4C² + 3C`` (``vit_projections``; no key bias).

    The selection is not differentiable: no gradient reaches ``maps``, the unselected tokens' queries get none, and
    ``x`` gets its gradient through the selected queries and through every key and value.

    Args:
      d_model: ``C``; num_heads: heads (must divide ``C``).
      ratio: the fraction of patch tokens selected (0.1, the paper's fine-grained setting; 0.3 for Re-ID).
      keep_cls: prepend the class token to the queries (see ``attnjax.vision.dcal.local_query_positions``).
      qkv_bias: biases of the query and value projections (ViT's ``qkv_bias=True``).
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax defaults).
    """

    def __init__(self, d_model: int, num_heads: int, *, ratio: float = GLCA_RATIO, keep_cls: bool = True,
                 qkv_bias: bool = True, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        local_query_count(1, ratio)
        resolve_head_dim(d_model, num_heads, None)
        self.d_model, self.num_heads, self.ratio, self.keep_cls = d_model, num_heads, ratio, keep_cls
        self.query, self.key, self.value, self.out = vit_projections(d_model, qkv_bias=qkv_bias, dtype=dtype,
                                                                     param_dtype=param_dtype, rngs=rngs)

    def local_queries(self, maps: Union[Sequence[jax.Array], jax.Array]) -> jax.Array:
        """int32 ``[B, 1 + R]`` (``[B, R]`` without ``keep_cls``): the positions of the selected queries."""
        return local_query_positions(maps, self.ratio, keep_cls=self.keep_cls)

    def __call__(self, x: jax.Array, maps: Union[Sequence[jax.Array], jax.Array]) -> jax.Array:
        """``x [B, 1 + N, C]`` (class token first), ``maps`` ``[L, B, H, 1 + N, 1 + N]`` or a list of
        ``[B, H, 1 + N, 1 + N]`` -> ``[B, 1 + R, C]``: the selected tokens' outputs, in ``local_queries``' order."""
        check_input("x", x, self.d_model)
        shape = jnp.shape(maps[0]) if isinstance(maps, (list, tuple)) else jnp.shape(maps)[1:]
        if len(shape) != 4 or shape[0] != x.shape[0] or shape[2:] != (x.shape[1], x.shape[1]):
            raise ValueError(f"maps must be attention maps [B, H, T, T] = [{x.shape[0]}, H, {x.shape[1]}, "
                             f"{x.shape[1]}] per layer for x {list(x.shape)}, got layers of shape {list(shape)}")
        q, k, v = (split_heads(layer, x, self.num_heads) for layer in (self.query, self.key, self.value))
        if is_capturing():  # the selected queries over all keys
            sow_attention_inputs(self, gather_tokens(q, self.local_queries(maps)), k, mask=None, scale=None,
                                 mechanism="softmax")
        o = global_local_cross_attention(q, k, v, self.local_queries(maps))
        return merge_heads(self.out, o).astype(x.dtype)


class PairwiseCrossAttention(nnx.Module):
    """PWCA (DCAL sec. 3.3): self-attention whose keys and values also hold a distractor image's::

        out = W_o · softmax(Q_1 [K_1; K_2]ᵀ / √d) [V_1; V_2]      # K_2, V_2 from the distractor, same weights
        out = W_o · softmax(Q_1 K_1ᵀ / √d) V_1                    # without a distractor: plain self-attention

    Training only: the paper's ``T = 12`` PWCA blocks share their weights with the ``L = 12`` self-attention blocks and
    are removed at inference, so one module serves both (call it without ``distractor`` for SA). The distractor is
    another image of the training set drawn at random; its own forward pass (``distractor`` is its tokens at this
    layer) runs through the same weights. One softmax covers the ``T + T₂`` keys.

    Example::

      attn = PairwiseCrossAttention(192, 3, rngs=nnx.Rngs(0))
      y = attn(x, x[::-1])       # training: each image's distractor is another image of the batch
      y = attn(x)                # inference: self-attention

    Parameters: ``4C² + 3C`` (``vit_projections``; no key bias).

    Args:
      d_model: ``C``; num_heads: heads (must divide ``C``).
      qkv_bias: biases of the query and value projections (ViT's ``qkv_bias=True``).
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax defaults).
    """

    def __init__(self, d_model: int, num_heads: int, *, qkv_bias: bool = True, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        resolve_head_dim(d_model, num_heads, None)
        self.d_model, self.num_heads = d_model, num_heads
        self.query, self.key, self.value, self.out = vit_projections(d_model, qkv_bias=qkv_bias, dtype=dtype,
                                                                     param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, distractor: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, T, C]`` (image 1), ``distractor [B, T₂, C]`` (image 2) or None -> ``[B, T, C]``."""
        check_input("x", x, self.d_model)
        q, k, v = (split_heads(layer, x, self.num_heads) for layer in (self.query, self.key, self.value))
        k2 = v2 = None
        if distractor is not None:
            check_input("distractor", distractor, self.d_model)
            if distractor.shape[0] != x.shape[0]:
                raise ValueError(f"distractor must have x's batch: x {list(x.shape)}, distractor "
                                 f"{list(distractor.shape)}")
            k2, v2 = (split_heads(layer, distractor, self.num_heads) for layer in (self.key, self.value))
        if is_capturing():  # one softmax over [K_1; K_2]
            sow_attention_inputs(self, q, pair_keys_values(k, v, k2, v2)[0], mask=None, scale=None, mechanism="softmax")
        return merge_heads(self.out, pairwise_cross_attention(q, k, v, k2, v2)).astype(x.dtype)


def glca_example(key: jax.Array) -> tuple:
    """Tokens ``[2, 1 + 20, 16]`` and the softmax maps of 2 earlier layers with 2 heads, ``[2, 2, 2, 21, 21]``."""
    kx, km = jax.random.split(key)
    return jax.random.normal(kx, (2, 21, 16)), jax.nn.softmax(3 * jax.random.normal(km, (2, 2, 2, 21, 21)), axis=-1)


def pair_example(key: jax.Array) -> tuple:
    """Image 1's tokens ``[2, 9, 16]`` and a distractor's ``[2, 9, 16]``."""
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (2, 9, 16)), jax.random.normal(k2, (2, 9, 16))


PAPER = "Zhu et al. 2022 (DCAL, CVPR)"
register_module(ModuleSpec("glca", GlobalLocalCrossAttention, dict(d_model=16, num_heads=2), glca_example,
                           kind="other", paper=PAPER))
register_module(ModuleSpec("pwca", PairwiseCrossAttention, dict(d_model=16, num_heads=2), pair_example,
                           kind="other", paper=PAPER))
