"""TransNormerLLM layers as Flax NNX modules over ``attnjax.linear.linear_attention``.

Qin et al., "TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer"
(2023). A block is two pre-norm residual sublayers, ``h = x + GLA(SRMSNorm(x))`` then
``y = h + SGLU(SRMSNorm(h))``, where the token mixer GLA is the paper's gated linear attention

    O = SRMSNorm(LightningAttention(LRPE(φ(X W_q)), LRPE(φ(X W_k)), X W_v; λ)) ⊙ (X W_u) · W_o,

with φ = swish, causal scores ``q_s·k_t λ^(s−t)`` (Lightning Attention, no softmax, no 1/√d: the
output norm bounds the values) and LRPE-d, the rotation ``exp(iθ(s−t))`` of the scores.
Decoding runs the same math as a recurrence on a constant-size state ``S_t = λ S_{t−1} + k_tᵀv_t``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.dispatch import check_implementation
from attnjax.linear import linear_attention
from attnjax.nn.attention import LinearCache
from attnjax.nn.checks import (check_causal_mask, check_chunk, check_input, check_positive, check_step,
                               resolve_head_dim)
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional import alibi_slopes


def srms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """SRMSNorm, RMSNorm without a learnable scale: ``x / sqrt(mean(x²) + eps)`` over the last axis.

    TransNormerLLM Sec. 3.1.4: ``SRMSNorm(x) = x / (‖x‖₂/√d)``; ``eps`` keeps it finite at ``x = 0``.
    Computed in float32; the result takes ``x``'s dtype.
    """
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def transnormer_decay(num_heads: int, layer_idx: int = 0, num_layers: int = 1) -> np.ndarray:
    """Per-head decay ``λ_h = exp(−m_h (1 − l/(L−1) + 1e-5))`` (float32 ``[num_heads]``).

    ``m_h`` are the ALiBi slopes (``positional.alibi_slopes``) and ``l`` counts layers from 0 of
    ``L``: lower layers decay faster and the top layer barely decays, as in the TransNormerLLM
    release (OpenNLPLab ``slope_rate``).
    """
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")
    depth = 1.0 - layer_idx / (num_layers - 1) if num_layers > 1 else 1.0
    return np.exp(-alibi_slopes(num_heads) * (depth + 1e-5)).astype(np.float32)


class LRPE(nnx.Module):
    """Linearized relative positional encoding (Qin et al., TMLR 2023), as used by TransNormerLLM.

    ``x [B, T, H, D]`` at position ``p`` maps to ``[x cos(θ p), x sin(θ p)]`` of shape
    ``[B, T, H, 2D]``, so that ``LRPE(q, s)·LRPE(k, t) = Σ_d q_d k_d cos(θ_d (s − t))``, the real part
    of ``qᵀ diag(e^{iθ(s−t)}) k``: a relative encoding that stays a dot product, hence linearizable.
    ``θ [H, D]`` is learnable, initialized to ``base^(−2i/(H·D))`` over the ``H·D`` features.
    """

    def __init__(self, num_heads: int, head_dim: int, *, base: float = 10000.0, param_dtype: Dtype = jnp.float32):
        d = num_heads * head_dim
        theta = base ** (-2.0 * np.arange(d) / d)
        self.theta = nnx.Param(jnp.asarray(theta.reshape(num_heads, head_dim), param_dtype))

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Encode ``x [B, T, H, D]`` at integer ``positions [T]``; returns ``[B, T, H, 2D]`` in x's dtype."""
        angle = jnp.asarray(positions, jnp.float32)[:, None, None] * self.theta[...].astype(jnp.float32)
        xf = x.astype(jnp.float32)
        return jnp.concatenate([xf * jnp.cos(angle), xf * jnp.sin(angle)], axis=-1).astype(x.dtype)


class SGLU(nnx.Module):
    """Simple GLU channel mixer, a GLU without activation: ``O = ((X W_v) ⊙ (X W_u)) W_o``.

    TransNormerLLM Sec. 3.1.3. ``hidden_dim`` defaults to ``2·d_model`` as in the authors' nanoTransNormer.
    """

    def __init__(self, d_model: int, hidden_dim: Optional[int] = None, *, use_bias: bool = False,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        hidden_dim = 2 * d_model if hidden_dim is None else hidden_dim
        check_positive(d_model=d_model, hidden_dim=hidden_dim)
        def linear(in_features, out_features):
            return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)

        self.value, self.gate = linear(d_model, hidden_dim), linear(d_model, hidden_dim)
        self.out = linear(hidden_dim, d_model)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., d_model] -> [..., d_model]``."""
        return self.out(self.value(x) * self.gate(x))


class TransNormerAttention(nnx.Module):
    """TransNormerLLM's token mixer: gated linear attention with LRPE-d and Lightning Attention.

    ``O = SRMSNorm(Σ_{t≤s} λ^(s−t) (q_s·k_t) v_t) ⊙ u_s · W_o`` with ``q = LRPE(swish(x W_q))``,
    ``k = LRPE(swish(x W_k))``, ``v = x W_v``, ``u = x W_u``; SRMSNorm runs over all heads together.
    The decay ``λ`` is fixed per head (``transnormer_decay``); ``θ`` of LRPE is learned.

    Example::

      layer = TransNormerAttention(64, 4, layer_idx=0, num_layers=12, rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())             # x, y: [B, T, 64], causal by construction
      cache = layer.init_cache(B, max_len)          # max_len is ignored: the state is O(1)
      y_t, cache = layer.decode(x_t, cache)         # x_t, y_t: [B, 1, 64]

    ``__call__``, ``init_cache`` and ``decode`` take ``MultiHeadAttention``'s arguments, so the layer
    swaps into a model or a generation loop written for it.

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: heads ``H``.
      head_dim: features per head ``D`` (default ``d_model // num_heads``); the state is ``[2D, D]``
        per head with LRPE, ``[D, D]`` without.
      lrpe: apply LRPE (``False`` leaves the decay as the only positional signal).
      layer_idx, num_layers: depth of this layer in the stack, which sets the decay rates.
      use_bias: bias in the q/k/v/u and output projections.
      eps: epsilon of the SRMSNorm on the attention output.
      chunk_size, implementation: passed to ``attnjax.linear.linear_attention``.
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the projections.
    """

    def __init__(
        self, d_model: int, num_heads: int, *, head_dim: Optional[int] = None, lrpe: bool = True,
        layer_idx: int = 0, num_layers: int = 1, use_bias: bool = False, eps: float = 1e-6, chunk_size: int = 64,
        implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(num_layers=num_layers, chunk_size=chunk_size)
        check_implementation(implementation)
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.decay = tuple(float(x) for x in transnormer_decay(num_heads, layer_idx, num_layers))
        self.eps, self.chunk_size, self.implementation = eps, chunk_size, implementation

        def linear(in_features, out_features, axis=-1):
            return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=use_bias, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

        self.query, self.key, self.value, self.gate = (linear(d_model, (num_heads, head_dim)) for _ in range(4))
        self.out = linear((num_heads, head_dim), d_model, axis=(-2, -1))
        self.lrpe = LRPE(num_heads, head_dim, param_dtype=param_dtype) if lrpe else None

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """Causal token mixing of ``x [B, T, d_model]``; returns ``[B, T, d_model]``.

        ``mask``: ``None`` or ``masks.Causal()`` (the same, causal, result); the layer is causal by
        construction and refuses any other mask with ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("TransNormerAttention", mask)
        q, k, v, u = self._project(x, jnp.arange(x.shape[1]))
        o = linear_attention(q, k, v, feature_map="identity", causal=True, decay=self._decay(), scale=1.0,
                             chunk_size=self.chunk_size, implementation=self.implementation)
        return self._output(o, u)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> LinearCache:
        """An empty ``LinearCache``: a zero state ``[batch, H, Dk', D]`` and length 0.

        ``MultiHeadAttention.init_cache``'s arguments: ``max_len`` (a positive int) is checked and
        otherwise ignored, since the state does not grow; ``dtype`` is the state's (default float32,
        the library's running-state precision), kept by ``decode``.
        """
        check_positive(batch=batch, max_len=max_len)
        dk = 2 * self.head_dim if self.lrpe is not None else self.head_dim
        state = jnp.zeros((batch, self.num_heads, dk, self.head_dim), jnp.float32 if dtype is None else dtype)
        return LinearCache(state, jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: LinearCache) -> tuple[jax.Array, LinearCache]:
        """One step: ``S = λ S + k_tᵀ v_t``, ``o_t = q_t S``, then norm, gate and projection.

        Equal, position by position, to ``self(x)``; the token sits at position ``cache.length``.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: a ``LinearCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        check_step("x_t", x_t, self.d_model, cache.state.shape[0])
        return self._cached(x_t, cache, "recurrent")

    def prefill(self, x: jax.Array, cache: LinearCache) -> tuple[jax.Array, LinearCache]:
        """``x [B, T, d_model]`` at positions ``cache.length …`` in one chunked ``linear_attention`` pass from the
        cache's state (its final state the new cache): equal to ``T`` calls of ``decode``, O(T) work.

        Returns:
          ``(y [B, T, d_model], cache)`` with the ``T`` tokens added.
        """
        check_chunk("x", x, self.d_model, cache.state.shape[0])
        return self._cached(x, cache, self.implementation)

    def _cached(self, x: jax.Array, cache: LinearCache, implementation: str) -> tuple[jax.Array, LinearCache]:
        q, k, v, u = self._project(x, cache.length + jnp.arange(x.shape[1]))
        o, state = linear_attention(q, k, v, feature_map="identity", causal=True, decay=self._decay(), scale=1.0,
                                    chunk_size=self.chunk_size, initial_state=cache.state, return_state=True,
                                    implementation=implementation)
        return self._output(o, u), LinearCache(state.astype(cache.state.dtype), cache.length + x.shape[1])

    def _decay(self) -> jax.Array:
        return jnp.asarray(self.decay, jnp.float32)

    def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, ...]:
        q, k = jax.nn.silu(self.query(x)), jax.nn.silu(self.key(x))
        if self.lrpe is not None:
            q, k = self.lrpe(q, positions), self.lrpe(k, positions)
        return q, k, self.value(x), self.gate(x)

    def _output(self, o: jax.Array, u: jax.Array) -> jax.Array:
        B, T, H, D = o.shape
        o = srms_norm(o.reshape(B, T, H * D), self.eps).reshape(B, T, H, D)
        return self.out(o * u)


class TransNormerBlock(nnx.Module):
    """A TransNormerLLM block: ``h = x + GLA(SRMSNorm(x))``, ``y = h + SGLU(SRMSNorm(h))``.

    Args:
      d_model, num_heads: as in ``TransNormerAttention``.
      hidden_dim: SGLU width (default ``2·d_model``).
      eps: epsilon of the SRMSNorms (pre-norms and the attention's output norm).
      use_bias, dtype, param_dtype, rngs: for every projection.
      **attention_kwargs: the other arguments of ``TransNormerAttention`` (``head_dim``, ``lrpe``,
        ``layer_idx``, ``num_layers``, ``chunk_size``, ``implementation``).
    """

    def __init__(self, d_model: int, num_heads: int, *, hidden_dim: Optional[int] = None, eps: float = 1e-6,
                 use_bias: bool = False, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs, **attention_kwargs):
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = TransNormerAttention(d_model, num_heads, eps=eps, **common, **attention_kwargs)
        self.mlp = SGLU(d_model, hidden_dim, **common)
        self.d_model, self.eps = d_model, eps

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal; ``mask`` as in ``TransNormerAttention``."""
        check_input("x", x, self.d_model)
        h = x + self.attention(srms_norm(x, self.eps), mask=mask)
        return h + self.mlp(srms_norm(h, self.eps))

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> LinearCache:
        """The attention's empty ``LinearCache`` (the SGLU is per token and needs none)."""
        return self.attention.init_cache(batch, max_len, dtype)

    def decode(self, x_t: jax.Array, cache: LinearCache) -> tuple[jax.Array, LinearCache]:
        """One step on ``x_t [B, 1, d_model]``; equal, position by position, to ``self(x)``."""
        check_step("x_t", x_t, self.d_model, cache.state.shape[0])
        a, cache = self.attention.decode(srms_norm(x_t, self.eps), cache)
        h = x_t + a
        return h + self.mlp(srms_norm(h, self.eps)), cache

    def prefill(self, x: jax.Array, cache: LinearCache) -> tuple[jax.Array, LinearCache]:
        """``x [B, T, d_model]`` at the cache's next ``T`` positions in one pass (``TransNormerAttention.prefill``);
        equal to ``T`` calls of ``decode``."""
        a, cache = self.attention.prefill(srms_norm(x, self.eps), cache)
        h = x + a
        return h + self.mlp(srms_norm(h, self.eps)), cache


def _lrpe_example(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [2, 8, 2, 4]`` and ``positions [8]`` for the ``LRPE`` spec."""
    return jax.random.normal(key, (2, 8, 2, 4), jnp.float32), jnp.arange(8)


PAPER = "Qin et al. 2023 (TransNormerLLM)"
register_module(ModuleSpec("transnormer", TransNormerAttention, dict(d_model=16, num_heads=2, chunk_size=4),
                           (2, 10, 16), kind="layer", paper=PAPER, causal=True, decodes=True))
register_module(ModuleSpec("transnormer", TransNormerBlock, dict(d_model=16, num_heads=2, chunk_size=4, hidden_dim=24),
                           (2, 10, 16), kind="block", paper=PAPER, causal=True, decodes=True))
register_module(ModuleSpec("lrpe", LRPE, dict(num_heads=2, head_dim=4), _lrpe_example, kind="other",
                           paper="Qin et al. 2023 (Linearized Relative Positional Encoding)", takes_rngs=False))
register_module(ModuleSpec("sglu", SGLU, dict(d_model=16, hidden_dim=24), (2, 8, 16), kind="other", paper=PAPER,
                           causal=True))
