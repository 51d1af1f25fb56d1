"""Aaren: softmax attention as a many-to-many RNN (Feng et al., "Attention as an RNN", 2024).

One query ``q`` per head, the same at every step (in Aaren a learned token, not a function of
the input), attends over every prefix of the sequence:

    o_t = Σ_{j≤t} softmax_j(s_j) v_j,    s_j = scale·q·k_j    (t = 0 … S−1).

Because ``q`` does not change with ``t``, the prefix statistics ``(m, u, w)`` = (max logit,
``Σ e^{s_j−m} v_j``, ``Σ e^{s_j−m}``) combine with an associative operator,

    (m_a, u_a, w_a) ⊕ (m_b, u_b, w_b) = (m, u_a e^{m_a−m} + u_b e^{m_b−m}, w_a e^{m_a−m} + w_b e^{m_b−m}),
    m = max(m_a, m_b),

so every ``o_t = u_t / w_t`` comes out of one parallel prefix scan (``aaren_scan``, O(log S)
depth) and a new token updates the state in O(1) memory (``aaren_step``). With per-token
queries ``q_t`` this is no longer possible: that is ordinary causal attention
(``mechanism="softmax"``, ``mask=masks.Causal()``).

These are pure functions on arrays, not an ``attnjax.attention`` mechanism: the query is one
learned token per head, which the layer ``attnjax.nn.aaren.Aaren`` owns.

The max ``m`` is only a reference point: ``o`` and ``log w + m`` do not depend on it, so it is
held constant for gradients (like the row max of ``softmax_attention_reference``). States,
logits and sums are float32; outputs take q's dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.blocked.scores import soft_cap
from attnjax.softmax.softmax import softmax_attention_reference


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class AarenState:
    """Prefix statistics of Aaren for one query per head (any leading batch/time dims).

    Attributes:
      m: float32 ``[..., H]``, the largest logit so far (``-inf`` before the first token).
      u: float32 ``[..., H, Dv]``, ``Σ_j e^{s_j − m} v_j``.
      w: float32 ``[..., H]``, ``Σ_j e^{s_j − m}`` (0 before the first token).
    """

    m: jax.Array
    u: jax.Array
    w: jax.Array


def aaren_combine(a: AarenState, b: AarenState) -> AarenState:
    """Feng et al.'s associative operator ⊕ (many-to-many attention): ``a`` the earlier tokens, ``b`` the later.

    ``m = max(m_a, m_b)``; ``u = u_a e^{m_a−m} + u_b e^{m_b−m}``; ``w = w_a e^{m_a−m} + w_b e^{m_b−m}``.
    Broadcasts over leading dims; an empty state (``m = -inf``, ``u = w = 0``) is the identity.
    """
    m = jax.lax.stop_gradient(jnp.maximum(a.m, b.m))
    m_ref = jnp.where(jnp.isfinite(m), m, 0.0)
    ca, cb = jnp.exp(a.m - m_ref), jnp.exp(b.m - m_ref)
    return AarenState(m, a.u * ca[..., None] + b.u * cb[..., None], a.w * ca + b.w * cb)


def aaren_init_state(batch: int, num_heads: int, value_dim: int, sinks: Optional[jax.Array] = None) -> AarenState:
    """The state before any token: ``m = -inf``, ``u = 0`` ``[batch, H, Dv]``, ``w = 0``.

    With ``sinks`` ``[H]`` (per-head sink logits, a key with a zero value) the state starts at
    ``(m, u, w) = (sink, 0, 1)``, so every output's normalizer includes ``e^{sink}``.
    """
    u = jnp.zeros((batch, num_heads, value_dim), jnp.float32)
    if sinks is None:
        empty = jnp.zeros((batch, num_heads), jnp.float32)
        return AarenState(empty - jnp.inf, u, empty)
    return _sink_state(jnp.broadcast_to(jnp.asarray(sinks, jnp.float32), (batch, num_heads)), u)


def aaren_scan(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None,
               logits_soft_cap: Optional[float] = None, sinks: Optional[jax.Array] = None,
               return_lse: bool = False):
    """Aaren's many-to-many output by a parallel prefix scan (``jax.lax.associative_scan``).

    Args:
      q: the query, ``[H, D]`` or ``[B or 1, 1, H, D]``, one per head (a learned token in Aaren).
      k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``H % Hkv == 0`` (head ``h`` reads KV head
        ``h // (H // Hkv)``).
      scale: logit scale, default ``1/sqrt(D)``. logits_soft_cap: ``cap`` in ``cap·tanh(s/cap)``.
      sinks: ``[H]`` sink logits that join every prefix's normalizer with a zero value.
      return_lse: also return the float32 log-sum-exp of each prefix ``[B, S, H]``.
    Returns:
      ``o [B, S, H, Dv]`` in q's dtype, ``o[:, t] = attention(q, k[:, :t+1], v[:, :t+1])``, and the
      lse if asked. Work O(S·H·(D + Dv)), depth O(log S), memory O(S·H·Dv).
    """
    q = _query(q, k)
    leaves = _leaves(_logits(q, k, scale, logits_soft_cap), v, q.shape[1])
    prefix = jax.lax.associative_scan(aaren_combine, leaves, axis=1)
    if sinks is not None:
        sink = _sink_state(jnp.asarray(sinks, jnp.float32), jnp.zeros((q.shape[1], 1), jnp.float32))
        prefix = aaren_combine(sink, prefix)
    return _readout(prefix, q.dtype, return_lse)


def aaren_step(state: AarenState, k_t: jax.Array, v_t: jax.Array, q: jax.Array, *, scale: Optional[float] = None,
               logits_soft_cap: Optional[float] = None) -> tuple[AarenState, jax.Array]:
    """One streaming step in O(1) memory: fold token ``(k_t, v_t)`` into the state and read ``o_t``.

    Args:
      state: an ``AarenState`` with ``m, w [B, H]``, ``u [B, H, Dv]`` (``aaren_init_state``).
      k_t: ``[B, Hkv, D]``; v_t: ``[B, Hkv, Dv]``; q: ``[H, D]`` or ``[B or 1, 1, H, D]``.
      scale, logits_soft_cap: as in ``aaren_scan``.
    Returns:
      ``(state ⊕ (s_t, v_t, 1), o_t [B, H, Dv])`` with ``o_t`` in q's dtype; equal to step ``t``
      of ``aaren_scan`` (sinks live in the initial state).
    """
    q = _query(q, k_t[:, None])
    leaf = _leaves(_logits(q, k_t[:, None], scale, logits_soft_cap), v_t[:, None], q.shape[1])
    state = aaren_combine(state, jax.tree.map(lambda x: x[:, 0], leaf))
    return state, _readout(state, q.dtype, False)


def aaren_recurrent(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None,
                    logits_soft_cap: Optional[float] = None, sinks: Optional[jax.Array] = None,
                    return_lse: bool = False):
    """Aaren one token at a time: ``aaren_step`` under ``jax.lax.scan``. Same contract as ``aaren_scan``."""
    B, H, Dv = k.shape[0], _query(q, k).shape[1], v.shape[-1]

    def step(state, kv):
        state, o_t = aaren_step(state, kv[0], kv[1], q, scale=scale, logits_soft_cap=logits_soft_cap)
        return state, (o_t, _lse(state))

    _, (out, lse) = jax.lax.scan(step, aaren_init_state(B, H, Dv, sinks), (k.swapaxes(0, 1), v.swapaxes(0, 1)))
    out = out.swapaxes(0, 1)
    return (out, lse.swapaxes(0, 1)) if return_lse else out


def aaren_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None,
                    logits_soft_cap: Optional[float] = None, sinks: Optional[jax.Array] = None,
                    return_lse: bool = False):
    """Dense prefix softmax: the query repeated at every position, causal softmax attention.

    ``o_t = Σ_{j≤t} softmax_j(scale·q·k_j) v_j`` from the full ``[B, H, S, S]`` masked logit matrix
    (``softmax_attention_reference`` with ``masks.Causal()``). Same contract as ``aaren_scan``.
    """
    q = _query(q, k)
    B, S = k.shape[:2]
    q_all = jnp.broadcast_to(q[:, None], (B, S) + q.shape[1:])
    return softmax_attention_reference(q_all, k, v, mask=masks.Causal(), scale=scale, logits_soft_cap=logits_soft_cap,
                                       sinks=sinks, return_lse=return_lse)


def _query(q: jax.Array, k: jax.Array) -> jax.Array:
    """``[H, D]`` or ``[B|1, 1, H, D]`` -> ``[B, H, D]``, with shape checks against ``k [B, S, Hkv, D]``."""
    if q.ndim == 2:
        q = q[None, None]
    B, _, Hkv, D = k.shape
    if q.ndim != 4 or q.shape[1] != 1 or q.shape[0] not in (1, B) or q.shape[3] != D:
        raise ValueError(f"q must be [H, D] or [B or 1, 1, H, D] = [{B}, 1, H, {D}] (one query per head), "
                         f"got shape {tuple(q.shape)}")
    if q.shape[2] % Hkv:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({Hkv}): q {q.shape}, k {k.shape}")
    return jnp.broadcast_to(q[:, 0], (B,) + q.shape[2:])


def _logits(q: jax.Array, k: jax.Array, scale: Optional[float], cap: Optional[float]) -> jax.Array:
    """``cap·tanh(scale·q·k_t / cap)`` in float32, ``[B, S, H]``; q ``[B, H, D]``, k ``[B, S, Hkv, D]``."""
    B, H, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    s = jnp.einsum("bhgd,bshd->bshg", q.reshape(B, Hkv, H // Hkv, D), k, preferred_element_type=jnp.float32)
    return soft_cap(s.reshape(B, k.shape[1], H) * scale, cap)


def _leaves(s: jax.Array, v: jax.Array, num_heads: int) -> AarenState:
    """One state per token, ``(s, v, 1)`` with ``m`` held constant for gradients (see module docstring)."""
    m = jax.lax.stop_gradient(s)
    e = jnp.exp(s - m)
    B, S, Hkv, Dv = v.shape
    v = jnp.broadcast_to(v.astype(jnp.float32)[:, :, :, None], (B, S, Hkv, num_heads // Hkv, Dv))
    return AarenState(m, v.reshape(B, S, num_heads, Dv) * e[..., None], e)


def _sink_state(sinks: jax.Array, u: jax.Array) -> AarenState:
    """``(sink, 0, 1)``: a key with logit ``sink`` and a zero value; ``w`` carries the sink's gradient."""
    m = jax.lax.stop_gradient(sinks)
    return AarenState(m, u, jnp.exp(sinks - m))


def _lse(state: AarenState) -> jax.Array:
    w = state.w
    return jnp.where(w > 0, state.m + jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)


def _readout(state: AarenState, dtype, return_lse: bool):
    """``o = u / w`` (0 where nothing was seen) in ``dtype``; with ``return_lse``, also ``m + log w``."""
    w = state.w[..., None]
    out = (state.u / jnp.where(w > 0, w, 1.0)).astype(dtype)
    return (out, _lse(state)) if return_lse else out

