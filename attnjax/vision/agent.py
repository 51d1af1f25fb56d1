"""Agent attention: a few agent tokens aggregate from the keys, then broadcast to the queries.

Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024 (arXiv 2312.08874),
sec. 3.2-3.3; official code LeapLabTHU/Agent-Attention (``AgentAttention`` in
``agent_transformer/models/agent_pvt.py`` and ``agent_swin.py``). With ``n ≪ N`` agent tokens ``A``::

    V_A = softmax(s·A Kᵀ + B1) V            agent aggregation: the agents are the queries of n rows
    O   = softmax(s·Q Aᵀ + B2) V_A          agent broadcast: the agents are the keys of the N queries

so ``O = softmax(s·Q Aᵀ + B2)·softmax(s·A Kᵀ + B1)·V``: softmax attention whose ``[N, N]`` map has rank
``≤ n``, i.e. linear attention with the feature maps ``φ_q(Q) = softmax(s·Q Aᵀ + B2)`` and
``φ_k(K)ᵀ = softmax(s·A Kᵀ + B1)`` (the paper's "generalized linear attention", sec. 3.2). The agent attention
module (sec. 3.3) adds a depth-wise convolution on ``V`` to the output (diversity restoration) and learns the
agent biases ``B1 [heads, n, N]``, ``B2 [heads, N, n]``; the official code decomposes each into a bilinearly
interpolated ``7 × 7`` table per agent plus a row term and a column term (``agent_position_bias``). The agents
are the queries adaptively average-pooled to ``p × p`` tokens (``agent_tokens``).

* ``agent_tokens``: ``A`` from a query map, ``torch.nn.AdaptiveAvgPool2d`` to ``p × p`` (the official pooling).
* ``bilinear_resize_matrix`` / ``agent_position_bias``: the decomposed agent biases (PyTorch's bilinear
  ``F.interpolate``, ``align_corners=False``).
* ``agent_attention_reference``: the ``[T, S]`` map ``softmax(QAᵀ)·softmax(AKᵀ)`` formed and applied to ``V``.
* ``agent_attention``: ``V_A`` first, then the broadcast: two ``attnjax.attention`` calls, ``O((T + S)·n·d)``
  time, never an ``[T, S]`` array.

The paper's text was not available here (only its abstract and the official code); the formulas, the bias
decomposition and the defaults are read from the official code.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.api import attention
from attnjax.checks import check_qkv, describe
from attnjax.tiling import check_broadcastable
from attnjax.vision.aggregated_attention import adaptive_avg_pool
from attnjax.vision.window import Window, window_shape

BIAS_TABLE_SIZE = 7
"""The side of the per-agent bias tables ``an_bias`` / ``na_bias`` of the official code (``7 × 7``, interpolated
to the feature map)."""


def agent_tokens(q: jax.Array, pool: Window) -> jax.Array:
    """The agent tokens: the query map adaptively average-pooled (Agent Attention, sec. 3.3; official code
    ``nn.AdaptiveAvgPool2d``).

    ``A[b, i·pw + j, h] = mean of q[b, y, x, h]`` over the pooling bin ``(i, j)``: rows
    ``[⌊i·H/ph⌋, ⌈(i+1)·H/ph⌉)`` and columns ``[⌊j·W/pw⌋, ⌈(j+1)·W/pw⌉)`` (bins overlap when ``p`` exceeds the map).

    Args:
      q: ``[B, H, W, heads, D]``.
      pool: ``p`` or ``(ph, pw)``: ``n = ph·pw`` agents (the official code uses ``p = √agent_num``).

    Returns:
      ``[B, n, heads, D]`` in q's dtype, agents row-major over the ``ph × pw`` grid.
    """
    if getattr(q, "ndim", None) != 5:
        raise ValueError(f"q must have shape [batch, height, width, heads, head_dim], got {describe(q)}")
    ph, pw = window_shape(pool, "pool")
    B, H, W, heads, D = q.shape
    pooled = adaptive_avg_pool(q.reshape(B, H, W, heads * D), (ph, pw))
    return pooled.reshape(B, ph * pw, heads, D)


def bilinear_resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` weights of 1-D linear interpolation as PyTorch's ``F.interpolate(mode="bilinear",
    align_corners=False)`` (no antialiasing), along one axis.

    Output ``i`` samples the input at ``src = max((i + 1/2)·size_in/size_out − 1/2, 0)``: weight ``1 − λ`` on
    ``⌊src⌋`` and ``λ = src − ⌊src⌋`` on ``min(⌊src⌋ + 1, size_in − 1)``.
    """
    if size_in < 1 or size_out < 1:
        raise ValueError(f"sizes must be positive, got size_in={size_in}, size_out={size_out}")
    weights = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        src = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
        lo = min(int(np.floor(src)), size_in - 1)
        frac = src - lo
        weights[i, lo] += 1.0 - frac
        weights[i, min(lo + 1, size_in - 1)] += frac
    return weights


def agent_position_bias(table: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """A decomposed agent bias (official code): a bilinearly resized per-agent table plus a row and a column term.

    ``bias[h, a, y·W + x] = Resize_{H×W}(table)[h, a, y, x] + rows[h, a, y] + cols[h, a, x]``, the resize being
    PyTorch's bilinear ``F.interpolate`` (``bilinear_resize_matrix`` on each axis).

    The agent aggregation's ``B1 [heads, n, S]`` is ``agent_position_bias(an_bias, ah_bias, aw_bias)``
    over the key map; the broadcast's ``B2 [heads, T, n]`` is ``agent_position_bias(na_bias, ha_bias,
    wa_bias)`` over the query map, with ``ha``/``wa`` given agent-major (``[heads, n, H]``, ``[heads, n, W]``)
    and the result transposed.

    Args:
      table: ``[heads, n, th, tw]`` (``7 × 7`` in the official code).
      rows: ``[heads, n, H]``; cols: ``[heads, n, W]``: ``H × W`` is the map the bias covers.

    Returns:
      ``[heads, n, H·W]`` in float32.
    """
    if getattr(table, "ndim", None) != 4:
        raise ValueError(f"table must have shape [heads, agents, th, tw], got {describe(table)}")
    heads, n = table.shape[:2]
    for name, a in (("rows", rows), ("cols", cols)):
        if getattr(a, "ndim", None) != 3 or a.shape[:2] != (heads, n):
            raise ValueError(f"{name} must have shape [{heads}, {n}, size] for table {list(table.shape)}, "
                             f"got {describe(a)}")
    H, W = rows.shape[2], cols.shape[2]
    resize_h = jnp.asarray(bilinear_resize_matrix(table.shape[2], H))
    resize_w = jnp.asarray(bilinear_resize_matrix(table.shape[3], W))
    resized = jnp.einsum("yi,hnij,xj->hnyx", resize_h, table.astype(jnp.float32), resize_w,
                         precision=jax.lax.Precision.HIGHEST)
    bias = resized + rows.astype(jnp.float32)[..., :, None] + cols.astype(jnp.float32)[..., None, :]
    return bias.reshape(heads, n, H * W)


def check_agent_inputs(q: jax.Array, k: jax.Array, v: jax.Array, agents: jax.Array, agent_bias, query_bias) -> None:
    """``ValueError``/``TypeError`` unless q ``[B, T, Hq, D]``, k ``[B, S, Hkv, D]``, v ``[B, S, Hkv, Dv]``,
    agents ``[B, n, Hq, D]`` (``n ≥ 1``, q's dtype), ``agent_bias`` broadcastable to ``[B, Hq, n, S]`` and
    ``query_bias`` to ``[B, Hq, T, n]``."""
    check_qkv(q, k, v)
    B, T, Hq, D = q.shape
    if getattr(agents, "ndim", None) != 4 or agents.shape[0] != B or agents.shape[2:] != (Hq, D) or not agents.shape[1]:
        raise ValueError(f"agents must have shape [B, n, Hq, D] = [{B}, n ≥ 1, {Hq}, {D}] for q {list(q.shape)}, "
                         f"got {describe(agents)}")
    if agents.dtype != q.dtype:
        raise TypeError(f"agents must have q's dtype {q.dtype}, got {agents.dtype}")
    n, S = agents.shape[1], k.shape[1]
    for name, bias, expected in (("agent_bias", agent_bias, (B, Hq, n, S)), ("query_bias", query_bias, (B, Hq, T, n))):
        if bias is None:
            continue
        if not isinstance(bias, jax.Array) and not isinstance(bias, np.ndarray):
            raise TypeError(f"{name} must be an array, got {describe(bias)}")
        check_broadcastable(name, bias, expected)


def agent_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, agents: jax.Array, *,
                              agent_bias: Optional[jax.Array] = None, query_bias: Optional[jax.Array] = None,
                              scale: Optional[float] = None) -> jax.Array:
    """Agent attention written as the product of its two attention maps (Agent Attention, sec. 3.2-3.3)::

        O = softmax(s·Q Aᵀ + B2) · softmax(s·A Kᵀ + B1) · V

    The ``[B, Hq, T, S]`` map ``softmax(s·Q Aᵀ + B2)·softmax(s·A Kᵀ + B1)`` is formed, then applied to ``V``, in
    float32. Memory ``O(B·Hq·T·S)``. K/V heads are repeated for GQA.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (``Hq % Hkv == 0``).
      agents: ``[B, n, Hq, D]``, the agent tokens ``A`` (``agent_tokens`` pools them from the queries).
      agent_bias: ``B1``, broadcastable to ``[B, Hq, n, S]``, or None.
      query_bias: ``B2``, broadcastable to ``[B, Hq, T, n]``, or None.
      scale: ``s``, default ``1/√D`` (both softmaxes, as the official code).

    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    check_agent_inputs(q, k, v, agents, agent_bias, query_bias)
    Hq, D = q.shape[2:]
    s = D ** -0.5 if scale is None else scale
    group = Hq // k.shape[2]
    hi = jax.lax.Precision.HIGHEST
    qf, af = q.astype(jnp.float32), agents.astype(jnp.float32)
    kf, vf = (jnp.repeat(a.astype(jnp.float32), group, axis=2) for a in (k, v))
    aggregate = s * jnp.einsum("bnhd,bshd->bhns", af, kf, precision=hi)
    broadcast = s * jnp.einsum("bthd,bnhd->bhtn", qf, af, precision=hi)
    if agent_bias is not None:
        aggregate = aggregate + jnp.asarray(agent_bias, jnp.float32)
    if query_bias is not None:
        broadcast = broadcast + jnp.asarray(query_bias, jnp.float32)
    weights = jnp.einsum("bhtn,bhns->bhts", jax.nn.softmax(broadcast, axis=-1), jax.nn.softmax(aggregate, axis=-1),
                         precision=hi)
    return jnp.einsum("bhts,bshd->bthd", weights, vf, precision=hi).astype(q.dtype)


def agent_attention(q: jax.Array, k: jax.Array, v: jax.Array, agents: jax.Array, *,
                    agent_bias: Optional[jax.Array] = None, query_bias: Optional[jax.Array] = None,
                    scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """Agent attention, aggregation first (Agent Attention, sec. 3.2-3.3; official ``AgentAttention.forward``)::

        V_A = softmax(s·A Kᵀ + B1) V        # attnjax.attention: n agent queries over the S keys
        O   = softmax(s·Q Aᵀ + B2) V_A      # attnjax.attention: T queries over the n agent keys

    The same output as ``agent_attention_reference`` without the ``[T, S]`` map: ``O((T + S)·n·(D + Dv))``
    multiply-adds per head, and memory for the ``[n, Dv]`` agent values plus what the two attention calls hold
    (on the blocked ``"xla"`` path one tile of logits at a time; the biases, when given, are ``[n, S]`` and
    ``[T, n]`` arrays, linear in the sequence). GQA: the agents (``Hq`` heads) read K/V head ``h // (Hq/Hkv)``.

    Args:
      q, k, v, agents, agent_bias, query_bias, scale: as ``agent_attention_reference``.
      implementation: as ``attnjax.attention``, for both calls.

    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    check_agent_inputs(q, k, v, agents, agent_bias, query_bias)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    agent_values = attention(agents, k, v, bias=agent_bias, scale=s, implementation=implementation)
    return attention(q, agents, agent_values, bias=query_bias, scale=s, implementation=implementation)


__all__ = ["BIAS_TABLE_SIZE", "agent_tokens", "bilinear_resize_matrix", "agent_position_bias", "check_agent_inputs",
           "agent_attention_reference", "agent_attention"]
