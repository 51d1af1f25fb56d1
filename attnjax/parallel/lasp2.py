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
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from attnjax.linear.feature_maps import FeatureMap
from attnjax.linear.linear_attention import NORMALIZER_EPS, checked_log_decay, linear_attention, prepare_inputs
from attnjax.meshes import vary_like
from attnjax.parallel.sharding import AxisNames, SequenceSharding, axis_size


def lasp2(
    q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str, decay: Union[None, str, jax.Array] = None,
    feature_map: Union[str, FeatureMap] = "identity", causal: bool = True, normalize: bool = False,
    scale: Optional[float] = None, chunk_size: int = 64, segment_ids: Optional[jax.Array] = None,
    initial_state: Optional[jax.Array] = None, return_state: bool = False, implementation: str = "auto",
):
    """LASP-2 linear attention over a sequence sharded along ``axis_name`` (call inside ``shard_map``).

    Equals ``attnjax.linear.linear_attention`` on the whole sequence (see the module docstring).

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
    world = axis_size(axis_name)
    if not causal and (segment_ids is not None or initial_state is not None or return_state):
        raise NotImplementedError("LASP-2 carries segments and states along the causal order: segment_ids, "
                                  "initial_state and return_state need causal=True")
    x = prepare_inputs(q, k, v, feature_map=feature_map, causal=causal, normalize=normalize, decay=decay, scale=scale,
                       segment_ids=segment_ids, cu_seqlens=None, initial_state=initial_state)
    B, C, Hkv, G, _ = x.fq.shape
    log_decay = x.log_decay if decay is not None else jnp.zeros((Hkv, 1), jnp.float32)
    position = jnp.arange(C, dtype=jnp.float32)
    to_end = jnp.exp(log_decay[..., None] * (C - 1 - position))                     # [Hkv, G|1, C]
    last_run = jnp.ones((B, C), jnp.float32) if x.runs is None else (x.runs == x.runs[:, -1:]).astype(jnp.float32)
    states = jnp.einsum("bshf,bshe,hgs,bs->bhgfe", x.fk, x.v, to_end, last_run)     # M_t (its last run)
    log_decay = vary_like(log_decay, states)
    links = _links(segment_ids, x.runs, axis_name, world) if x.runs is not None else None
    prefix = _prefix_states(states, log_decay, links, axis_name, C, causal)        # P_t
    rank = lax.axis_index(axis_name)
    if x.state is not None:
        prefix = prefix + _initial_weight(log_decay, links, rank, C)[..., None, None] * x.state
    from_start = jnp.exp(log_decay[..., None] * (position + 1))                    # λ^(i+1)
    first_run = jnp.ones((B, C), jnp.float32) if x.runs is None else (x.runs == 0).astype(jnp.float32)
    inter = jnp.einsum("bthgf,hgt,bhgfe,bt->bthge", x.fq, from_start, prefix, first_run)
    v_intra = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1) if normalize else v
    # A zero initial state typed like the local states: the chunked scan's carry must be per-device
    # under shard_map(check_vma=True).
    zero_state = vary_like(jnp.zeros((B, Hkv * G, x.fq.shape[-1], x.v.shape[-1]), jnp.float32), states)
    intra = linear_attention(q, k, v_intra, feature_map=feature_map, causal=causal, decay=decay, scale=scale,
                             chunk_size=chunk_size, segment_ids=segment_ids, initial_state=zero_state,
                             implementation=implementation)
    out = intra.astype(jnp.float32) + inter.reshape(B, C, Hkv * G, -1)
    if normalize:
        out = out[..., :-1] / (out[..., -1:] + NORMALIZER_EPS)
    out = out.astype(q.dtype)
    if not return_state:
        return out
    final = _final_state(states, prefix, log_decay, x.runs, rank, world, C, axis_name)
    return out, jnp.broadcast_to(final, (B, Hkv, G) + final.shape[-2:]).reshape(B, Hkv * G, *final.shape[-2:])


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


def _links(segment_ids: jax.Array, runs: jax.Array, axis_name: str, world: int) -> jax.Array:
    """``links[t, r + 1, b]`` (``r = −1 … W−1``): 1 where the run ending rank ``r`` (rank −1: the
    initial state) continues unbroken to the start of rank ``t > r``, else 0; float32 ``[W, W + 1, B]``.

    Rank ``u``'s boundary continues if its first id equals rank ``u−1``'s last id; a path from ``r``
    to ``t`` needs every boundary ``r+1 … t`` to continue and every rank ``r+1 … t−1`` to be one run.
    """
    edges = jnp.stack([segment_ids[:, 0], segment_ids[:, -1], (runs[:, -1] == 0).astype(segment_ids.dtype)])
    gathered = lax.all_gather(edges, axis_name)                                      # [W, 3, B]
    first, last, whole = gathered[:, 0], gathered[:, 1], gathered[:, 2] > 0
    breaks = jnp.concatenate([jnp.zeros_like(first[:1], bool), first[1:] != last[:-1]])  # boundary u breaks
    zero = jnp.zeros_like(first[:1], jnp.int32)
    cut = jnp.concatenate([zero, jnp.cumsum(breaks, 0, dtype=jnp.int32)])            # index u+1: breaks ≤ u
    split = jnp.concatenate([zero, jnp.cumsum(~whole, 0, dtype=jnp.int32)])          # index u+1: split ranks ≤ u
    t, r = jnp.arange(world)[:, None], jnp.arange(-1, world)[None, :]
    unbroken = cut[t + 1] == cut[r + 1]                                               # [W, W + 1, B]
    one_run = split[t] == split[jnp.minimum(r + 1, t)]
    return ((r < t)[..., None] & unbroken & one_run).astype(jnp.float32)


def _initial_weight(log_decay: jax.Array, links: Optional[jax.Array], rank, chunk: int) -> jax.Array:
    """Weight ``λ^(C·rank)`` (times the link from rank −1) of the initial state in ``P_rank``: ``[B|1, Hkv, G]``."""
    weight = jnp.exp(log_decay * chunk * rank.astype(jnp.float32))[None]
    return weight if links is None else weight * links[rank, 0][:, None, None]


def _final_state(states, prefix, log_decay, runs, rank, world: int, chunk: int, axis_name: str) -> jax.Array:
    """The state after the last token: rank ``W−1`` gives ``M + [one run] λ^C P``, the others 0; summed over ranks."""
    whole = jnp.ones(states.shape[:1], jnp.float32) if runs is None else (runs[:, -1] == 0).astype(jnp.float32)
    carried = whole[:, None, None, None, None] * jnp.exp(log_decay * chunk)[..., None, None] * prefix
    mine = jnp.where(rank == world - 1, states + carried, 0.0)
    return lax.psum(mine, axis_name)


def _hop_weights(log_decay: jax.Array, target, source, chunk: int, causal: bool, links=None) -> jax.Array:
    """Weight of rank ``source``'s state in rank ``target``'s prefix: ``[..., B|1, Hkv, G]``.

    Causal: ``λ^(C·(target−1−source))`` if ``source < target`` else 0, times ``links[target, source + 1]``
    under segments; non-causal: ``source ≠ target``.
    """
    target = jnp.asarray(target)[..., None, None, None]
    source = jnp.asarray(source)[..., None, None, None]
    if not causal:
        return jnp.where(source != target, jnp.ones_like(log_decay), 0.0)
    hops = (target - 1 - source).astype(jnp.float32)
    weight = jnp.exp(jnp.where(source < target, log_decay * chunk * hops, -jnp.inf))
    if links is None:
        return weight
    return weight * links[target[..., 0, 0, 0], source[..., 0, 0, 0] + 1][..., None, None]


def _combine(gathered: jax.Array, log_decay: jax.Array, links, rank, chunk: int, causal: bool) -> jax.Array:
    """``P_rank = Σ_r w(rank, r) M_r`` from the gathered states ``[W, B, Hkv, G, F, E]``."""
    weights = _hop_weights(log_decay, rank, jnp.arange(gathered.shape[0]), chunk, causal, links)   # [W, B|1, Hkv, G]
    return jnp.einsum("rbhg,rbhgfe->bhgfe", weights, gathered)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _prefix_states(states: jax.Array, log_decay: jax.Array, links, axis_name: str, chunk: int,
                   causal: bool) -> jax.Array:
    """All-gather the local states and combine the earlier ranks' (LASP-2 Alg. 2, lines 6-8)."""
    return _prefix_states_fwd(states, log_decay, links, axis_name, chunk, causal)[0]


def _prefix_states_fwd(states, log_decay, links, axis_name, chunk, causal):
    gathered = lax.all_gather(states, axis_name)
    prefix = _combine(gathered, log_decay, links, lax.axis_index(axis_name), chunk, causal)
    return prefix, (gathered, log_decay, links)


def _prefix_states_bwd(axis_name, chunk, causal, residuals, d_prefix):
    """All-gather ``dP`` and take the decayed suffix sum (LASP-2 Alg. 4); ``dlog_decay`` is local."""
    gathered, log_decay, links = residuals
    rank = lax.axis_index(axis_name)
    _, vjp = jax.vjp(lambda a: _combine(gathered, a, links, rank, chunk, causal), log_decay)
    (d_log_decay,) = vjp(d_prefix)
    all_d_prefix = lax.all_gather(d_prefix, axis_name)
    weights = _hop_weights(log_decay, jnp.arange(all_d_prefix.shape[0]), rank, chunk, causal, links)  # [W, B|1, Hkv, G]
    d_states = jnp.einsum("tbhg,tbhgfe->bhgfe", weights, all_d_prefix)
    d_links = None if links is None else jnp.zeros_like(links)
    return d_states, d_log_decay, d_links


_prefix_states.defvjp(_prefix_states_fwd, _prefix_states_bwd)

__all__ = ["lasp2", "lasp2_sharded"]
