"""DeepSpeed-Ulysses: sequence parallelism by all-to-all between sequence and head sharding.

Jacobs et al., "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long
Sequence Transformer Models" (2023). Each of the ``W`` devices holds ``T = N/W`` tokens of all
heads. One ``lax.all_to_all`` per tensor re-shards q, k, v to all ``N`` tokens of ``H/W`` heads;
each device runs ordinary (blocked) attention on its heads; a last all-to-all returns the output
to sequence sharding. The backward is JAX's transpose: all-to-alls in the other direction.

Per device and call, the all-to-alls move ``(W-1)/W`` of q, k, v and the output: the volume per
device falls as ``1/W`` (ring attention and all-gather move ``O(N)`` K/V per device). The cost:
``W`` must divide the number of heads (query and key/value heads, for GQA).

The same re-sharding is the "distributed multi-head attention" of Hè & Kabic, "A Unified View of Long-Sequence
Models towards Modeling Million-Scale Dependencies" (arXiv 2302.06218, 2023; catalog SP5), as far as its method
can be read: its section "Distributed Attention" (quoted by citing work; the full text was not reachable here)
has each device project all heads for its own partition of tokens, shuffle the partitions (with COSTA) so that
each device holds every token of ``1/W`` of the heads, and run the softmax there, heads one after another. That
is this all-to-all; heads in turn only bound peak memory, which the blocked path already keeps at
``O(N·tile)`` per head. So SP5 has no code of its own, and its cost is Ulysses' in ``experiments/comm_model.py``.
"""

from __future__ import annotations

from typing import Optional

import jax
from jax import lax

from attnjax import masks
from attnjax.api import attention
from attnjax.parallel.layouts import default_block, mask_at_positions, permutation
from attnjax.parallel.sharding import AxisNames, check_local_inputs, sequence_parallel_call
from attnjax.softmax.softmax import Softmax


def ulysses_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str, mask: Optional[masks.Mask] = masks.Causal(),
    layout: str = "contiguous", segment_ids: Optional[jax.Array] = None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, implementation: str = "auto",
) -> jax.Array:
    """Ulysses sequence-parallel softmax attention; call inside ``shard_map`` over ``axis_name``.

    Args:
      q: ``[B, T, Hq, D]``, k: ``[B, T, Hkv, D]``, v: ``[B, T, Hkv, Dv]``: this device's tokens,
        in ``layout`` order. ``Hq`` and ``Hkv`` must be divisible by the axis size ``W`` (device
        ``r`` then computes query heads ``[r·Hq/W, (r+1)·Hq/W)`` with their own KV heads).
      axis_name: the mesh axis the sequence is sharded over.
      mask: a structural mask over the global ``[N, N]`` matrix; ``None`` = ``Full()``.
      layout: "contiguous", "zigzag" or "striped"; the mask is applied at the layout's positions.
      segment_ids: int ``[B, T]`` ids of this device's tokens (gathered to all ``N``).
      scale, logits_soft_cap, implementation: as in ``attnjax.attention``.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    world, mask = check_local_inputs(q, k, v, axis_name=axis_name, layout=layout, mask=mask, segment_ids=segment_ids)
    Hq, Hkv = q.shape[2], k.shape[2]
    if Hq % world or Hkv % world:
        raise ValueError(f"Ulysses splits heads over the {world} devices of axis {axis_name!r}: q heads ({Hq}) and "
                         f"kv heads ({Hkv}) must both be divisible by {world}; use ring_attention or "
                         "allgather_attention for fewer heads")
    T = q.shape[1]

    def seq_to_heads(x):  # [B, T, H, E] -> [B, N, H/W, E]
        return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)

    ids = None if segment_ids is None else lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
    positions = permutation(layout, world, world * T)
    pair = mask_at_positions(mask, positions, positions, ids, ids)
    block = default_block(T, layout)
    out = attention(seq_to_heads(q), seq_to_heads(k), seq_to_heads(v), mechanism=Softmax(block_q=block, block_kv=block),
                    mask=pair, scale=scale, logits_soft_cap=logits_soft_cap, implementation=implementation)
    return lax.all_to_all(out, axis_name, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention_sharded(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh, seq_axis: str,
                              batch_axis: AxisNames = None, head_axis: AxisNames = None, layout: str = "contiguous",
                              segment_ids: Optional[jax.Array] = None, positions: Optional[jax.Array] = None,
                              **kwargs) -> jax.Array:
    """``ulysses_attention`` on global arrays in ``layout`` order (see ``ring_attention_sharded``).

    Each device's share of the heads (after ``head_axis``) must divide by the ``seq_axis`` size.
    """
    sharding_world = mesh.shape[seq_axis] if seq_axis in tuple(mesh.axis_names) else 1
    return sequence_parallel_call(ulysses_attention, q, k, v, mesh=mesh, seq_axis=seq_axis, batch_axis=batch_axis,
                                  head_axis=head_axis, layout=layout, segment_ids=segment_ids, positions=positions,
                                  heads_multiple=sharding_world, **kwargs)


__all__ = ["ulysses_attention", "ulysses_attention_sharded"]
