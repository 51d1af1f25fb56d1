"""Selective attention (SSA): softmax attention with query-, position- and value-dependent temperatures.

Zhang, Chang, Li, Roy-Chowdhury, Chen, Oymak, "Selective Attention: Enhancing Transformer through
Principled Context Control", NeurIPS 2024 (arXiv:2411.12892; code: github.com/umich-sota/selective_attention).

SSA scales each query and each value by a per-head inverse temperature:

    q̃_i = τ_q(q_i, i)·q_i,    ṽ_j = τ_v(v_j)·v_j,    out_i = Σ_j softmax_j(scale·q̃_i·k_j) ṽ_j,
    τ_q(q_i, i) = 1 + tanh(w_q·q_i + b_q) + c·log(n_i),    τ_v(v_j) = 1 + tanh(w_v·v_j + b_v),

that is the paper's token term ``tanh(f(x))`` plus position term ``1 + σ(α)·log n``, with
``c = σ(α) ≥ 0``. ``n_i`` is the context size of query ``i``: its position plus one, so ``n_i = i + 1``
in causal self-attention. The position term sharpens each row by ``log n``, against the attention
dilution of long contexts. The query term lets a query choose how spiky its row is. The value term
lets the layer damp noisy tokens.

Weight sharing: the token term reads the head's own query (value) embedding, so ``f`` reuses
``W_q`` (``W_v``) and adds one vector and one bias per head. That is ``(D + 1)·(Hq + Hkv) + Hq``
parameters per layer, under 0.5% of the projections' ``4·d²``. The released code has only the
position term: it multiplies the logits by ``1 + e^{−e^β}·log n``, which is ``c = e^{−e^β}`` here
(``DEFAULT_POSITION_SCALE`` is its initial value).

The temperatures are elementwise on q and v. So every path computes them, scales q and v, and
calls the softmax implementations unchanged: the reference, the blocked XLA path
(``flash_attention_xla``) and the Pallas flash kernel. Gradients reach the temperature parameters
through that product.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.api import attention
from attnjax.checks import check_qkv
from attnjax.masks import query_positions
from attnjax.softmax.softmax import Softmax

DEFAULT_POSITION_SCALE = math.exp(-math.exp(1.5))
"""``c = e^{−e^β}`` with the released GPT-2 pretraining code's initial ``β = 1.5`` (≈ 0.0113)."""


def default_positions(T: int, S: int) -> jax.Array:
    """Positions of the ``T`` queries among ``S`` keys (bottom-right alignment): ``S − T + arange(T)``."""
    return query_positions(jnp.arange(T), T, S)


def selective_temperature(
    x: jax.Array, *, weight: Optional[jax.Array] = None, bias: Optional[jax.Array] = None,
    position_scale=None, positions: Optional[jax.Array] = None,
) -> jax.Array:
    """SSA inverse temperature per token and head, ``1 + tanh(w·x + b) + c·log(n)``, float32 ``[B, L, H]``.

    Args:
      x: ``[B, L, H, E]`` the embeddings the token term reads (queries or values).
      weight: ``[H, E]`` token-term weights ``w``; ``None`` leaves out the token term.
      bias: ``[H]`` token-term bias ``b`` (only with ``weight``).
      position_scale: ``c ≥ 0``, a scalar or ``[H]``; ``None`` leaves out the position term.
      positions: int ``[L]`` or ``[B, L]``, the token positions (``n = position + 1``, at least 1);
        required with ``position_scale``.
    """
    if bias is not None and weight is None:
        raise ValueError("a token-temperature bias needs its weight")
    tau = jnp.ones(x.shape[:3], jnp.float32)
    if weight is not None:
        logit = jnp.einsum("blhe,he->blh", x.astype(jnp.float32), jnp.asarray(weight, jnp.float32))
        if bias is not None:
            logit = logit + jnp.asarray(bias, jnp.float32)
        tau = tau + jnp.tanh(logit)
    if position_scale is not None:
        if positions is None:
            raise ValueError("the position temperature needs positions")
        log_n = jnp.log(jnp.maximum(jnp.asarray(positions) + 1, 1).astype(jnp.float32))
        log_n = log_n.reshape((-1 if log_n.ndim == 2 else 1, x.shape[1], 1))
        tau = tau + jnp.asarray(position_scale, jnp.float32) * log_n
    return tau


def temper(x: jax.Array, tau: jax.Array) -> jax.Array:
    """``τ·x`` per token and head: ``x [B, L, H, E]``, ``tau [B, L, H]``; keeps x's dtype."""
    return (x.astype(jnp.float32) * tau[..., None]).astype(x.dtype)


def selective_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, query_weight: Optional[jax.Array] = None,
    query_bias: Optional[jax.Array] = None, position_scale=None, value_weight: Optional[jax.Array] = None,
    value_bias: Optional[jax.Array] = None, positions: Optional[jax.Array] = None, mask=None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, sinks: Optional[jax.Array] = None,
    dropout_rate: float = 0.0, rng: Optional[jax.Array] = None, return_lse: bool = False,
    implementation: str = "auto", block_q: int = 512, block_kv: int = 512,
):
    """Selective self-attention (Zhang et al. 2024): softmax attention of ``τ_q·q`` over k and ``τ_v·v``.

    ``out_i = Σ_j softmax_j(scale·τ_q(q_i, i)·q_i·k_j + b_ij) τ_v(v_j) v_j`` with
    ``τ_q = 1 + tanh(w_q·q_i + b_q) + c·log(n_i)`` and ``τ_v = 1 + tanh(w_v·v_j + b_v)``
    (``selective_temperature``); a term whose parameters are ``None`` is left out.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` with ``Hq % Hkv == 0``.
      query_weight, query_bias: ``[Hq, D]`` and ``[Hq]``, the query token term.
      position_scale: ``c ≥ 0``, scalar or ``[Hq]`` (``σ(α)`` in the paper), the position term.
      value_weight, value_bias: ``[Hkv, Dv]`` and ``[Hkv]``, the value token term.
      positions: int ``[T]`` or ``[B, T]`` query positions (``n = position + 1``); default
        ``S − T + arange(T)``. Pass per-sequence positions for packed (``Segments``) batches.
      mask, bias, scale, logits_soft_cap, sinks, dropout_rate, rng, return_lse: as in
        ``attnjax.attention`` (the bias is added after the temperature scaling).
      implementation: "reference", "xla", "pallas" or "auto", the softmax path that runs on the
        scaled q and v; block_q, block_kv: the xla path's tiles.
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype, or ``(out, lse)``.
    """
    check_qkv(q, k, v)
    B, T, Hq, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    _check_shape("query_weight", query_weight, [(Hq, D)])
    _check_shape("query_bias", query_bias, [(Hq,)])
    _check_shape("position_scale", position_scale, [(), (Hq,)])
    _check_shape("value_weight", value_weight, [(Hkv, Dv)])
    _check_shape("value_bias", value_bias, [(Hkv,)])
    positions = default_positions(T, S) if positions is None else positions
    _check_shape("positions", positions, [(T,), (B, T)])
    tau_q = selective_temperature(q, weight=query_weight, bias=query_bias, position_scale=position_scale,
                                  positions=positions)
    q = temper(q, tau_q)
    if value_weight is not None:
        v = temper(v, selective_temperature(v, weight=value_weight, bias=value_bias))
    elif value_bias is not None:
        raise ValueError("value_bias needs value_weight")
    return attention(q, k, v, mechanism=Softmax(block_q=block_q, block_kv=block_kv), mask=mask, bias=bias,
                     scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks, dropout_rate=dropout_rate,
                     rng=rng, implementation=implementation, return_lse=return_lse)


def _check_shape(name: str, x, allowed: list) -> None:
    if x is not None and tuple(jnp.shape(x)) not in allowed:
        raise ValueError(f"{name} has shape {tuple(jnp.shape(x))}, expected one of {allowed}")


@registry.register
@dataclasses.dataclass(frozen=True)
class Selective:
    """Selective attention with its fixed (not learned) part: the position temperature.

    Queries are scaled by ``1 + position_scale·log(n_i)``, with ``n_i`` the query position plus
    one (bottom-right alignment). ``position_scale = 0`` is plain softmax attention. The learned
    query and value temperatures live in ``attnjax.nn.selective.SelectiveAttention``.
    ``block_q``/``block_kv`` set the xla path's tiles.
    """

    position_scale: float = DEFAULT_POSITION_SCALE
    block_q: int = 512
    block_kv: int = 512

    name: ClassVar[str] = "selective"
    family: ClassVar[str] = "softmax"
    paper: ClassVar[str] = "Zhang et al. 2024, Selective Attention (NeurIPS)"
    supports: ClassVar[frozenset] = frozenset(registry.OPTIONS)
    decodes: ClassVar[bool] = True
    sequence_parallel: ClassVar[tuple] = ()

    def __post_init__(self):
        if not (math.isfinite(self.position_scale) and self.position_scale >= 0):
            raise ValueError(f"position_scale must be a finite number >= 0, got {self.position_scale}")

    def implementations(self):
        paths = Softmax(block_q=self.block_q, block_kv=self.block_kv).implementations()
        return {name: functools.partial(_position_tempered, fn, self.position_scale) for name, fn in paths.items()}


def _position_tempered(fn, position_scale: float, q, k, v, **kwargs):
    """Run the softmax path ``fn`` on ``(1 + c·log n)·q``."""
    T, S = q.shape[1], k.shape[1]
    tau = selective_temperature(q, position_scale=position_scale, positions=default_positions(T, S))
    return fn(temper(q, tau), k, v, **kwargs)
