"""All-gather context parallelism: every device gathers all keys/values and attends its own queries.

As in Llama 3's context parallelism (Dubey et al., "The Llama 3 Herd of Models", 2024, Sec. 3.3.2)
and the softmax layers of LASP-2H (Sun et al., "LASP-2", 2025, Sec. 3.4): one ``lax.all_gather``
of K and V (concatenated into one array) over the sequence axis, then local blocked softmax
attention of this device's ``T`` queries to all ``N = W·T`` keys, with the mask evaluated at
global positions (``layouts.AtPositions``), so empty tiles (e.g. future keys under a causal mask)
are skipped. The backward is JAX's transpose of the all-gather: one reduce-scatter of dK/dV.

Memory: each device holds all ``N`` keys/values (``O(N)`` per device, unlike ring attention's
``O(N/W)``); communication: one all-gather of ``[B, N, Hkv, D + Dv]`` forward and one
reduce-scatter of it backward, independent of how much of it the mask uses.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import masks
from attnjax.api import attention
from attnjax.parallel.layouts import default_block, local_positions, mask_at_positions, permutation
from attnjax.parallel.sharding import AxisNames, check_local_inputs, sequence_parallel_call
from attnjax.softmax.softmax import Softmax


def allgather_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str, mask: Optional[masks.Mask] = masks.Causal(),
    layout: str = "contiguous", segment_ids: Optional[jax.Array] = None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, implementation: str = "auto",
) -> jax.Array:
    """All-gather context-parallel softmax attention; call inside ``shard_map`` over ``axis_name``.

    ``o_i = Σ_j softmax_j(scale·q_i·k_j) v_j`` over all ``N`` keys the mask allows at the global
    positions of this device's queries (``layout``) and of every device's keys.

    Args:
      q: ``[B, T, Hq, D]``, k: ``[B, T, Hkv, D]``, v: ``[B, T, Hkv, Dv]``: this device's tokens,
        in ``layout`` order (``Hq % Hkv == 0``; K/V heads are never repeated).
      axis_name: the mesh axis the sequence is sharded over.
      mask: a structural mask over the global ``[N, N]`` matrix; ``None`` = ``Full()``.
      layout: "contiguous", "zigzag" or "striped" (``attnjax.parallel.layouts``).
      segment_ids: int ``[B, T]`` ids of this device's tokens (packed sequences); gathered too.
      scale, logits_soft_cap, implementation: as in ``attnjax.attention`` (a Pallas kernel that
        can't take the position mask raises NotImplementedError and "auto" falls back to "xla").
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    world, mask = check_local_inputs(q, k, v, axis_name=axis_name, layout=layout, mask=mask, segment_ids=segment_ids)
    T, D = q.shape[1], q.shape[-1]
    kv = lax.all_gather(jnp.concatenate([k, v], axis=-1), axis_name, axis=1, tiled=True)  # [B, N, Hkv, D + Dv]
    kv_ids = None if segment_ids is None else lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
    q_pos = local_positions(layout, world, lax.axis_index(axis_name), T)
    pair = mask_at_positions(mask, q_pos, permutation(layout, world, world * T), segment_ids, kv_ids)
    block = default_block(T, layout)
    return attention(q, kv[..., :D], kv[..., D:], mechanism=Softmax(block_q=block, block_kv=block), mask=pair,
                     scale=scale, logits_soft_cap=logits_soft_cap, implementation=implementation)


def allgather_attention_sharded(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh, seq_axis: str,
                                batch_axis: AxisNames = None, head_axis: AxisNames = None,
                                layout: str = "contiguous", segment_ids: Optional[jax.Array] = None,
                                positions: Optional[jax.Array] = None, **kwargs) -> jax.Array:
    """``allgather_attention`` on global arrays in ``layout`` order (see ``ring_attention_sharded``)."""
    return sequence_parallel_call(allgather_attention, q, k, v, mesh=mesh, seq_axis=seq_axis,
                                  batch_axis=batch_axis, head_axis=head_axis, layout=layout,
                                  segment_ids=segment_ids, positions=positions, **kwargs)


__all__ = ["allgather_attention", "allgather_attention_sharded"]
