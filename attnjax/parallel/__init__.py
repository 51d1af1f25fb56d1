"""Sequence parallelism with ``shard_map``: the sequence is sharded over one named mesh axis.

Each scheme is a function called inside the user's ``jax.shard_map`` (default ``check_vma=True``)
on per-device shards (``axis_name=``), with a ``*_sharded`` wrapper that builds the ``shard_map``
from a mesh (``jax.make_mesh``, Explicit or Auto axes, or ``jax.sharding.Mesh``; sequence over
``seq_axis``, optionally batch over ``batch_axis`` and heads over ``head_axis``):

- ``ring_attention``: K/V rotate around the ring (``ppermute``), online-softmax merge, custom
  backward rotating dK/dV; zigzag/striped layouts balance causal work (``layouts``).
- ``allgather_attention``: one all-gather of K/V, local queries (Llama 3 context parallelism).
- ``ulysses_attention``: all-to-all sequence <-> heads (DeepSpeed-Ulysses).
- ``lasp2`` / ``lasp2h_attention``: linear attention with one all-gather of memory states, and the
  softmax layers of hybrid models (Sun et al. 2025); ``lasp2_mechanism``: LASP-2 for any linear-family
  mechanism exposing the linear-state interface (``attnjax.linear.sequence_state``: Flow, InLine, RALA).

``MultiHeadAttention(sequence_parallel=("sp", "zigzag"))`` switches a module to these schemes.
"""

from attnjax.parallel import comm, layouts
from attnjax.parallel.allgather import allgather_attention, allgather_attention_sharded
from attnjax.parallel.lasp2 import AxisExchange, lasp2, lasp2_mechanism, lasp2_mechanism_sharded, lasp2_sharded
from attnjax.parallel.lasp2h import lasp2h_attention, lasp2h_sharded
from attnjax.parallel.layouts import (LAYOUTS, AtPositions, from_layout, local_positions, permutation, to_layout,
                                      unmasked_tiles)
from attnjax.parallel.ring import ring_attention, ring_attention_sharded
from attnjax.parallel.sharding import SequenceSharding, sequence_parallel_call, shard_map
from attnjax.parallel.ulysses import ulysses_attention, ulysses_attention_sharded

SCHEMES = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}
"""Per-device softmax sequence-parallel schemes by name (one signature: q, k, v, axis_name, mask, layout,
segment_ids, scale, logits_soft_cap)."""

SHARDED = {"ring": ring_attention_sharded, "allgather": allgather_attention_sharded,
           "ulysses": ulysses_attention_sharded}
"""Their ``shard_map`` wrappers by name."""

__all__ = [
    "comm", "layouts", "LAYOUTS", "AtPositions", "to_layout", "from_layout", "local_positions", "permutation", "unmasked_tiles",
    "ring_attention", "ring_attention_sharded", "allgather_attention", "allgather_attention_sharded",
    "ulysses_attention", "ulysses_attention_sharded", "lasp2", "lasp2_sharded", "lasp2h_attention",
    "AxisExchange", "lasp2_mechanism", "lasp2_mechanism_sharded",
    "lasp2h_sharded", "SequenceSharding", "sequence_parallel_call", "shard_map", "SCHEMES", "SHARDED",
]
