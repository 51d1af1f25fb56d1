"""Selective self-attention (SSA) as a Flax NNX module: MultiHeadAttention with learned temperatures.

Zhang et al., "Selective Attention: Enhancing Transformer through Principled Context Control",
NeurIPS 2024. Each head scales its queries by ``τ_q = 1 + tanh(w_q·q_i + b_q) + σ(α)·log(n_i)``
and its values by ``τ_v = 1 + tanh(w_v·v_j + b_v)`` before softmax attention; see
``attnjax.softmax.selective`` for the math. The token terms read the head's own projected query
and value (the paper's weight sharing), so the layer adds ``(D + 1)·(Hq + Hkv) + Hq`` parameters,
about ``1/(2·d_model)`` of the projections' (0.1% at ``d_model = 512``; the paper: under 0.5%).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.softmax.selective import DEFAULT_POSITION_SCALE, default_positions, selective_temperature, temper


class SelectiveAttention(MultiHeadAttention):
    """Multi-head attention with SSA's learned query, position and value temperatures.

    The projections, GQA, RoPE, dropout and the choice of mechanism are ``MultiHeadAttention``'s.
    The temperatures scale ``q`` and ``v`` before RoPE and the mechanism (``scale_qv``, also used
    by ``decode``), so the query temperature's token term does not depend on position. All
    temperature weights start at 0 (``τ_q = 1 + σ(α)·log n``, ``τ_v = 1``), so without the
    position term a fresh layer equals ``MultiHeadAttention``.

    Args:
      d_model, num_heads: as in ``MultiHeadAttention``.
      query_temperature: learn the query token term ``w_q [Hq, D]``, ``b_q [Hq]``.
      position_temperature: learn the position term ``σ(α_h)·log n`` with ``α [Hq]``.
      value_temperature: learn the value token term ``w_v [Hkv, D]``, ``b_v [Hkv]``.
      position_scale_init: initial ``σ(α)`` in ``(0, 1)``; the default is the released code's
        initial coefficient (``attnjax.softmax.selective.DEFAULT_POSITION_SCALE``).
      **kwargs: passed to ``MultiHeadAttention`` (``num_kv_heads``, ``head_dim``, ``rope``,
        ``mechanism``, ``implementation``, ``dropout_rate``, ``dtype``, ``param_dtype``, ``rngs``, ...).
    """

    def __init__(self, d_model: int, num_heads: int, *, query_temperature: bool = True,
                 position_temperature: bool = True, value_temperature: bool = True,
                 position_scale_init: float = DEFAULT_POSITION_SCALE, **kwargs):
        super().__init__(d_model, num_heads, **kwargs)
        if self.sequence_parallel is not None:
            raise NotImplementedError("SelectiveAttention has no sequence-parallel path")
        if not 0.0 < position_scale_init < 1.0:
            raise ValueError(f"position_scale_init must be in (0, 1) (it is a sigmoid), got {position_scale_init}")
        Hq, Hkv, D, dtype = self.num_heads, self.num_kv_heads, self.head_dim, self.param_dtype

        def zeros(*shape):
            return nnx.Param(jnp.zeros(shape, dtype))

        self.query_temperature = zeros(Hq, D) if query_temperature else None
        self.query_temperature_bias = zeros(Hq) if query_temperature else None
        logit = math.log(position_scale_init / (1.0 - position_scale_init))
        self.position_logit = nnx.Param(jnp.full((Hq,), logit, dtype)) if position_temperature else None
        self.value_temperature = zeros(Hkv, D) if value_temperature else None
        self.value_temperature_bias = zeros(Hkv) if value_temperature else None

    def scale_qv(self, q: jax.Array, v: jax.Array, positions: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """``q·τ_q`` and ``v·τ_v``. ``positions`` (query positions, ``n = position + 1``) feed the
        position term; in cross-attention (``None``) query ``i`` counts ``S − T + i + 1`` tokens
        (bottom-right alignment). τ is one scalar per token and head, so scaling before RoPE equals
        scaling after it, and the token term reads ``q`` before RoPE (position-free)."""
        if positions is None:
            positions = default_positions(q.shape[1], v.shape[1])
        tau_q = selective_temperature(
            q, weight=_value(self.query_temperature), bias=_value(self.query_temperature_bias),
            position_scale=None if self.position_logit is None else jax.nn.sigmoid(self.position_logit[...]),
            positions=positions)
        tau_v = selective_temperature(v, weight=_value(self.value_temperature),
                                      bias=_value(self.value_temperature_bias))
        return temper(q, tau_q), temper(v, tau_v)


def _value(param: Optional[nnx.Param]) -> Optional[jax.Array]:
    return None if param is None else param[...]


register_module(ModuleSpec(
    "selective", SelectiveAttention, dict(d_model=16, num_heads=2), (2, 9, 16), kind="layer",
    paper="Zhang et al. 2024 (Selective Attention, NeurIPS)", causal=True, decodes=True))
