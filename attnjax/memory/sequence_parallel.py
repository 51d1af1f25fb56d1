"""Sequence parallelism for Titans' linear neural memory: each rank's chunks are an affine map of its start state.

``neural_memory`` (Behrouz et al. 2025, "Titans", Sec. 3.2) takes the gradients of a chunk at the memory before
the chunk, so with the chunks of one rank, the rank's outputs and its end state are **affine** in its start
state ``(S₀, U₀)`` (memory and momentum): with ``r_j = θ_j(k_j·S_base − v_j)`` every update is linear in
``S_base`` and ``U``, plus a term in ``v``. Written as left multiplications by ``[Dk, Dk]`` matrices::

    S_end = M_S·S₀ + W_S·U₀ + b_S,    U_end = M_U·S₀ + W_U·U₀ + b_U,    o_t = a_t·S₀ + c_t·U₀ + o⁰_t

So, as LASP-2 does for linear attention (Sun et al. 2025, Alg. 1-2) but for this richer recurrence, each of
the ``W`` ranks of ``axis_name``:

1. runs the chunk-parallel memory (``neural_memory``, "xla") **once** on its tokens with probe columns: values
   ``[0, 0, v]`` and start state ``S₀ = [I, 0, 0]``, ``U₀ = [0, I, 0]`` (value width ``2·Dk + Dv``), whose end
   state holds ``[M_S, W_S, b_S]`` and ``[M_U, W_U, b_U]`` and whose outputs hold ``[a_t, c_t, o⁰_t]``;
2. all-gathers the maps (``[W, B, H, Dk, 2·Dk + Dv]`` twice: independent of the sequence length);
3. folds the earlier ranks' maps over the initial state (``W`` small matmuls) to get its start state;
4. outputs ``o_t = a_t·S₀ + c_t·U₀ + o⁰_t``.

It equals ``neural_memory`` on the whole sequence when every rank's length is a multiple of ``chunk_size`` (the
chunks then never straddle two ranks). Cost per rank: the local chunked pass at value width ``2·Dk + Dv``
instead of ``Dv`` (3× at ``Dk = Dv``), plus O(W·Dk²·(Dk + Dv)); communication: one all-gather of the maps per
direction (and with ``return_state`` one psum of the end state, which types it as replicated). Gradients flow
through everything (the all-gather's transpose), so every input, the gates and the initial state included, is
differentiable.

The deep (MLP) memory (``attnjax.memory.deep_memory``, Titans Sec. 3.1 with ``L_M ≥ 2``) has no such scheme: its
chunk's end weights are not affine in its start weights (the gradients pass through the nonlinearity), so a
rank cannot summarize its chunks as a map of the state it will receive.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.memory.neural_memory import NeuralMemoryState, neural_memory
from attnjax.meshes import vary_like


def neural_memory_sequence_parallel(
    q: jax.Array, k: jax.Array, v: jax.Array, lr: jax.Array, momentum: jax.Array, decay: jax.Array, *,
    axis_name: str, chunk_size: int = 1, initial_state: Optional[jax.Array] = None,
    initial_momentum: Optional[jax.Array] = None, return_state: bool = False,
) -> Union[jax.Array, tuple[jax.Array, NeuralMemoryState]]:
    """``neural_memory`` over a sequence sharded along ``axis_name`` (call inside ``shard_map``; see the module docstring).

    Args:
      q: local ``[B, C, Hq, Dk]``; k: ``[B, C, H, Dk]``; v: ``[B, C, H, Dv]``; lr, momentum, decay: ``[B, C, H]``:
        rank ``t`` holds global positions ``[t·C, (t+1)·C)`` (contiguous layout); ``C % chunk_size == 0``.
      axis_name: the mesh axis the sequence is sharded over.
      chunk_size, initial_state, initial_momentum: as in ``neural_memory`` (the initial state and momentum
        ``[B, H, Dk, Dv]`` are those of the whole sequence, the same on every rank).
      return_state: also return the ``NeuralMemoryState`` after the last token of the whole sequence (the same on
        every rank).
    Returns:
      ``out [B, C, Hq, Dv]`` in q's dtype, or ``(out, NeuralMemoryState)``.
    Raises:
      ValueError: when the local length is not a multiple of ``chunk_size`` (a chunk would straddle two ranks).
    """
    B, C, Hq, Dk = q.shape
    H, Dv = k.shape[2], v.shape[-1]
    if C % chunk_size:
        raise ValueError(f"each rank's length ({C}, q {q.shape}) must be a multiple of chunk_size={chunk_size}: "
                         "a chunk takes its gradients at the memory before it, so it may not straddle two ranks")
    eye = jnp.broadcast_to(jnp.eye(Dk, dtype=jnp.float32), (B, H, Dk, Dk))
    zeros_k = jnp.zeros((B, H, Dk, Dk), jnp.float32)
    zeros_v = jnp.zeros((B, H, Dk, Dv), jnp.float32)
    probe_values = jnp.concatenate([jnp.zeros((B, C, H, 2 * Dk), v.dtype), v], axis=-1)
    outs, maps = neural_memory(q, k, probe_values, lr, momentum, decay, chunk_size=chunk_size,
                               initial_state=jnp.concatenate([eye, zeros_k, zeros_v], -1).astype(q.dtype),
                               initial_momentum=jnp.concatenate([zeros_k, eye, zeros_v], -1).astype(q.dtype),
                               return_state=True, implementation="xla")
    gathered = lax.all_gather((maps.memory, maps.momentum, maps.base), axis_name)   # each [W, B, H, Dk, 2Dk + Dv]
    rank = lax.axis_index(axis_name)
    s0 = zeros_v if initial_state is None else initial_state.astype(jnp.float32)
    u0 = zeros_v if initial_momentum is None else initial_momentum.astype(jnp.float32)

    def apply(rank_map, s, u):
        """``rank_map [B, H, Dk, 2Dk + Dv]`` applied to the start state ``(s, u)``."""
        return rank_map[..., :Dk] @ s + rank_map[..., Dk:2 * Dk] @ u + rank_map[..., 2 * Dk:]

    def fold(carry, rank_maps):
        s, u = carry
        memory_map, momentum_map, _ = rank_maps
        return (apply(memory_map, s, u), apply(momentum_map, s, u)), (s, u)

    (s_end, u_end), (starts_s, starts_u) = lax.scan(fold, vary_like((s0, u0), *gathered), gathered)
    s_start, u_start = starts_s[rank], starts_u[rank]
    G = Hq // H
    parts = outs.astype(jnp.float32).reshape(B, C, H, G, 2 * Dk + Dv)
    out = (jnp.einsum("bthgk,bhkv->bthgv", parts[..., :Dk], s_start)
           + jnp.einsum("bthgk,bhkv->bthgv", parts[..., Dk:2 * Dk], u_start) + parts[..., 2 * Dk:])
    out = out.reshape(B, C, Hq, Dv).astype(q.dtype)
    if not return_state:
        return out
    world = gathered[0].shape[0]
    base = apply(gathered[2][world - 1], starts_s[world - 1], starts_u[world - 1])
    # Every rank holds the same end state; one psum of the last rank's copy types it as replicated.
    state = [lax.psum(jnp.where(rank == world - 1, x, 0.0), axis_name) for x in (s_end, u_end, base)]
    return out, NeuralMemoryState(*state, jnp.asarray(world * C, jnp.int32))


__all__ = ["neural_memory_sequence_parallel"]
