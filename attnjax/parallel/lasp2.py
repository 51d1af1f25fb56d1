"""LASP-2: sequence parallelism for linear attention with one all-gather of memory states.

Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid" (2025),
Algorithms 1-2 (forward) and 3-4 (backward); public code: OpenSparseLLMs/Linear-MoE ``lasp2``.

The sequence is split into ``W`` contiguous chunks of ``C = T / W`` tokens, chunk ``t`` on rank
``t`` of the mesh axis. With ``a = log λ`` per query head (``λ = 1`` without decay) each rank:

1. computes its memory state ``M_t = Σ_s λ^(C−1−s) φ(k_s)ᵀ v_s`` (``[B, H, F, E]``, no ``T``);
2. all-gathers the states, ``[M_0 … M_{W−1}]`` — the layer's only forward collective;
3. combines the earlier ranks' states, ``P_t = Σ_{r<t} λ^(C·(t−1−r)) M_r`` (the state right
   before its chunk: each rank hop decays by ``λ^C``);
4. outputs ``o_i = intra_i + σ φ(q_i) λ^(i+1) P_t``, with the intra-chunk term from the library's
   chunked Lightning path (``attnjax.linear.linear_attention``), which does not wait for step 2,
   so the all-gather overlaps with it.

Backward (a ``jax.custom_vjp`` around steps 2-3): each rank all-gathers ``dP_t`` (the paper's
``dM_t = (Λ Q_t)ᵀ dO_t``) — the only backward collective — and takes the decayed suffix sum
``dM_t = Σ_{t'>t} λ^(C·(t'−1−t)) dP_{t'}``. Everything local (intra, states, inter, the decay's
gradient) is differentiated by JAX. Non-causal attention uses ``P_t = Σ_{r≠t} M_r``.

Beyond the paper (causal only; flash-linear-attention's context parallelism needs B = 1 and drops
``initial_state``):

- **Packed sequences** (``segment_ids``, the state resets where the id changes): ``M_t`` sums only
  the chunk's last run, and rank ``r``'s state reaches rank ``t > r`` only if the run continues
  unbroken (every boundary between them continues the id, every rank in between is one run); the
  ``[W, 3, B]`` edge ids are all-gathered with the states. Only the tokens of a rank's first run
  read ``P_t``.
- **initial_state** ``S₀``: a state from "rank −1", weighted ``λ^(C·t)`` where its run reaches rank ``t``.
- **return_state**: the state after the last token, ``M_{W−1} + [rank W−1 is one run] λ^C P_{W−1}``,
  one ``psum`` of the weighted local states, identical on every rank (``linear_attention``'s final state).

The math per rank lives in ``attnjax.linear.sequence_state`` (the linear-state interface): ``lasp2`` runs
``linear_attention_chunk`` on ``AxisExchange``, this file's collectives (all-gather of the flattened states with
the custom backward above, psum, all-gather). ``lasp2_mechanism`` runs any registered mechanism that exposes
the interface (``chunk_attention``: Flow-Attention, InLine, RALA; the plain linear family through ``lasp2``)
on the same exchange.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from attnjax import registry
from attnjax.checks import describe
from attnjax.linear.feature_maps import FeatureMap
from attnjax.linear.linear_attention import checked_log_decay
from attnjax.linear.mechanism import LinearMechanism
from attnjax.linear.sequence_state import Tree, hop_weights, linear_attention_chunk, weighted_sum
from attnjax.meshes import vary_like
from attnjax.parallel.sharding import AxisNames, SequenceSharding, axis_size


@dataclasses.dataclass(frozen=True)
class AxisExchange:
    """``attnjax.linear.sequence_state.StateExchange`` over the mesh axis ``axis_name`` (inside ``shard_map``).

    Every method sends its whole pytree as one flat float32 buffer, so one call is one collective:
    ``total`` a ``psum``, ``gather`` an ``all_gather``, ``combine`` an ``all_gather`` forward and one of the
    cotangents backward (LASP-2 Alg. 4: ``dM_r = Σ_t w(t, r) dP_t``; the per-hop weight's gradient is local).

    Raises:
      ValueError: ``axis_name`` is not an axis of the enclosing ``shard_map``.
    """

    axis_name: str
    world: int = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "world", axis_size(self.axis_name))

    def rank(self) -> jax.Array:
        return lax.axis_index(self.axis_name)

    def total(self, tree: Tree) -> Tree:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        summed = _unpack(lax.psum(_pack(leaves), self.axis_name), leaves, stacked=False)
        return jax.tree_util.tree_unflatten(treedef, summed)

    def gather(self, tree: Tree) -> Tree:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return jax.tree_util.tree_unflatten(treedef, _gather_leaves(tuple(leaves), self.axis_name))

    def combine(self, tree: Tree, *, causal: bool, log_hop: Optional[jax.Array] = None,
                links: Optional[jax.Array] = None) -> Tree:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if log_hop is not None:
            log_hop = vary_like(log_hop, leaves)   # its cotangent is per device (computed from local cotangents)
        combined = _combine(tuple(leaves), log_hop, links, self.axis_name, causal)
        return jax.tree_util.tree_unflatten(treedef, combined)


def _pack(leaves) -> jax.Array:
    """The leaves raveled into one float32 vector."""
    flat = [x.astype(jnp.float32).reshape(-1) for x in leaves]
    return flat[0] if len(flat) == 1 else jnp.concatenate(flat)


def _unpack(flat: jax.Array, leaves, stacked: bool) -> list:
    """``_pack``'s inverse; ``stacked``: ``flat`` is ``[W, N]`` and each leaf comes back ``[W, ...]``."""
    lead = flat.shape[:1] if stacked else ()
    sizes = [x.size for x in leaves]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [lax.slice_in_dim(flat, o, o + n, axis=flat.ndim - 1).reshape(lead + x.shape)
            for o, n, x in zip(offsets, sizes, leaves)]


def _gather_leaves(leaves: tuple, axis_name: str) -> tuple:
    """Every rank's leaves, ``[W, ...]`` each, from one ``all_gather``."""
    return tuple(_unpack(lax.all_gather(_pack(leaves), axis_name), leaves, stacked=True))


def _weighted(gathered: tuple, log_hop, links, rank, causal: bool) -> tuple:
    """``P_rank = Σ_r w(rank, r) M_r`` for each gathered leaf ``[W, ...]``."""
    weights = hop_weights(log_hop, rank, jnp.arange(gathered[0].shape[0]), causal, links)
    return tuple(weighted_sum(weights, g) for g in gathered)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _combine(leaves: tuple, log_hop, links, axis_name: str, causal: bool) -> tuple:
    """All-gather the local states and combine the earlier ranks' (LASP-2 Alg. 2, lines 6-8)."""
    return _combine_fwd(leaves, log_hop, links, axis_name, causal)[0]


def _combine_fwd(leaves, log_hop, links, axis_name, causal):
    gathered = _gather_leaves(leaves, axis_name)
    return _weighted(gathered, log_hop, links, lax.axis_index(axis_name), causal), (gathered, log_hop, links)


def _combine_bwd(axis_name, causal, residuals, d_combined):
    """All-gather ``dP`` and take the weighted suffix sum (LASP-2 Alg. 4); ``d log_hop`` is local."""
    gathered, log_hop, links = residuals
    rank = lax.axis_index(axis_name)
    d_log_hop = None
    if log_hop is not None:
        _, vjp = jax.vjp(lambda a: _weighted(gathered, a, links, rank, causal), log_hop)
        (d_log_hop,) = vjp(tuple(d_combined))
    all_d = _gather_leaves(tuple(d_combined), axis_name)
    weights = hop_weights(log_hop, jnp.arange(all_d[0].shape[0]), rank, causal, links)
    d_leaves = tuple(weighted_sum(weights, d).astype(x.dtype) for d, x in zip(all_d, gathered))
    return d_leaves, d_log_hop, None if links is None else jnp.zeros_like(links)


_combine.defvjp(_combine_fwd, _combine_bwd)


def lasp2(
    q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str, decay: Union[None, str, jax.Array] = None,
    feature_map: Union[str, FeatureMap] = "identity", causal: bool = True, normalize: bool = False,
    scale: Optional[float] = None, chunk_size: int = 64, segment_ids: Optional[jax.Array] = None,
    initial_state: Optional[jax.Array] = None, return_state: bool = False, implementation: str = "auto",
):
    """LASP-2 linear attention over a sequence sharded along ``axis_name`` (call inside ``shard_map``).

    Equals ``attnjax.linear.linear_attention`` on the whole sequence (see the module docstring);
    ``attnjax.linear.sequence_state.linear_attention_chunk`` on ``AxisExchange(axis_name)``.

    Args:
      q: local ``[B, C, Hq, Dk]``; k: ``[B, C, Hkv, Dk]``; v: ``[B, C, Hkv, Dv]`` — rank ``t`` of
        ``axis_name`` holds global positions ``[t·C, (t+1)·C)`` (contiguous layout).
      axis_name: the mesh axis the sequence is sharded over.
      decay: ``None``, ``"alibi"`` or float ``[Hq]`` with ``0 < λ ≤ 1`` (causal only);
        differentiable. With heads sharded, pass this rank's ``λ`` array (``"alibi"`` would take
        the slopes of the local heads only; ``lasp2_sharded`` resolves it globally).
      feature_map, causal, normalize, scale, chunk_size, implementation: as in
        ``linear_attention`` (``chunk_size`` and ``implementation`` serve the intra-chunk term).
      segment_ids: local int ``[B, C]`` packed-sequence ids (global ids, the local shard of ``[B, T]``).
      initial_state: float ``[B, Hq, Dk', Dv]`` (``Dv + 1`` with ``normalize``), the same on every rank.
      return_state: also return the float32 final state (same shape, the same on every rank).
    Returns:
      ``[B, C, Hq, Dv]`` in q's dtype, or ``(out, final_state)``.
    Raises:
      NotImplementedError: ``segment_ids``, ``initial_state`` or ``return_state`` with ``causal=False``
        (states are carried along the causal order).

    Communication per call (per device): one all-gather of the ``[B, Hkv, G, F, E]`` float32 states
    (``G = Hq/Hkv`` with decay, 1 without; ``E = Dv + 1`` with ``normalize``) forward, and one of
    the same size backward; neither depends on ``C``.
    """
    return linear_attention_chunk(q, k, v, exchange=AxisExchange(axis_name), decay=decay, feature_map=feature_map,
                                  causal=causal, normalize=normalize, scale=scale, chunk_size=chunk_size,
                                  segment_ids=segment_ids, initial_state=initial_state, return_state=return_state,
                                  implementation=implementation)


def lasp2_sharded(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh, seq_axis: str, batch_axis: AxisNames = None,
    head_axis: AxisNames = None, decay: Union[None, str, jax.Array] = None, segment_ids: Optional[jax.Array] = None,
    initial_state: Optional[jax.Array] = None, return_state: bool = False, **kwargs,
):
    """``lasp2`` on global arrays: ``shard_map`` over ``mesh`` (``attnjax.parallel.sharding``).

    Args:
      q, k, v: global ``[B, T, H, D]`` arrays in natural (contiguous) order; ``T`` must divide by
        the ``seq_axis`` size, ``B`` by the ``batch_axis`` size and the heads by the ``head_axis`` size.
      mesh: a mesh with those axes (``jax.make_mesh``, Explicit or Auto axes, or ``jax.sharding.Mesh``).
      seq_axis, batch_axis, head_axis: mesh axes sharding the sequence, batch and heads.
      decay: as in ``lasp2``, for all ``Hq`` heads (sharded with the heads).
      segment_ids: int ``[B, T]`` packed-sequence ids; initial_state: ``[B, Hq, Dk', Dv]``;
        return_state: also return the final state (causal only, as in ``lasp2``).
      **kwargs: the other arguments of ``lasp2``.
    Returns:
      ``[B, T, Hq, Dv]``, sharded like q, or ``(out, final_state [B, Hq, Dk', Dv])``.
    """
    seq = SequenceSharding(mesh, seq_axis, batch_axis, head_axis)
    seq.check(q, k, v, segment_ids)
    tokens = seq.tokens_spec
    causal = kwargs.get("causal", True)
    log_lam = None if decay is None else checked_log_decay(decay, q.shape[2], causal)  # checked here: traced inside
    extras = {"decay": (None if decay is None else jnp.exp(log_lam) if isinstance(decay, str) else jnp.asarray(decay),
                        PartitionSpec(tokens[2])),
              "segment_ids": (segment_ids, seq.ids_spec), "initial_state": (initial_state, seq.state_spec)}
    extras = {name: value for name, value in extras.items() if value[0] is not None}
    names = tuple(extras)

    def body(q, k, v, *values):
        return lasp2(q, k, v, axis_name=seq_axis, return_state=return_state, **dict(zip(names, values)), **kwargs)

    out_specs = (tokens, seq.state_spec) if return_state else tokens
    return seq.run(body, (q, k, v) + tuple(v_ for v_, _ in extras.values()),
                   (tokens,) * 3 + tuple(spec for _, spec in extras.values()), out_specs)




def lasp2_mechanism(q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str, mechanism, causal: bool = False,
                    **inputs) -> jax.Array:
    """LASP-2 for a linear-family mechanism that exposes the linear-state interface (call inside ``shard_map``).

    Runs the mechanism's chunk function (``attnjax.linear.sequence_state``) on ``AxisExchange(axis_name)``:
    the config's ``chunk_attention`` (``Flow``, ``InLine``, ``RALA``), or, for the plain linear family
    (``linear``, ``lightning``, ``performer``, ``based_linear``), ``lasp2``'s ``linear_attention_chunk`` with the
    config's feature map, normalization, decay and chunk. Equals the mechanism on the whole sequence.

    Args:
      q: local ``[B, C, Hq, D]``; k: ``[B, C', Hkv, D]``; v: ``[B, C', Hkv, Dv]``: rank ``t`` holds the ``t``-th
        contiguous chunk of the queries and of the keys (causal: ``C' = C``).
      axis_name: the mesh axis the sequence is sharded over.
      mechanism: a registry name or config (``attnjax.registry``).
      causal: the causal form (Flow, the plain linear family), else every query sees every key.
      **inputs: the mechanism's call inputs: ``scale`` (InLine, RALA, plain linear), ``rotary`` (RALA: this
        rank's ``(sin, cos)`` rows, each ``[C, D]``).
    Returns:
      ``[B, C, Hq, Dv]`` in q's dtype.
    Raises:
      NotImplementedError: the mechanism exposes no linear state (or refuses, as ``kernelized_rpe``, whose
        relative-position Toeplitz product has no finite state across a sequence split), or has no ``causal``
        form when asked for one.
      ValueError: ``axis_name`` is not an axis of the enclosing ``shard_map``.

    Communication: the mechanism's ``total``/``combine``/``gather`` calls, each one collective of a state whose
    size does not depend on ``C`` (see each ``chunk_attention``).
    """
    config = registry.resolve(mechanism)
    exchange = AxisExchange(axis_name)
    if isinstance(config, LinearMechanism):
        unknown = set(inputs) - {"scale"}
        if unknown:
            raise TypeError(f"{config.name} takes no inputs {sorted(unknown)} (only scale)")
        if config.decay is not None and not causal:
            raise NotImplementedError(f"{config.name} has a decay, which needs causal=True")
        decay = jnp.asarray(config.decay, jnp.float32) if isinstance(config.decay, tuple) else config.decay
        return linear_attention_chunk(q, k, v, exchange=exchange, decay=decay, feature_map=config.feature_map,
                                      causal=causal, normalize=config.normalize, scale=inputs.get("scale"),
                                      chunk_size=config.chunk_size)
    chunk_attention = getattr(config, "chunk_attention", None)
    if chunk_attention is None:
        raise NotImplementedError(f"mechanism {config.name!r} exposes no linear state (its config has no "
                                  "chunk_attention; see attnjax.linear.sequence_state), so LASP-2 can't split it")
    return chunk_attention(q, k, v, exchange=exchange, causal=causal, **inputs)


def lasp2_mechanism_sharded(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh, seq_axis: str, mechanism,
                            batch_axis: AxisNames = None, head_axis: AxisNames = None, causal: bool = False,
                            rotary: Optional[tuple] = None, **inputs) -> jax.Array:
    """``lasp2_mechanism`` on global arrays: ``shard_map`` over ``mesh`` (``attnjax.parallel.sharding``).

    Args:
      q, k, v: global ``[B, T, H, D]`` arrays in natural (contiguous) order; ``T`` must divide by the
        ``seq_axis`` size, ``B`` by the ``batch_axis`` size and the heads by the ``head_axis`` size.
      mesh, seq_axis, batch_axis, head_axis: as in ``lasp2_sharded``.
      mechanism, causal, **inputs: as in ``lasp2_mechanism`` (non-array inputs, e.g. ``scale``).
      rotary: RALA's ``(sin, cos)`` tables, each ``[T, D]``, sharded over the sequence with the tokens.
    Returns:
      ``[B, T, Hq, Dv]``, sharded like q.
    """
    seq = SequenceSharding(mesh, seq_axis, batch_axis, head_axis)
    seq.check(q, k, v)
    if rotary is not None and (not isinstance(rotary, (tuple, list)) or len(rotary) != 2
                               or any(getattr(t, "shape", None) != (q.shape[1], q.shape[-1]) for t in rotary)):
        seen = [describe(t) for t in rotary] if isinstance(rotary, (tuple, list)) else describe(rotary)
        raise ValueError(f"rotary must be (sin, cos), each of shape [T, D] = {[q.shape[1], q.shape[-1]]}, got {seen}")
    tokens = seq.tokens_spec

    def body(q, k, v, *tables):
        extra = {"rotary": tuple(tables)} if tables else {}
        return lasp2_mechanism(q, k, v, axis_name=seq_axis, mechanism=mechanism, causal=causal, **extra, **inputs)

    tables = () if rotary is None else tuple(rotary)
    return seq.run(body, (q, k, v) + tables, (tokens,) * 3 + (PartitionSpec(seq_axis, None),) * len(tables))


__all__ = ["AxisExchange", "lasp2", "lasp2_sharded", "lasp2_mechanism", "lasp2_mechanism_sharded"]
