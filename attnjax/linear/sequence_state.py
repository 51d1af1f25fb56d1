"""The linear-state interface: what a linear-family mechanism provides so LASP-2 can split its sequence.

Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid" (2025), Alg. 1-4:
every device holds a contiguous chunk of ``C`` tokens (chunk ``t`` on rank ``t`` of ``W``), sums its chunk into
a state whose size does not depend on ``C``, exchanges the states, and forms its outputs from its own chunk
(the intra-chunk part) plus the combined states of the other chunks.

A mechanism takes part by writing its fast path on one chunk against a ``StateExchange`` (a *chunk function*,
``f(q, k, v, *, exchange, causal, ...)`` on the chunk's ``[B, C, H, D]`` tokens):

- the **local contributions** are whatever sums its math needs over the chunk's tokens (``φ(k)ᵀv``, ``Σφ(k)``,
  ``Σv``, flows, softmax normalizers, ...), any pytree of float32 arrays;
- the **combination** is the exchange's: ``total`` (the sum over all chunks: one all-reduce), ``combine``
  (non-causal: the sum over the other chunks; causal: over the earlier chunks, each hop weighted ``λ^C`` with
  a decay, and cut where packed sequences break) and ``gather`` (every chunk's values, for merges that are not
  sums, such as a log-sum-exp);
- the **output** is the chunk function's own: the intra-chunk result plus the combined states.

Global reductions a mechanism needs before its state (Flow's flows, RALA's mean query) are more ``total``
calls, each one collective. On one device the exchange is ``WHOLE`` (one chunk: ``total`` is the identity,
``combine`` gives zeros), so a mechanism's single-device fast path *is* its chunk function on ``WHOLE``:
``flow_attention``, ``inline_attention`` and ``rala`` run that way, and ``attnjax.parallel.lasp2_mechanism``
runs the same code on ``attnjax.parallel.AxisExchange``.

A registered mechanism config exposes the interface with a method ``chunk_attention(q, k, v, *, exchange,
causal, **inputs)`` (``Flow``, ``InLine``, ``RALA``; ``KernelizedRPE``'s refuses, naming why). Plain linear
attention (feature maps, decay, packed segments, initial and final state) is ``linear_attention_chunk`` below,
which ``attnjax.parallel.lasp2`` runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Union

import jax
import jax.numpy as jnp

from attnjax.linear.feature_maps import FeatureMap
from attnjax.linear.linear_attention import NORMALIZER_EPS, linear_attention, prepare_inputs
from attnjax.meshes import vary_like

Tree = Any
"""A pytree of float32 arrays (one chunk's sums)."""


class StateExchange(Protocol):
    """How one chunk's sums meet the other chunks' (see the module docstring).

    Attributes:
      world: the number of chunks ``W`` (a Python int).
    """

    world: int

    def rank(self) -> jax.Array:
        """This chunk's index ``t`` (int32 scalar); it holds global tokens ``[t·C, (t+1)·C)``."""

    def total(self, tree: Tree) -> Tree:
        """``Σ_r x_r`` over every chunk (this one included), leaf by leaf: one collective for the whole tree."""

    def combine(self, tree: Tree, *, causal: bool, log_hop: Optional[jax.Array] = None,
                links: Optional[jax.Array] = None) -> Tree:
        """``P_t = Σ_r w(t, r) x_r``: causal ``w = exp(log_hop·(t−1−r))·links[t, r+1]`` for ``r < t``, else 0;
        non-causal ``w = [r ≠ t]``. ``log_hop`` (per-hop log weight, e.g. ``C·log λ``) broadcasts against the
        leading dims of each leaf; ``links`` ``[W, W + 1, B]`` (``segment_links``) against the first (batch) dim."""

    def gather(self, tree: Tree) -> Tree:
        """Every chunk's leaves stacked, ``[W, ...]`` (the same on every chunk)."""


@dataclasses.dataclass(frozen=True)
class WholeSequence:
    """The exchange of an unsplit sequence: one chunk, ``total`` is the identity, ``combine`` gives zeros."""

    world: int = dataclasses.field(default=1, init=False)

    def rank(self) -> jax.Array:
        return jnp.zeros((), jnp.int32)

    def total(self, tree: Tree) -> Tree:
        return tree

    def combine(self, tree: Tree, *, causal: bool, log_hop: Optional[jax.Array] = None,
                links: Optional[jax.Array] = None) -> Tree:
        return jax.tree_util.tree_map(lambda x: vary_like(jnp.zeros_like(x), x), tree)

    def gather(self, tree: Tree) -> Tree:
        return jax.tree_util.tree_map(lambda x: x[None], tree)


WHOLE = WholeSequence()
"""The single-device exchange."""


def hop_weights(log_hop: Optional[jax.Array], target, source, causal: bool,
                links: Optional[jax.Array] = None) -> jax.Array:
    """Weight of chunk ``source``'s state in chunk ``target``'s combined state (``StateExchange.combine``).

    Args:
      log_hop: None (weight 1 per hop) or the per-hop log weight, shape ``L`` (e.g. ``[1, Hkv, G]``).
      target, source: int arrays that broadcast together to ``lead``.
      causal: earlier chunks (decayed) or every other chunk.
      links: float ``[W, W + 1, B]`` from ``segment_links`` (causal only), or None.
    Returns:
      float32 ``lead + L`` (``lead + [B] + L[1:]`` with links; ``lead + [B]`` with links and no ``log_hop``).
    """
    base = jnp.zeros((), jnp.float32) if log_hop is None else log_hop
    target, source = jnp.asarray(target), jnp.asarray(source)
    pad = (1,) * base.ndim
    t, s = target.reshape(target.shape + pad), source.reshape(source.shape + pad)
    if not causal:
        return jnp.where(s != t, jnp.ones_like(base), 0.0)
    weight = jnp.exp(jnp.where(s < t, base * (t - 1 - s).astype(jnp.float32), -jnp.inf))
    if links is None:
        return weight
    link = links[target, source + 1]                                            # lead + [B]
    if base.ndim == 0:
        return weight[..., None] * link
    return weight * link.reshape(link.shape + (1,) * (base.ndim - 1))


def weighted_sum(weights: jax.Array, stacked: jax.Array) -> jax.Array:
    """``Σ_r weights[r] · stacked[r]``, the weights' dims aligned with the leading dims of ``stacked[r]``."""
    w = weights.reshape(weights.shape + (1,) * (stacked.ndim - weights.ndim))
    return jnp.sum(w * stacked, axis=0)


def segment_links(segment_ids: jax.Array, runs: jax.Array, exchange: StateExchange) -> jax.Array:
    """``links[t, r + 1, b]`` (``r = −1 … W−1``): 1 where the run ending chunk ``r`` (chunk −1: the initial
    state) continues unbroken to the start of chunk ``t > r``, else 0; float32 ``[W, W + 1, B]``.

    Chunk ``u``'s boundary continues if its first id equals chunk ``u−1``'s last id; a path from ``r`` to ``t``
    needs every boundary ``r+1 … t`` to continue and every chunk ``r+1 … t−1`` to be one run. The ``[W, 3, B]``
    edge ids are the exchange's ``gather``.
    """
    edges = jnp.stack([segment_ids[:, 0], segment_ids[:, -1], (runs[:, -1] == 0).astype(segment_ids.dtype)])
    gathered = exchange.gather(edges)                                                # [W, 3, B]
    first, last, whole = gathered[:, 0], gathered[:, 1], gathered[:, 2] > 0
    breaks = jnp.concatenate([jnp.zeros_like(first[:1], bool), first[1:] != last[:-1]])  # boundary u breaks
    zero = jnp.zeros_like(first[:1], jnp.int32)
    cut = jnp.concatenate([zero, jnp.cumsum(breaks, 0, dtype=jnp.int32)])            # index u+1: breaks ≤ u
    split = jnp.concatenate([zero, jnp.cumsum(~whole, 0, dtype=jnp.int32)])          # index u+1: split chunks ≤ u
    t, r = jnp.arange(exchange.world)[:, None], jnp.arange(-1, exchange.world)[None, :]
    unbroken = cut[t + 1] == cut[r + 1]                                               # [W, W + 1, B]
    one_run = split[t] == split[jnp.minimum(r + 1, t)]
    return ((r < t)[..., None] & unbroken & one_run).astype(jnp.float32)


def linear_attention_chunk(
    q: jax.Array, k: jax.Array, v: jax.Array, *, exchange: StateExchange, decay: Union[None, str, jax.Array] = None,
    feature_map: Union[str, FeatureMap] = "identity", causal: bool = True, normalize: bool = False,
    scale: Optional[float] = None, chunk_size: int = 64, segment_ids: Optional[jax.Array] = None,
    initial_state: Optional[jax.Array] = None, return_state: bool = False, implementation: str = "auto",
):
    """Plain linear attention (``attnjax.linear.linear_attention``) on chunk ``t`` of ``W`` (LASP-2 Alg. 1-2).

    With ``a = log λ`` per query head (``λ = 1`` without decay):

    1. local state ``M_t = Σ_s λ^(C−1−s) φ(k_s)ᵀ v_s`` (``[B, Hkv, G|1, F, E]``; under segments, the chunk's last
       run only);
    2. ``P_t = exchange.combine(M)`` with ``log_hop = C·a``: ``Σ_{r<t} λ^(C·(t−1−r)) M_r`` (non-causal:
       ``Σ_{r≠t} M_r``); with ``initial_state`` ``S₀`` add ``λ^(C·t) S₀`` where its run reaches chunk ``t``;
    3. ``o_i = intra_i + σ φ(q_i) λ^(i+1) P_t`` (only the chunk's first run reads ``P_t``), the intra-chunk term
       from ``linear_attention``'s chunked path, which does not wait for step 2;
    4. final state ``M_{W−1} + [chunk W−1 is one run] λ^C P_{W−1}``, one ``exchange.total``.

    Args:
      q: chunk ``[B, C, Hq, Dk]``; k: ``[B, C, Hkv, Dk]``; v: ``[B, C, Hkv, Dv]``.
      exchange: the ``StateExchange`` (``WHOLE`` on one device).
      decay, feature_map, causal, normalize, scale, chunk_size, implementation: as in ``linear_attention``.
      segment_ids: int ``[B, C]``, the chunk's global packed-sequence ids (causal only).
      initial_state: float ``[B, Hq, Dk', Dv]`` (``Dv + 1`` with ``normalize``), the same on every chunk.
      return_state: also return the float32 final state (the same on every chunk).
    Returns:
      ``[B, C, Hq, Dv]`` in q's dtype, or ``(out, final_state)``.
    Raises:
      NotImplementedError: ``segment_ids``, ``initial_state`` or ``return_state`` with ``causal=False``.
    """
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
    links = segment_links(segment_ids, x.runs, exchange) if x.runs is not None else None
    prefix = exchange.combine(states, causal=causal, log_hop=log_decay[None] * C, links=links)   # P_t
    rank = exchange.rank()
    if x.state is not None:
        initial = jnp.exp(log_decay * C * rank.astype(jnp.float32))[None]          # λ^(C·t), [1, Hkv, G]
        if links is not None:
            initial = initial * links[rank, 0][:, None, None]
        prefix = prefix + initial[..., None, None] * x.state
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
    whole = jnp.ones((B,), jnp.float32) if x.runs is None else (x.runs[:, -1] == 0).astype(jnp.float32)
    carried = whole[:, None, None, None, None] * jnp.exp(log_decay * C)[..., None, None] * prefix
    final = exchange.total(jnp.where(rank == exchange.world - 1, states + carried, 0.0))
    return out, jnp.broadcast_to(final, (B, Hkv, G) + final.shape[-2:]).reshape(B, Hkv * G, *final.shape[-2:])


__all__ = ["StateExchange", "WholeSequence", "WHOLE", "hop_weights", "weighted_sum", "segment_links",
           "linear_attention_chunk"]
