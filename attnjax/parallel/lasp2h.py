"""LASP-2H: the standard-attention layers of a hybrid linear/softmax model under LASP-2's sharding.

Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid" (2025),
Sec. 3.4: in a model whose linear-attention layers run LASP-2 (``attnjax.parallel.lasp2``), the
softmax layers keep the same contiguous sequence sharding and need one collective, an all-gather
of K and V; each rank attends its own queries to all keys, masked causally by global position.
That is all-gather context parallelism (``attnjax.parallel.allgather``) in the contiguous layout,
which this module fixes, so that a hybrid model shards its activations once for all its layers:

    out = lasp2(q, k, v, axis_name="sp", decay=lam)          # linear layers
    out = lasp2h_attention(q, k, v, axis_name="sp")          # softmax layers

Communication per softmax layer and device: one all-gather of ``[B, T/W, Hkv, D + Dv]`` forward and
its transpose, one reduce-scatter, backward (LASP-2: one all-gather of ``[B, H, D, Dv]`` states each
way, independent of ``T``).
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import Mesh

from attnjax import masks
from attnjax.parallel.allgather import allgather_attention, allgather_attention_sharded
from attnjax.parallel.sharding import AxisNames


def lasp2h_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str, mask: Optional[masks.Mask] = masks.Causal(),
    segment_ids: Optional[jax.Array] = None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, implementation: str = "auto",
) -> jax.Array:
    """LASP-2H's softmax layer on this rank's contiguous chunk (call inside ``shard_map``).

    Args:
      q: local ``[B, C, Hq, D]``; k: ``[B, C, Hkv, D]``; v: ``[B, C, Hkv, Dv]``; rank ``t`` of
        ``axis_name`` holds global positions ``[t·C, (t+1)·C)``, as for ``lasp2``.
      axis_name: the mesh axis the sequence is sharded over.
      mask: a structural mask on the global sequence, evaluated at global positions (default
        ``Causal()``; ``None`` = ``Full()``).
      segment_ids, scale, logits_soft_cap, implementation: as in ``allgather_attention``.
    Returns:
      ``[B, C, Hq, Dv]`` in q's dtype.
    """
    return allgather_attention(q, k, v, axis_name=axis_name, mask=mask, layout="contiguous", segment_ids=segment_ids,
                               scale=scale, logits_soft_cap=logits_soft_cap, implementation=implementation)


def lasp2h_sharded(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh, seq_axis: str, batch_axis: AxisNames = None,
    head_axis: AxisNames = None, segment_ids: Optional[jax.Array] = None, **kwargs,
) -> jax.Array:
    """``lasp2h_attention`` on global ``[B, T, H, D]`` arrays in natural order (see ``lasp2_sharded``).

    ``kwargs`` are the other arguments of ``lasp2h_attention``; ``segment_ids`` is global ``[B, T]``.
    """
    return allgather_attention_sharded(q, k, v, mesh=mesh, seq_axis=seq_axis, batch_axis=batch_axis,
                                       head_axis=head_axis, layout="contiguous", segment_ids=segment_ids, **kwargs)


__all__ = ["lasp2h_attention", "lasp2h_sharded"]
