"""Layers whose sparse attention pattern is predicted by learned parts: DMA and Sparsifiner.

- ``DynamicMaskAttention``: Shi et al. 2025, "Trainable Dynamic Mask Sparse Attention"
  (arXiv:2508.02124), official ``DogeAttention`` (SmallDoges/flash-dmattn); core in
  ``attnjax.sparse.dma``.
- ``SptAttention``: Gui et al. 2024, "SPT: Fine-Tuning Transformer-based Language Models Efficiently
  with Sparsification" (KDD 2024), the sparse MHA with learned PQ codebooks; core in ``attnjax.sparse.spt``.
- ``SparsifinerAttention``: Wei et al. 2023, "Sparsifiner: Learning Sparse Instance-Dependent
  Attention for Efficient Vision Transformers" (CVPR 2023), official ``MaskPredictor``/``Attention``
  (lim142857/Sparsifiner); core in ``attnjax.sparse.sparsifiner``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.nn.attention import KVCache, attention_projections
from attnjax.nn.checks import check_causal_mask, check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional import RoPE
from attnjax.sparse.dma import PAPER as DMA_PAPER
from attnjax.sparse.dma import biased_token_attention, dynamic_mask_attention, dynamic_mask_bias
from attnjax.sparse.sparsifiner import PAPER as SPARSIFINER_PAPER
from attnjax.sparse.sparsifiner import (attention_budget, connectivity_scores, dense_attention_probabilities,
                                        distillation_loss, sparsifiner_attention)
from attnjax.sparse.spt import PAPER as SPT_PAPER
from attnjax.sparse.spt import ESTIMATES, lookup_tables, pq_encode, pq_quantizer_loss, pq_top_lists
from attnjax.sparse.tokens import KeyLists, token_sparse_attention

IMPLEMENTATIONS = ("auto", "xla", "reference")


class DynamicMaskAttention(nnx.Module):
    """Dynamic mask attention as a token mixer (official ``DogeAttention`` without Doge's q/k RMSNorm)::

        Q, K, V = x W_q, x W_k, x W_v                      # [B, T, H, D], GQA K/V heads
        δ_j     = A · softplus(vec(V_j) W_Δ)               # [B, Hkv, T]: per key, per KV head
        y       = DMA(Q, K, V; δ, keep) W_o                # attnjax.sparse.dynamic_mask_attention

    Each query keeps the ``keep`` keys with the largest ``δ`` (among earlier keys under
    ``masks.Causal()``; one list per head otherwise) and adds ``δ_j`` to their logits, so ``W_Δ`` and
    ``A`` are trained end to end through the bias. ``A`` starts at ``a_init``: 0 in the official init,
    where every key ties (the earliest ``keep`` are kept) and ``W_Δ`` gets no gradient until ``A`` moves.

    Example::

      layer = DynamicMaskAttention(256, 4, num_kv_heads=2, keep=2048, rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())                    # x, y: [B, T, 256]
      cache = layer.init_cache(B, max_len); y_t, cache = layer.decode(x_t, cache)

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: query heads; num_kv_heads: K/V heads (default ``num_heads``), dividing it.
      keep: keys each query keeps (official ``keep_window_size``).
      head_dim: default ``d_model // num_heads``.
      dt_bias: a bias in ``W_Δ`` (official ``attention_bias``, False).
      a_init: initial value of every head's ``A`` (official 0).
      rope: optional ``attnjax.positional.RoPE`` on q and k.
      implementation: "auto"/"xla" (token engine) or "reference" (dense).
      dtype, param_dtype: computation and parameter dtypes.
      rngs: ``params`` initializes the projections.
    """

    def __init__(self, d_model: int, num_heads: int, *, keep: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, dt_bias: bool = False, a_init: float = 0.0,
                 rope: Optional[RoPE] = None,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive(keep=keep, num_kv_heads=num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"DynamicMaskAttention implementation must be one of {IMPLEMENTATIONS}, "
                             f"got {implementation!r}")
        if rope is not None:
            if not isinstance(rope, RoPE):
                raise TypeError(f"rope must be an attnjax.positional.RoPE or None, got {type(rope).__name__}")
            rope.frequencies(head_dim)
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.keep, self.rope, self.implementation = keep, rope, implementation
        self.dtype, self.param_dtype = dtype, param_dtype
        self.query, self.key, self.value, self.out = attention_projections(
            d_model, num_heads, num_kv_heads, head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dt_proj = nnx.Linear(num_kv_heads * head_dim, num_kv_heads, use_bias=dt_bias, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        self.a = nnx.Param(jnp.full((num_kv_heads,), a_init, param_dtype))

    def key_bias(self, v: jax.Array) -> jax.Array:
        """``δ = A · softplus(vec(v) W_Δ)``, float32 ``[B, Hkv, S]`` for values ``v [B, S, Hkv, D]``."""
        b = self.dt_proj.bias
        return dynamic_mask_bias(v, self.dt_proj.kernel[...], self.a[...], None if b is None else b[...])

    def _qkv(self, x, positions):
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q, k, v

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None,
                 positions: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``; ``mask``: None (one key list per head) or
        ``masks.Causal()`` (per query, among earlier keys); ``positions``: RoPE positions (default ``arange(T)``)."""
        check_input("x", x, self.d_model)
        check_causal_mask("DynamicMaskAttention", mask)
        q, k, v = self._qkv(x, jnp.arange(x.shape[1]) if positions is None else positions)
        heads = dynamic_mask_attention(q, k, v, self.key_bias(v), keep=self.keep, mask=mask,
                                       implementation=self.implementation)
        return self.out(heads)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> KVCache:
        """An empty ``KVCache``: zeros ``[batch, max_len, Hkv, D]`` and length 0."""
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        return KVCache.empty(batch, max_len, self.num_kv_heads, self.head_dim, dtype)

    def decode(self, x_t: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One causal step at position ``cache.length``: the token keeps the ``keep`` cached keys with the
        largest bias (its own included), equal to ``self(x, mask=masks.Causal())`` position by position.

        Args:
          x_t: ``[B, 1, d_model]``; cache: from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        dtype = cache.k.dtype
        q, k, v = (t.astype(dtype) for t in self._qkv(x_t, cache.length[None]))
        start = (0, cache.length, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k, start)
        v_all = jax.lax.dynamic_update_slice(cache.v, v, start)
        bias = self.key_bias(v_all)
        filled = jnp.arange(k_all.shape[1]) <= cache.length
        values, ids = jax.lax.top_k(jnp.where(filled, jax.lax.stop_gradient(bias), -jnp.inf),
                                    min(self.keep, k_all.shape[1]))
        ids = jnp.where(jnp.isfinite(values), ids, -1)
        lists = KeyLists(jnp.repeat(ids, self.num_heads // self.num_kv_heads, axis=1)[:, :, None])
        impl = "reference" if self.implementation == "reference" else "xla"
        heads = biased_token_attention(q, k_all, v_all, bias, lists, implementation=impl)
        return self.out(heads), KVCache(k_all, v_all, cache.length + 1)


register_module(ModuleSpec(
    "dynamic_mask", DynamicMaskAttention, dict(d_model=16, num_heads=4, num_kv_heads=2, keep=4, a_init=1.0),
    (2, 9, 16),
    kind="layer", paper=DMA_PAPER, causal=True, decodes=True))


TRUNC_NORMAL = jax.nn.initializers.truncated_normal(0.02)
"""The official init of the token projections ``proj_n``/``proj_back_n``: ``trunc_normal_(std=.02)``."""


class SparsifinerPredictor(nnx.Module):
    """Sparsifiner's connectivity mask predictor (official ``MaskPredictor``): approximate attention scores.

    ``A_approx = softmax((q W_q + b_q)(W_downᵀ(k W_k + b_k))ᵀ · scale) W_upᵀ`` per head
    (``attnjax.sparse.sparsifiner.connectivity_scores``), with ``c = head_dim // reduce_c_factor``
    channels and ``n_down = num_tokens // reduce_n_factor`` token bases. The token projections need a
    fixed number of key tokens ``N`` (a ViT's patch count).

    Args:
      head_dim: ``D`` of q and k; num_heads: query heads (the official scale ``num_heads ** -0.5``).
      num_tokens: ``N``, the number of key tokens.
      reduce_n_factor, reduce_c_factor: official defaults 8 and 2.
      basis_threshold: the inference basis keeps ``|W_up|`` entries above it (official ``BASIS_THRESHOLD``).
      param_dtype: parameter dtype; rngs: ``params`` initializes the projections.
    """

    def __init__(self, head_dim: int, num_heads: int, num_tokens: int, *, reduce_n_factor: int = 8,
                 reduce_c_factor: int = 2, basis_threshold: float = 0.0, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(head_dim=head_dim, num_heads=num_heads, num_tokens=num_tokens,
                       reduce_n_factor=reduce_n_factor, reduce_c_factor=reduce_c_factor)
        reduced_c, reduced_n = head_dim // reduce_c_factor, num_tokens // reduce_n_factor
        if reduced_c < 1 or reduced_n < 1:
            raise ValueError(f"head_dim // reduce_c_factor = {reduced_c} and num_tokens // reduce_n_factor = "
                             f"{reduced_n} must be at least 1")
        self.head_dim, self.num_heads, self.num_tokens = head_dim, num_heads, num_tokens
        self.basis_threshold = basis_threshold
        self.proj_c_q = nnx.Linear(head_dim, reduced_c, param_dtype=param_dtype, rngs=rngs)
        self.proj_c_k = nnx.Linear(head_dim, reduced_c, param_dtype=param_dtype, rngs=rngs)
        self.proj_n = nnx.Param(TRUNC_NORMAL(rngs.params(), (num_tokens, reduced_n), param_dtype))
        self.proj_back_n = nnx.Param(TRUNC_NORMAL(rngs.params(), (num_tokens, reduced_n), param_dtype))

    def __call__(self, q: jax.Array, k: jax.Array, *, training: bool = False) -> jax.Array:
        """Float32 scores ``[B, Hq, T, N]`` for ``q [B, T, Hq, D]``, ``k [B, N, Hkv, D]``; ``training`` uses
        ``W_up`` as is (reconstruction), else the thresholded ``|W_up|`` (official inference)."""
        if q.shape[-1] != self.head_dim or k.shape[1] != self.num_tokens or q.shape[2] != self.num_heads:
            raise ValueError(f"SparsifinerPredictor built for head_dim={self.head_dim}, num_heads={self.num_heads}, "
                             f"num_tokens={self.num_tokens}; got q {tuple(q.shape)}, k {tuple(k.shape)}")
        return connectivity_scores(q, k, self.proj_c_q.kernel[...], self.proj_c_q.bias[...], self.proj_c_k.kernel[...],
                                   self.proj_c_k.bias[...], self.proj_n[...], self.proj_back_n[...],
                                   training=training, basis_threshold=self.basis_threshold)


class SparsifinerAttention(nnx.Module):
    """Sparsifiner's MHSA (official ``Attention``): attention on each query's predicted top-k keys::

        Q, K, V = x W_q, x W_k, x W_v                      # [B, N, H, D]
        M = top-k(SparsifinerPredictor(Q, K))              # k = ceil(keep_rate · N) keys per query
        y = (softmax(Q Kᵀ/√D) on M) V W_o                  # the token engine's key lists

    The mask is not differentiated (official ``attn_mask.detach_()``), so the layer's output gives the
    predictor no gradient: train it with ``distillation_loss`` (attention reconstruction against the
    layer's own dense attention), alone or added to the task loss.

    Example::

      layer = SparsifinerAttention(384, 6, num_tokens=197, keep_rate=0.25, rngs=nnx.Rngs(0))
      y = layer(x)                                         # x, y: [B, 197, 384]
      loss = layer.distillation_loss(x)

    Args:
      d_model: features; num_heads: heads (``d_model // num_heads`` per head).
      num_tokens: ``N``, the sequence length the predictor is built for.
      keep_rate: share of keys each query keeps (official ``attn_keep_rate``, 0.25 by default).
      reduce_n_factor, reduce_c_factor, basis_threshold: the predictor's (``SparsifinerPredictor``).
      qkv_bias: biases in the q/k/v projections (official ``qkv_bias=False``; the output has one).
      implementation: the token engine's path, "auto", "xla" or "reference".
      dtype, param_dtype: computation and parameter dtypes; rngs: ``params``.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_tokens: int, keep_rate: float = 0.25,
                 reduce_n_factor: int = 8, reduce_c_factor: int = 2, basis_threshold: float = 0.0,
                 qkv_bias: bool = False, implementation: str = "auto", dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, None)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"SparsifinerAttention implementation must be one of {IMPLEMENTATIONS}, "
                             f"got {implementation!r}")
        self.d_model, self.num_heads, self.num_tokens = d_model, num_heads, num_tokens
        self.keep = attention_budget(keep_rate, num_tokens)
        self.implementation = implementation
        self.query, self.key, self.value, self.out = attention_projections(
            d_model, num_heads, num_heads, head_dim, qkv_bias=qkv_bias, out_bias=True, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)
        self.predictor = SparsifinerPredictor(head_dim, num_heads, num_tokens, reduce_n_factor=reduce_n_factor,
                                              reduce_c_factor=reduce_c_factor, basis_threshold=basis_threshold,
                                              param_dtype=param_dtype, rngs=rngs)

    def _qk(self, x):
        check_input("x", x, self.d_model)
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"SparsifinerAttention built for num_tokens={self.num_tokens}, got x {tuple(x.shape)}")
        return self.query(x), self.key(x)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, N, d_model] -> [B, N, d_model]``; ``mask`` (optional) restricts the candidates and the attention."""
        q, k = self._qk(x)
        scores = self.predictor(q, k)
        heads = sparsifiner_attention(q, k, self.value(x), scores, keep=self.keep, mask=mask,
                                      implementation=self.implementation)
        return self.out(heads)

    def distillation_loss(self, x: jax.Array, *, criterion: str = "mse", mask: Optional[masks.Mask] = None
                          ) -> jax.Array:
        """Attention reconstruction: ``distillation_loss(predictor(Q, K, training=True), softmax(Q Kᵀ/√D))``
        with Q and K held fixed (only the predictor learns from it), a float32 scalar."""
        q, k = (jax.lax.stop_gradient(t) for t in self._qk(x))
        target = dense_attention_probabilities(q, k, mask=mask)
        return distillation_loss(self.predictor(q, k, training=True), target, criterion=criterion)


def _predictor_example(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``q [2, 12, 2, 8]`` and ``k [2, 12, 1, 8]`` for the ``SparsifinerPredictor`` spec."""
    kq, kk = jax.random.split(key)
    return jax.random.normal(kq, (2, 12, 2, 8), jnp.float32), jax.random.normal(kk, (2, 12, 1, 8), jnp.float32)


register_module(ModuleSpec(
    "sparsifiner_predictor", SparsifinerPredictor, dict(head_dim=8, num_heads=2, num_tokens=12, reduce_n_factor=4),
    _predictor_example, kind="other", paper=SPARSIFINER_PAPER, call_kwargs=dict(training=True)))
register_module(ModuleSpec(
    "sparsifiner", SparsifinerAttention, dict(d_model=16, num_heads=2, num_tokens=12, keep_rate=0.5,
                                              reduce_n_factor=4), (2, 12, 16), kind="layer", paper=SPARSIFINER_PAPER))



class SptAttention(nnx.Module):
    """SPT's sparse MHA with learned PQ codebooks: each query attends to its top-L keys by the PQ estimate::

        Q, K, V = x W_q, x W_k, x W_v                      # [B, T, H, D], GQA K/V heads
        codes   = PQ(Q), PQ(K)                             # one shared codebook [M, C, D/M] (authors' code)
        ŝ_ij    = Σ_m L_m[code_m(q_i), code_m(k_j)]        # attnjax.sparse.spt lookup estimate
        y       = (softmax(Q Kᵀ/√D) on top-L(ŝ)) V W_o     # token engine key lists

    The codebooks are parameters trained with ``quantizer_loss`` (the authors' PQ loss on q and k, added to
    the task loss); the layer's output gives them no gradient (the choice is not differentiated). With
    fixed codebooks a query's choice depends on earlier keys only, so the layer is causal under
    ``masks.Causal()`` and decodes from a KV cache.

    Example::

      layer = SptAttention(256, 4, top_l=512, rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal()); loss = task_loss(y) + layer.quantizer_loss(x)

    Args:
      d_model: features; num_heads: query heads; num_kv_heads: K/V heads (default ``num_heads``).
      top_l: keys per query (the authors' code keeps ``T/8``).
      head_dim: default ``d_model // num_heads``; a multiple of ``num_subspaces``.
      num_subspaces, num_codewords: ``M`` and ``C``; estimate: "inner" or "match" (``attnjax.sparse.spt``).
      rope: optional ``attnjax.positional.RoPE`` on q and k (before quantization, as the authors' rotary variant).
      implementation: the token engine's path, "auto", "xla" or "reference".
      dtype, param_dtype: computation and parameter dtypes; rngs: ``params`` (codebooks standard normal,
        the authors' ``torch.randn``).
    """

    def __init__(self, d_model: int, num_heads: int, *, top_l: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, num_subspaces: int = 4, num_codewords: int = 16,
                 estimate: str = "inner", rope: Optional[RoPE] = None, implementation: str = "auto",
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive(top_l=top_l, num_kv_heads=num_kv_heads, num_subspaces=num_subspaces,
                       num_codewords=num_codewords)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim % num_subspaces:
            raise ValueError(f"head_dim ({head_dim}) must be a multiple of num_subspaces ({num_subspaces})")
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"SptAttention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        if rope is not None:
            if not isinstance(rope, RoPE):
                raise TypeError(f"rope must be an attnjax.positional.RoPE or None, got {type(rope).__name__}")
            rope.frequencies(head_dim)
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.top_l, self.estimate, self.rope, self.implementation = top_l, estimate, rope, implementation
        self.dtype, self.param_dtype = dtype, param_dtype
        self.query, self.key, self.value, self.out = attention_projections(
            d_model, num_heads, num_kv_heads, head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        shape = (num_subspaces, num_codewords, head_dim // num_subspaces)
        self.codebooks = nnx.Param(jax.random.normal(rngs.params(), shape, param_dtype))

    def _qkv(self, x, positions):
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q, k, v

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[masks.Mask] = None) -> KeyLists:
        """Each query's ``top_l`` keys by the PQ estimate with the learned codebooks (not differentiated)."""
        books = jnp.broadcast_to(jax.lax.stop_gradient(self.codebooks[...]).astype(jnp.float32),
                                 (k.shape[0], k.shape[2]) + self.codebooks.shape)
        q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
        return pq_top_lists(pq_encode(q, books), pq_encode(k, books), lookup_tables(books, self.estimate),
                            self.top_l, mask=mask)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None,
                 positions: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``; ``mask``: None or ``masks.Causal()``; ``positions``: RoPE."""
        check_input("x", x, self.d_model)
        check_causal_mask("SptAttention", mask)
        q, k, v = self._qkv(x, jnp.arange(x.shape[1]) if positions is None else positions)
        heads = token_sparse_attention(q, k, v, self.select(q, k, mask=mask), mask=mask,
                                       implementation=self.implementation)
        return self.out(heads)

    def quantizer_loss(self, x: jax.Array, *, positions: Optional[jax.Array] = None) -> jax.Array:
        """The authors' PQ loss on this layer's q and k (``pq_quantizer_loss``, summed), a float32 scalar."""
        check_input("x", x, self.d_model)
        q, k, _ = self._qkv(x, jnp.arange(x.shape[1]) if positions is None else positions)
        return pq_quantizer_loss(q, self.codebooks[...]) + pq_quantizer_loss(k, self.codebooks[...])

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> KVCache:
        """An empty ``KVCache``: zeros ``[batch, max_len, Hkv, D]`` and length 0."""
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        return KVCache.empty(batch, max_len, self.num_kv_heads, self.head_dim, dtype)

    def decode(self, x_t: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One causal step at position ``cache.length``: the token's top-L among the cached keys (its own
        included), equal to ``self(x, mask=masks.Causal())`` position by position.

        Args:
          x_t: ``[B, 1, d_model]``; cache: from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        dtype = cache.k.dtype
        q, k, v = (t.astype(dtype) for t in self._qkv(x_t, cache.length[None]))
        start = (0, cache.length, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k, start)
        v_all = jax.lax.dynamic_update_slice(cache.v, v, start)
        filled = masks.Explicit((jnp.arange(k_all.shape[1]) <= cache.length)[None, None, None, :])
        impl = "reference" if self.implementation == "reference" else "xla"
        heads = token_sparse_attention(q, k_all, v_all, self.select(q, k_all, mask=filled), implementation=impl)
        return self.out(heads), KVCache(k_all, v_all, cache.length + 1)


register_module(ModuleSpec(
    "spt", SptAttention, dict(d_model=16, num_heads=4, num_kv_heads=2, top_l=3, num_subspaces=2, num_codewords=4),
    (2, 9, 16), kind="layer", paper=SPT_PAPER, causal=True, decodes=True))

__all__ = ["DynamicMaskAttention", "SparsifinerAttention", "SparsifinerPredictor", "SptAttention"]
