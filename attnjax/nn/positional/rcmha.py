"""RCMHA: relative convolutional multi-head attention (Sugiharto, Aradea and Mubarok, "RCMHA: Relative
Convolutional Multi-Head Attention for Natural Language Modelling", arXiv:2308.03429, 2023).

Two changes to multi-head attention: a depthwise convolution along time on each of the projected
queries, keys and values (as in Primer's multi-DConv-head attention, So et al. 2021), and Transformer-XL's
relative position logits (Dai et al. 2019, §3.3) in place of absolute positions:

    q, k, v = DConv_q(x W_q), DConv_k(x W_k), DConv_v(x W_v + b_v)          (per head h)
    A_ij = q_iᵀk_j + q_iᵀW_R R_(i−j) + uᵀk_j + vᵀW_R R_(i−j)
    y = concat_h softmax_j(A_ij / √D) v_j  W_o + b_o

The convolution is causal, as in the authors' code (``SpatialDepthWiseConvolution``: pad ``K − 1`` on
both sides, keep the first ``T`` outputs), so the layer is a causal language-model layer that decodes
token by token.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.api import attention
from attnjax.checks import check_positive
from attnjax.dispatch import check_implementation
from attnjax.nn.attention import KVCache
from attnjax.nn.capture import sow_attention_inputs
from attnjax.nn.checks import check_input, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional.transformer_xl import TransformerXLBias


class CausalDepthwiseConv(nnx.Module):
    """A causal depthwise convolution along time of per-head features: ``[B, T, H, D] -> [B, T, H, D]``.

    ``y_t[h, d] = b[d] + Σ_{s=0..K−1} w[s, d]·x_(t−K+1+s)[h, d]`` with ``x_t = 0`` before the sequence
    (or the ``K − 1`` given ``history`` inputs): one length-``K`` filter per feature ``d``, shared by the
    heads, as the ``Conv1d(D, D, K, groups=D)`` the RCMHA authors apply to ``batch·heads`` rows
    (Sugiharto et al. 2023; So et al. 2021, Primer §2). Cost O(B·T·H·D·K).

    Args:
      head_dim: features per head ``D``.
      kernel_size: ``K`` (3 in RCMHA and Primer).
      use_bias: add ``b``.
      param_dtype: dtype of the parameters.
      rngs: ``params`` draws ``w`` and ``b`` uniform in ``±1/√K`` (PyTorch's ``Conv1d`` default, used by
        the authors).
    """

    def __init__(self, head_dim: int, kernel_size: int = 3, *, use_bias: bool = True,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(head_dim=head_dim, kernel_size=kernel_size)
        self.kernel_size = kernel_size
        init = nnx.initializers.uniform(2.0 / kernel_size ** 0.5)

        def draw(shape):
            return nnx.Param(init(rngs.params(), shape, param_dtype) - kernel_size ** -0.5)

        self.kernel = draw((kernel_size, head_dim))
        self.bias = draw((head_dim,)) if use_bias else None

    def __call__(self, x: jax.Array, history: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, T, H, D]`` -> ``[B, T, H, D]`` in x's dtype; ``history [B, K − 1, H, D]``: the inputs
        just before ``x`` (zeros when ``None``, the start of a sequence)."""
        K, T = self.kernel_size, x.shape[1]
        if history is None:
            history = jnp.zeros((x.shape[0], K - 1) + x.shape[2:], x.dtype)
        padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
        kernel = self.kernel[...].astype(x.dtype)
        y = sum(kernel[s] * padded[:, s:s + T] for s in range(K))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class RCMHACache:
    """What ``RCMHA.decode`` keeps between tokens.

    Attributes:
      kv: the convolved keys and values, ``KVCache`` with ``k``, ``v`` ``[B, max_len, H, D]`` and ``length``.
      window: ``[3, B, K − 1, H, D]``, the last ``K − 1`` projected queries, keys and values before
        their convolutions (zeros before the first token).
    """

    kv: KVCache
    window: jax.Array


IMPLEMENTATIONS = ("auto", "reference", "xla")
"""Paths of ``attnjax.attention`` that take a bias reading the queries (the Pallas kernels don't)."""


class RCMHA(nnx.Module):
    """Relative convolutional multi-head attention (Sugiharto et al. 2023), a causal LM layer.

    ``q, k, v`` are the projections of ``x`` passed through causal depthwise convolutions
    (``CausalDepthwiseConv``); the logits are Transformer-XL's ``A_ij / √D`` (Dai et al. 2019, §3.3) with
    sinusoids ``R`` of ``d_model`` features, a learned ``W_R`` per head and learned ``u``, ``v`` per head,
    evaluated by ``attnjax.attention`` with the ``TransformerXLBias`` rule (per tile in the ``xla`` path,
    never ``[T, S]``): the queries given to attention are ``q + u`` (terms (a) + (c)), the rule adds
    (b) + (d).

    Choices where the paper and the authors' code leave room:

    - Positions: the paper cites Transformer-XL's relative encoding; its released code uses labml's
      variant (a learned ``[2·4096, H, D]`` table of key offsets and a learned scalar per offset and head).
      This layer follows Dai et al.'s equation (sinusoids and ``W_R``, so any length works).
    - Biases as in the authors' code: none on the query and key projections, one on the value
      projection and the output; the query and value convolutions have biases, the key convolution has
      none (a shift shared by every key adds the same ``(q_i + u)·b`` to every logit of row ``i``, which
      softmax cancels: that parameter could never learn).
    - Initialization: projections flax's LeCun normal, ``W_R`` LeCun normal over its ``d_model`` inputs,
      ``u`` and ``v`` normal(0.02) (Transformer-XL's ``init_std``), convolutions as ``CausalDepthwiseConv``.
    - No attention dropout (the authors use 0.1 during training).

    Example::

      layer = RCMHA(64, 4, rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())                     # x, y: [B, T, 64]
      cache = layer.init_cache(B, max_len)
      y_t, cache = layer.decode(x_t, cache)                 # x_t, y_t: [B, 1, 64]

    Args:
      d_model: features of ``x`` and of the output; also the sinusoid dimension ``d_R`` (even).
      num_heads: heads ``H``.
      head_dim: features per head ``D`` (default ``d_model // num_heads``).
      kernel_size: the convolutions' length ``K`` (3 in the authors' code).
      max_wavelength: the sinusoid base (10000).
      implementation: "auto", "reference" or "xla", passed to ``attnjax.attention``.
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the parameters.
    """

    def __init__(self, d_model: int, num_heads: int, *, head_dim: Optional[int] = None, kernel_size: int = 3,
                 max_wavelength: float = 10000.0, implementation: str = "auto", dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(kernel_size=kernel_size)
        if not max_wavelength > 0:
            raise ValueError(f"RCMHA max_wavelength must be positive, got {max_wavelength!r}")
        if d_model % 2:
            raise ValueError(f"RCMHA d_model must be even: it is the dimension of Transformer-XL's sinusoids "
                             f"(sin and cos halves), got {d_model}")
        check_implementation(implementation)
        if implementation not in IMPLEMENTATIONS:
            raise NotImplementedError(f"RCMHA runs attnjax.attention with implementation in {IMPLEMENTATIONS} "
                                      f"(its position term reads the queries), got {implementation!r}")
        self.d_model, self.num_heads, self.head_dim, self.kernel_size = d_model, num_heads, head_dim, kernel_size
        self.max_wavelength, self.implementation = max_wavelength, implementation
        self.dtype, self.param_dtype = dtype, param_dtype

        def linear(in_features, out_features, use_bias, axis=-1):
            return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=use_bias, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

        heads = (num_heads, head_dim)
        self.query, self.key, self.value = linear(d_model, heads, False), linear(d_model, heads, False), \
            linear(d_model, heads, True)
        self.query_conv = CausalDepthwiseConv(head_dim, kernel_size, param_dtype=param_dtype, rngs=rngs)
        self.key_conv = CausalDepthwiseConv(head_dim, kernel_size, use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.value_conv = CausalDepthwiseConv(head_dim, kernel_size, param_dtype=param_dtype, rngs=rngs)
        lecun = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2,
                                                  batch_axis=(0,))
        self.w_r = nnx.Param(lecun(rngs.params(), (num_heads, d_model, head_dim), param_dtype))
        small = nnx.initializers.normal(0.02)
        self.u = nnx.Param(small(rngs.params(), heads, param_dtype))
        self.v = nnx.Param(small(rngs.params(), heads, param_dtype))
        self.out = linear(heads, d_model, True, axis=(-2, -1))

    def relative_bias(self, query_offset: Optional[jax.Array] = None) -> TransformerXLBias:
        """The ``TransformerXLBias`` rule over ``W_R``, ``v`` and ``u``; ``query_offset`` places a decode step."""
        return TransformerXLBias(self.w_r[...], self.v[...], self.u[...], max_wavelength=self.max_wavelength,
                                 query_offset=query_offset)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``.

        ``mask``: an ``attnjax.masks`` value over ``[B, H, T, T]`` (``masks.Causal()`` for language
        modelling, the parallel form of ``decode``); the convolutions are causal whatever the mask.
        """
        check_input("x", x, self.d_model)
        q = self.query_conv(self.query(x))
        k = self.key_conv(self.key(x))
        v = self.value_conv(self.value(x))
        rule = self.relative_bias()
        q = rule.content_queries(q)
        sow_attention_inputs(self, q, k, mask=mask, bias=rule, scale=None, mechanism="softmax")
        out = attention(q, k, v, mask=mask, bias=rule, implementation=self.implementation)
        return self.out(out)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> RCMHACache:
        """An empty ``RCMHACache``: keys and values ``[batch, max_len, H, D]`` and a convolution window
        ``[3, batch, K − 1, H, D]`` of zeros, length 0. ``dtype`` defaults to ``dtype``, else ``param_dtype``."""
        check_positive(batch=batch, max_len=max_len)
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        shape = (batch, max_len, self.num_heads, self.head_dim)
        kv = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))
        return RCMHACache(kv, jnp.zeros((3, batch, self.kernel_size - 1, self.num_heads, self.head_dim), dtype))

    def decode(self, x_t: jax.Array, cache: RCMHACache) -> tuple[jax.Array, RCMHACache]:
        """One autoregressive step, equal position by position to ``self(x, mask=masks.Causal())``.

        The token's projections join the convolution window, its convolved key and value go to slot
        ``cache.kv.length``, and it attends to every filled slot with the rule's ``query_offset`` at that
        position. Decoding past ``max_len`` tokens is undefined (the write clamps to the last slot).

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: an ``RCMHACache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        kv = cache.kv
        check_step("x_t", x_t, self.d_model, kv.k.shape[0])
        dtype = kv.k.dtype
        raw = jnp.stack([p(x_t).astype(dtype) for p in (self.query, self.key, self.value)])
        q, k, v = (conv(x, history=h).astype(dtype)
                   for conv, x, h in zip((self.query_conv, self.key_conv, self.value_conv), raw, cache.window))
        window = jnp.concatenate([cache.window, raw], axis=2)[:, :, 1:]
        start = (0, kv.length, 0, 0)
        k_all = jax.lax.dynamic_update_slice(kv.k, k, start)
        v_all = jax.lax.dynamic_update_slice(kv.v, v, start)
        filled = masks.Explicit((jnp.arange(k_all.shape[1]) <= kv.length)[None, None, None, :])
        rule = self.relative_bias(query_offset=kv.length)
        out = attention(rule.content_queries(q), k_all, v_all, mask=filled, bias=rule,
                        implementation=self.implementation)
        return self.out(out), RCMHACache(KVCache(k_all, v_all, kv.length + 1), window)


register_module(ModuleSpec("causal_depthwise_conv", CausalDepthwiseConv, dict(head_dim=4),
                           lambda key: (jax.random.normal(key, (2, 9, 2, 4)),), kind="other",
                           paper="Sugiharto et al. 2023 (RCMHA); So et al. 2021 (Primer), §2", causal=True))
register_module(ModuleSpec(
    "rcmha", RCMHA, dict(d_model=16, num_heads=2, kernel_size=3), (2, 9, 16), kind="layer",
    paper="Sugiharto et al. 2023 (RCMHA: causal depthwise convolutions on Q, K, V and Transformer-XL's relative "
          "position logits, Dai et al. 2019 §3.3)", causal=True, decodes=True))
