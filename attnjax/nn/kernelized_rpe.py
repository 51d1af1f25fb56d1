"""Kernelized attention with relative positional encoding as a Flax NNX layer.

Luo et al., "Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding"
(NeurIPS 2021), Algorithm 1 (NPRF-Transformer with RPE): project ``q, k, v``, ℓ2-normalize ``q, k``,
``z_i = φ(q_i) Σ_j e^(b_(j−i)) φ(k_j)ᵀ v_j / φ(q_i) Σ_j e^(b_(j−i)) φ(k_j)ᵀ`` (eq. 10) through the FFT
(``attnjax.linear.kernelized_rpe``), then the output projection.

The paper learns one scalar ``b_(j−i)`` per offset up to the training length (``2n − 1`` of them,
eq. 6, shared by all layers). Here each layer owns a table per head, clipped at ``max_distance = k``
(Shaw et al. 2018, §3.2): ``[H, k + 1]`` for offsets ``−k … 0`` (causal) or ``[H, 2k + 1]`` for ``−k … k``,
so the layer runs at any length; the default ``k = 511`` holds every offset of the paper's
512-token sequences. The table starts at zero (attention without positions).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.checks import check_positive
from attnjax.linear.feature_maps import FeatureMap
from attnjax.linear.kernelized_rpe import (
    DEFAULT_FEATURE_MAP, kernelized_rpe_attention, kernelized_rpe_attention_reference, rpe_bias_from_table,
    toeplitz_offsets)
from attnjax.nn.attention import KVCache
from attnjax.nn.checks import check_input, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module

PAPER = "Luo et al. 2021 (Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding)"


class KernelizedRPEAttention(nnx.Module):
    """Self-attention ``[B, T, d_model] -> [B, T, d_model]``: kernelized attention with a learned
    relative bias per head (Luo et al. 2021, eq. 10 and Algorithm 1).

    ``q = x W_q``, ``k = x W_k``, ``v = x W_v`` (``num_kv_heads`` K/V heads, GQA), ``b = rpe[h, clip(j − i)]``,
    ``z`` by ``kernelized_rpe_attention`` (FFT, O(T log T)), ``y = z W_o``. A causal layer decodes from a
    ``KVCache``: the step at position ``t`` attends over the cached keys with ``e^(b_(j−t))``, O(t) per
    token (the FFT does not help one query at a time, the paper's footnote 3). The FFT path is causal up
    to float32 rounding only: later tokens move earlier outputs by ~1e-7 (any FFT product mixes all
    positions); ``implementation="reference"`` is causal bit for bit.

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: query heads ``H``; num_kv_heads: K/V heads (default ``H``), dividing ``H``.
      head_dim: features per head (default ``d_model // num_heads``).
      max_distance: ``k``, the farthest offset with its own bias (511: the paper's 512-token inputs).
      causal: a decoder layer (keys after the query get ``c = 0``; ``decode`` works) or an encoder.
      feature_map, qk_norm, feature_chunk: as in ``kernelized_rpe_attention`` (PRF with 64 features,
        normalized q and k: the paper's NPRF).
      implementation: "xla" (the FFT) or "reference" (the quadratic form).
      qkv_bias, out_bias: biases of the projections.
      dtype, param_dtype: computation and parameter dtypes of the projections.
      rngs: ``params`` initializes the projections.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, max_distance: int = 511, causal: bool = True,
                 feature_map: Union[str, FeatureMap] = DEFAULT_FEATURE_MAP, qk_norm: bool = True,
                 feature_chunk: int = 8, implementation: str = "xla", qkv_bias: bool = False,
                 out_bias: bool = False, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive(num_kv_heads=num_kv_heads, max_distance=max_distance, feature_chunk=feature_chunk)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if implementation not in ("xla", "reference"):
            raise ValueError(f"implementation must be 'xla' or 'reference', got {implementation!r}")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.causal, self.implementation = causal, implementation
        self.feature_map, self.qk_norm, self.feature_chunk = feature_map, qk_norm, feature_chunk
        self.dtype, self.param_dtype = dtype, param_dtype

        def linear(in_features, out_features, axis=-1, use_bias=qkv_bias):
            return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=use_bias, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

        self.query = linear(d_model, (num_heads, head_dim))
        self.key = linear(d_model, (num_kv_heads, head_dim))
        self.value = linear(d_model, (num_kv_heads, head_dim))
        self.out = linear((num_heads, head_dim), d_model, axis=(-2, -1), use_bias=out_bias)
        width = max_distance + 1 if causal else 2 * max_distance + 1
        self.rpe = nnx.Param(jnp.zeros((num_heads, width), param_dtype))

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """Self-attention of ``x [B, T, d_model]``; returns ``[B, T, d_model]``.

        ``mask``: ``None`` or ``masks.Causal()``. A causal layer is causal either way; an encoder
        layer turns causal with ``masks.Causal()``. Other masks: ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        if mask is not None and not isinstance(mask, masks.Causal):
            raise NotImplementedError(f"KernelizedRPEAttention takes mask=None or masks.Causal(), got "
                                      f"{type(mask).__name__}")
        causal = self.causal or mask is not None
        T = x.shape[1]
        b = rpe_bias_from_table(self.rpe[...], jnp.asarray(toeplitz_offsets(T, T)), causal=self.causal)
        common = dict(feature_map=self.feature_map, qk_norm=self.qk_norm, causal=causal)
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.implementation == "xla":
            z = kernelized_rpe_attention(q, k, v, b, feature_chunk=self.feature_chunk, **common)
        else:
            z = kernelized_rpe_attention_reference(q, k, v, b, **common)
        return self.out(z)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> KVCache:
        """An empty ``KVCache``: keys and values ``[batch, max_len, Hkv, D]`` of zeros, length 0
        (``MultiHeadAttention.init_cache``'s arguments; ``dtype`` defaults to the module's)."""
        if not self.causal:
            raise NotImplementedError("decoding needs a causal KernelizedRPEAttention (causal=True)")
        check_positive(batch=batch, max_len=max_len)
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One step on ``x_t [B, 1, d_model]`` at position ``t = cache.length``; equal, position by
        position, to ``self(x)``.

        ``z_t = Σ_(j≤t) e^(b_(j−t)) φ(q_t)·φ(k_j) v_j / Σ_(j≤t) e^(b_(j−t)) φ(q_t)·φ(k_j)`` over the
        cache (``kernelized_rpe_attention_reference`` with the slots after ``t`` given ``b = −∞``).
        """
        if not self.causal:
            raise NotImplementedError("decoding needs a causal KernelizedRPEAttention (causal=True)")
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        dtype = cache.k.dtype
        q, k, v = (p(x_t).astype(dtype) for p in (self.query, self.key, self.value))
        start = (0, cache.length, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k, start)
        v_all = jax.lax.dynamic_update_slice(cache.v, v, start)
        slots = jnp.arange(k_all.shape[1])
        b = rpe_bias_from_table(self.rpe[...], slots - cache.length, causal=True)
        b = jnp.where(slots <= cache.length, b, -jnp.inf)
        z = kernelized_rpe_attention_reference(q, k_all, v_all, b, feature_map=self.feature_map, qk_norm=self.qk_norm)
        return self.out(z), KVCache(k_all, v_all, cache.length + 1)


# The conformance suite checks causality bit for bit, which no FFT product gives: rounding carries
# ~1e-7 of later tokens into earlier rows. The registered example therefore runs the quadratic form;
# tests/nn/test_kernelized_rpe.py checks the FFT layer against it, its causality to rounding and its decode.
register_module(ModuleSpec("kernelized_rpe", KernelizedRPEAttention,
                           dict(d_model=16, num_heads=2, num_kv_heads=1, max_distance=4, implementation="reference"),
                           (2, 9, 16), kind="layer", paper=PAPER, causal=True, decodes=True))

__all__ = ["KernelizedRPEAttention"]
