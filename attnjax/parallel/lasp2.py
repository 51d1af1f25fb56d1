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
    scale: Optional[float] = None, chunk_size: int = 64, implementation: str = "auto",
) -> jax.Array:
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
    Returns:
      ``[B, C, Hq, Dv]`` in q's dtype.

    Communication per call (per device): one all-gather of the ``[B, Hkv, G, F, E]`` float32 states
    (``G = Hq/Hkv`` with decay, 1 without; ``E = Dv + 1`` with ``normalize``) forward, and one of
    the same size backward; neither depends on ``C``.
    """
    axis_size(axis_name)
    x = prepare_inputs(q, k, v, feature_map=feature_map, causal=causal, normalize=normalize, decay=decay, scale=scale,
                 segment_ids=None, cu_seqlens=None, initial_state=None)
    B, C, Hkv, G, _ = x.fq.shape
    log_decay = x.log_decay if decay is not None else jnp.zeros((Hkv, 1), jnp.float32)
    position = jnp.arange(C, dtype=jnp.float32)
    to_end = jnp.exp(log_decay[..., None] * (C - 1 - position))                     # [Hkv, G|1, C]
    states = jnp.einsum("bshf,bshe,hgs->bhgfe", x.fk, x.v, to_end)                  # M_t
    log_decay = vary_like(log_decay, states)
    prefix = _prefix_states(states, log_decay, axis_name, C, causal)               # P_t
    from_start = jnp.exp(log_decay[..., None] * (position + 1))                    # λ^(i+1)
    inter = jnp.einsum("bthgf,hgt,bhgfe->bthge", x.fq, from_start, prefix)
    v_intra = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1) if normalize else v
    # A zero initial state typed like the local states: the chunked scan's carry must be per-device
    # under shard_map(check_vma=True).
    zero_state = vary_like(jnp.zeros((B, Hkv * G, x.fq.shape[-1], x.v.shape[-1]), jnp.float32), states)
    intra = linear_attention(q, k, v_intra, feature_map=feature_map, causal=causal, decay=decay, scale=scale,
                             chunk_size=chunk_size, initial_state=zero_state, implementation=implementation)
    out = intra.astype(jnp.float32) + inter.reshape(B, C, Hkv * G, -1)
    if normalize:
        out = out[..., :-1] / (out[..., -1:] + NORMALIZER_EPS)
    return out.astype(q.dtype)


def lasp2_sharded(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh, seq_axis: str, batch_axis: AxisNames = None,
    head_axis: AxisNames = None, decay: Union[None, str, jax.Array] = None, **kwargs,
) -> jax.Array:
    """``lasp2`` on global arrays: ``shard_map`` over ``mesh`` (``attnjax.parallel.sharding``).

    Args:
      q, k, v: global ``[B, T, H, D]`` arrays in natural (contiguous) order; ``T`` must divide by
        the ``seq_axis`` size, ``B`` by the ``batch_axis`` size and the heads by the ``head_axis`` size.
      mesh: a mesh with those axes (``jax.make_mesh``, Explicit or Auto axes, or ``jax.sharding.Mesh``).
      seq_axis, batch_axis, head_axis: mesh axes sharding the sequence, batch and heads.
      decay: as in ``lasp2``, for all ``Hq`` heads (sharded with the heads).
      **kwargs: the other arguments of ``lasp2``.
    Returns:
      ``[B, T, Hq, Dv]``, sharded like q.
    """
    seq = SequenceSharding(mesh, seq_axis, batch_axis, head_axis)
    seq.check(q, k, v)
    tokens = seq.tokens_spec
    body = functools.partial(lasp2, axis_name=seq_axis, **kwargs)
    if decay is None:
        return seq.run(body, (q, k, v), (tokens,) * 3)
    log_lam = checked_log_decay(decay, q.shape[2], kwargs.get("causal", True))  # checked here: traced inside shard_map
    decay = jnp.exp(log_lam) if isinstance(decay, str) else decay
    return seq.run(lambda q, k, v, lam: body(q, k, v, decay=lam), (q, k, v, jnp.asarray(decay)),
                   (tokens,) * 3 + (PartitionSpec(tokens[2]),))


def _hop_weights(log_decay: jax.Array, target, source, chunk: int, causal: bool) -> jax.Array:
    """Weight of rank ``source``'s state in rank ``target``'s prefix, broadcast with ``[Hkv, G]``.

    Causal: ``λ^(C·(target−1−source))`` if ``source < target`` else 0; non-causal: ``source ≠ target``.
    """
    target = jnp.asarray(target)[..., None, None]
    source = jnp.asarray(source)[..., None, None]
    if not causal:
        return jnp.where(source != target, jnp.ones_like(log_decay), 0.0)
    hops = (target - 1 - source).astype(jnp.float32)
    return jnp.exp(jnp.where(source < target, log_decay * chunk * hops, -jnp.inf))


def _combine(gathered: jax.Array, log_decay: jax.Array, rank, chunk: int, causal: bool) -> jax.Array:
    """``P_rank = Σ_r w(rank, r) M_r`` from the gathered states ``[W, B, Hkv, G, F, E]``."""
    weights = _hop_weights(log_decay, rank, jnp.arange(gathered.shape[0]), chunk, causal)   # [W, Hkv, G]
    return jnp.einsum("rhg,rbhgfe->bhgfe", weights, gathered)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _prefix_states(states: jax.Array, log_decay: jax.Array, axis_name: str, chunk: int, causal: bool) -> jax.Array:
    """All-gather the local states and combine the earlier ranks' (LASP-2 Alg. 2, lines 6-8)."""
    return _prefix_states_fwd(states, log_decay, axis_name, chunk, causal)[0]


def _prefix_states_fwd(states, log_decay, axis_name, chunk, causal):
    gathered = lax.all_gather(states, axis_name)
    return _combine(gathered, log_decay, lax.axis_index(axis_name), chunk, causal), (gathered, log_decay)


def _prefix_states_bwd(axis_name, chunk, causal, residuals, d_prefix):
    """All-gather ``dP`` and take the decayed suffix sum (LASP-2 Alg. 4); ``dlog_decay`` is local."""
    gathered, log_decay = residuals
    rank = lax.axis_index(axis_name)
    _, vjp = jax.vjp(lambda a: _combine(gathered, a, rank, chunk, causal), log_decay)
    (d_log_decay,) = vjp(d_prefix)
    all_d_prefix = lax.all_gather(d_prefix, axis_name)
    weights = _hop_weights(log_decay, jnp.arange(all_d_prefix.shape[0]), rank, chunk, causal)   # [W, Hkv, G]
    d_states = jnp.einsum("thg,tbhgfe->bhgfe", weights, all_d_prefix)
    return d_states, d_log_decay


_prefix_states.defvjp(_prefix_states_fwd, _prefix_states_bwd)

__all__ = ["lasp2", "lasp2_sharded"]
