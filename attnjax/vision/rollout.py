"""Attention rollout: how much each input token flows into each position through all layers.

Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020, sec. 3: the residual connection is
modelled by adding the identity to each layer's head-averaged map and renormalizing its rows,
``Â_l = norm_rows(mean_h A_l + I)`` (``= ½·mean_h A_l + ½·I`` when the rows of ``A_l`` sum to 1), and the
attention of layer ``L`` to the inputs is the product ``R = Â_L ··· Â_1`` (first layer rightmost). This is
the authors' ``compute_joint_attention`` (samiraabnar/attention_flow, ``attention_graph_util.py``). A query
row that attends to nothing (all zeros) becomes the identity row after the residual: it keeps its token.

It lives on the vision floor because DCAL's global-local cross-attention (``attnjax.vision.dcal``) selects its
queries by the rollout; ``attnjax.analysis.rollout`` re-exports it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from attnjax.checks import describe


def attention_rollout(maps: Sequence[jax.Array] | jax.Array, *, residual: bool = True,
                      all_layers: bool = False) -> jax.Array:
    """Attention rollout of per-layer softmax maps.

    Args:
      maps: the layers' maps, first layer first: a sequence of ``[B, H, T, T]`` arrays or one
        ``[L, B, H, T, T]`` array (e.g. from ``dense_log_probabilities(...)`` exponentiated per layer).
      residual: add the identity and renormalize rows (the paper); False multiplies the raw head means.
      all_layers: return the rollout after every layer, ``[L, B, T, T]``, instead of only the last.

    Returns:
      ``[B, T, T]`` float32 (or ``[L, B, T, T]``): row ``i`` is how much each input token flows into position
      ``i`` after the last layer.
    """
    stacked = jnp.stack([jnp.asarray(m) for m in maps]) if isinstance(maps, (list, tuple)) else jnp.asarray(maps)
    if stacked.ndim != 5 or stacked.shape[-1] != stacked.shape[-2] or stacked.shape[0] == 0:
        raise ValueError(f"maps must be L >= 1 square maps [B, H, T, T] (a list, or [L, B, H, T, T]), got "
                         f"{describe(stacked)}")
    mixed = jnp.mean(stacked.astype(jnp.float32), axis=2)
    if residual:
        mixed = mixed + jnp.eye(mixed.shape[-1], dtype=jnp.float32)
        mixed = mixed / jnp.sum(mixed, axis=-1, keepdims=True)

    def step(rollout, layer):
        rollout = jnp.einsum("bij,bjk->bik", layer, rollout)
        return rollout, rollout

    final, every = jax.lax.scan(step, mixed[0], mixed[1:])
    return jnp.concatenate([mixed[:1], every]) if all_layers else final


__all__ = ["attention_rollout"]
