"""Zoology's gated-convolution / input-dependent sparse attention hybrids (catalog B17).

Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models"
(arXiv:2312.04927; public code ``HazyResearch/zoology``). Gated convolutions (H3, Hyena, RWKV, and the
paper's minimal ``BaseConv``) need a width that grows with the number of key-value pairs to solve
multi-query associative recall (MQAR), while attention does not. Sec. 5 closes most of that gap by
adding a few *input-dependent sparse* attention layers to a gated-convolution stack, keeping it
sub-quadratic. Here:

- ``BaseConv``: the paper's gated convolution as in the official ``zoology/mixers/base_conv.py``
  (short-kernel variant, ``use_act=False``): ``y = (W u + b) ⊙ conv(u) + u`` with a causal depthwise
  convolution of ``kernel_size`` taps (``ShortConvolution``: ``nn.Conv1d(groups=d, padding=k−1)``
  truncated to the first ``T`` outputs, bias included).
- ``RoutedSparseAttention``: the sparse attention layer, content-routed per query: query ``t`` attends
  to its own key block (the ``block_kv`` keys holding ``t``, causally) and to the ``top_k − 1`` earlier
  blocks whose mean key scores highest against it, ``q_t · mean(K_n)``; that is the library's MoBA
  selector (``attnjax.sparse.Moba`` with ``block_q=1``, through ``attnjax.attention``). The selection
  depends on the input, costs ``O(T·T/block_kv)`` gate scores and ``O(T·top_k·block_kv)`` attention.
- ``SelectiveLookups``: the paper's learned selection of *which tokens attend* (official
  ``zoology/mixers/selective.py``, class ``SelectiveLookups``): a scorer ``Linear(d, 1)`` and
  ``s = softmax_t(score(x)) · √d / 8`` over the whole sequence. Training (``deterministic=False``):
  ``y = attn(x) ⊙ s + x`` with causal softmax attention at every position. Inference
  (``deterministic=True``, ``model.eval()``): only the ``⌈√T⌉`` tokens of highest ``s`` get ``attn(x)_t · s_t``
  added, the rest pass ``x_t`` unchanged; their attention rows alone are computed
  (``attnjax.sparse.selected_queries.selected_query_attention``, ``O(√T·T·D)``). The softmax over the
  sequence reads every token, so the layer is not causal and has no ``init_cache``/``decode``.
- ``BaseConvBlock``, ``ZoologyHybridBlock``, ``ZoologySelectiveBlock``: pre-norm residual blocks (zoology's
  ``TransformerBlock``: ``h = x + mixer(LN(x))``, an optional MLP after), the first with ``BaseConv`` alone,
  the others with ``BaseConv`` followed by ``RoutedSparseAttention`` (causal, decodable) or by
  ``SelectiveLookups`` (the paper's rule, not causal): one period of the paper's hybrid stack.

The paper's other Sec. 5 selections (programmatic, at repeated tokens) are not implemented. Routing queries
to key blocks (``RoutedSparseAttention``) is this library's causal alternative to the learned selection: a
token-by-token decoder can't reproduce a top-k over the whole sequence, so only the routed hybrid decodes,
with ``init_cache``/``decode`` equal to the parallel call.
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
from attnjax.nn.attention import KVCache, MultiHeadAttention
from attnjax.nn.checks import check_causal_mask, check_input, check_positive, check_step
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.sparse.moba import Moba, block_means
from attnjax.sparse.selected_queries import selected_query_attention, selection_size, top_positions

PAPER = "Arora et al. 2023 (Zoology: Measuring and Improving Recall in Efficient Language Models)"

NOT_CAUSAL = ("its selection is a softmax (and at inference a top-k) over the whole sequence, so a token's "
              "output depends on later tokens: it is not causal and cannot decode token by token")


class BaseConv(nnx.Module):
    """Zoology's ``BaseConv`` gated convolution: ``y = (W u + b) ⊙ conv(u) + u`` (official ``base_conv.py``).

    ``conv`` is a causal depthwise convolution with bias, ``conv(u)_t = b' + Σ_{i<k} w_i ⊙ u_{t−k+1+i}``
    (zero before the start): each output sees the last ``kernel_size`` inputs. Cost ``O(T·d·(d + k))``.

    Args:
      d_model: features ``d`` of ``u`` and of the output.
      kernel_size: taps ``k`` of the short convolution (3 in zoology's MQAR configs).
      dtype, param_dtype: computation and parameter dtypes.
      rngs: ``params`` initializes the projection and the convolution.
    """

    def __init__(self, d_model: int, *, kernel_size: int = 3, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(d_model=d_model, kernel_size=kernel_size)
        self.d_model, self.kernel_size = d_model, kernel_size
        self.projection = nnx.Linear(d_model, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv = nnx.Conv(d_model, d_model, kernel_size=(kernel_size,), feature_group_count=d_model,
                             padding=((kernel_size - 1, 0),), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d] -> [B, T, d]`` (the paper's ``u``), causal; ``mask``: ``None`` or ``masks.Causal()`` (the
        same result)."""
        check_input("x", x, self.d_model)
        check_causal_mask("BaseConv", mask)
        return self.projection(x) * self.conv(x) + x

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> jax.Array:
        """The last ``k − 1`` inputs, ``[batch, k − 1, d]`` zeros (the causal zero padding); ``max_len`` is
        checked and otherwise unused (the buffer rolls); ``dtype`` defaults to the kernel's."""
        check_positive(batch=batch, max_len=max_len)
        return jnp.zeros((batch, self.kernel_size - 1, self.d_model), self.conv.kernel.get_value().dtype if dtype is None
                         else dtype)

    def decode(self, x_t: jax.Array, cache: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One step ``x_t [B, 1, d] -> [B, 1, d]`` from the buffer; equal to ``self(x)`` at the token's position."""
        check_step("x_t", x_t, self.d_model, cache.shape[0])
        window = jnp.concatenate([cache, x_t.astype(cache.dtype)], axis=1)
        conv = self.conv(window)[:, -1:]
        return self.projection(x_t) * conv + x_t, window[:, 1:]


class RoutedSparseAttention(MultiHeadAttention):
    """Causal attention of each query to its own key block and its ``top_k − 1`` best earlier blocks.

    ``MultiHeadAttention`` with ``mechanism=Moba(block_q=1, block_kv=block_kv, top_k=top_k)`` and the causal
    mask: for query ``t`` with own block ``o = ⌊t / block_kv⌋``, the earlier blocks ``n < o`` are ranked by
    ``q_t · mean(K_n)`` (``attnjax.sparse.moba.block_gate``; no gradient through the choice) and the first
    ``top_k − 1`` kept; softmax attention then runs over the kept blocks' keys ``≤ t``.

    ``decode`` keeps a ``KVCache`` and applies the same rule to the cached keys (the earlier blocks are
    complete, so their means are final), which equals the parallel call position by position.

    Args:
      d_model, num_heads: as in ``MultiHeadAttention``.
      block_kv: keys per routed block.
      top_k: blocks per query, its own included.
      **kwargs: the other arguments of ``MultiHeadAttention`` (``num_kv_heads``, ``head_dim``, ``rope``,
        ``qkv_bias``, ``implementation``, ``dtype``, ``param_dtype``); no ``mechanism`` or ``context_dim``.
    """

    def __init__(self, d_model: int, num_heads: int, *, block_kv: int = 8, top_k: int = 2, rngs: nnx.Rngs,
                 **kwargs):
        for name in ("mechanism", "context_dim", "dropout_rate", "sequence_parallel"):
            if name in kwargs:
                raise ValueError(f"RoutedSparseAttention sets its own mechanism (causal self-attention, no dropout); "
                                 f"{name} is not accepted")
        super().__init__(d_model, num_heads, mechanism=Moba(block_q=1, block_kv=block_kv, top_k=top_k), rngs=rngs,
                         **kwargs)
        self.block_kv, self.top_k = block_kv, top_k

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None, positions: Optional[jax.Array] = None,
                 deterministic: Optional[bool] = None) -> jax.Array:
        """Routed causal self-attention of ``x [B, T, d_model]``; ``mask``: ``None`` or ``masks.Causal()``."""
        check_causal_mask("RoutedSparseAttention", mask)
        return super().__call__(x, mask=masks.Causal(), positions=positions, deterministic=deterministic)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> KVCache:
        """An empty ``KVCache``: keys and values ``[batch, max_len, H, D]`` of zeros, length 0."""
        check_positive(batch=batch, max_len=max_len)
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        return KVCache(jnp.zeros((batch, max_len, self.num_kv_heads, self.head_dim), dtype),
                       jnp.zeros((batch, max_len, self.num_v_heads, self.v_head_dim), dtype),
                       jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One step ``x_t [B, 1, d_model]`` at position ``cache.length``; equal to ``self(x)`` at that position."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"RoutedSparseAttention decodes from a KVCache (init_cache), got {type(cache).__name__}")
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        t = cache.length
        q, k_all, v_all = self.write_cache(x_t, cache.k, cache.v, slot=t, positions=t[None])
        B, L, Hkv, D = k_all.shape
        G = self.num_heads // Hkv
        means = block_means(k_all, self.block_kv)  # [B, nb, Hkv, D]; blocks before t's own are complete
        qg = jax.lax.stop_gradient(q[:, 0].astype(jnp.float32)).reshape(B, Hkv, G, D)
        gate = jnp.einsum("bkgd,bnkd->bkgn", qg, jax.lax.stop_gradient(means)).reshape(B, self.num_heads, -1)
        nb = gate.shape[-1]
        own = t // self.block_kv
        blocks = jnp.arange(nb)
        earlier = blocks < own
        # rank among the earlier blocks; ties go to the lower block index, as lax.top_k
        ahead = (gate[..., None, :] > gate[..., :, None]) | (
            (gate[..., None, :] == gate[..., :, None]) & (blocks[None, :] < blocks[:, None]))
        rank = jnp.sum(ahead & earlier[None, :], axis=-1)
        kept = (blocks == own) | (earlier & (rank < self.top_k - 1))  # [B, H, nb]
        slots = jnp.arange(L)
        row = kept[..., slots // self.block_kv] & (slots <= t)
        out = attention(q, k_all, v_all, mechanism="softmax", mask=masks.Explicit(row[:, :, None, :]),
                        implementation=self.implementation)
        return self.out(out), KVCache(k_all, v_all, t + 1)


class SelectiveLookups(MultiHeadAttention):
    """Zoology's learned selection of the tokens that attend (Arora et al. 2023, arXiv:2312.04927, Sec. 5;
    official ``zoology/mixers/selective.py``, class ``SelectiveLookups``).

    ``s = softmax_t(w·x_t + b) · √d_model / 8`` over the ``T`` tokens (``selection``), ``a = out(attn(x))``
    this module's causal multi-head softmax self-attention at every position. Then:

    - training (``deterministic=False``, the default, as ``nnx.Dropout``): ``y_t = x_t + s_t·a_t``;
    - inference (``deterministic=True``, after ``model.eval()`` or ``nnx.view(model, deterministic=True)``):
      the ``k = ⌈√T⌉`` tokens of highest ``s`` (``top_positions``; ties to the earlier token) get
      ``y_t = x_t + s_t·a_t``, every other token ``y_t = x_t``. Only those ``k`` query rows attend
      (``selected_query_attention``): ``O(k·T·D)`` attention instead of ``O(T²·D)``, besides the ``O(T·d²)``
      projections of every token's query, key and value.

    The same flag switches attention dropout off. Not causal (the softmax over the sequence, and the top-k,
    read every token): ``init_cache``, ``decode`` and ``prefill`` raise ``NotImplementedError``.

    Args:
      d_model: features of ``x`` and of the output (the official ``d_model``).
      num_heads: attention heads (official default 1).
      qkv_bias, out_bias: biases of the projections (``True``, as the official ``nn.Linear`` layers).
      dropout_rate: attention-weight dropout in training (the official ``dropout``).
      rngs: ``params`` initializes the projections and the scorer; ``dropout`` seeds dropout.
      **kwargs: the other arguments of ``MultiHeadAttention`` (``num_kv_heads``, ``num_v_heads``,
        ``head_dim``, ``v_head_dim``, ``rope``, ``implementation``, ``dtype``, ``param_dtype``); no
        ``mechanism``, ``context_dim``, ``position_bias`` or ``sequence_parallel``.
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, qkv_bias: bool = True, out_bias: bool = True,
                 dropout_rate: float = 0.0, rngs: nnx.Rngs, **kwargs):
        for name in ("mechanism", "context_dim", "position_bias", "sequence_parallel"):
            if name in kwargs:
                raise ValueError(f"SelectiveLookups is causal softmax self-attention without a position bias; "
                                 f"{name} is not accepted")
        super().__init__(d_model, num_heads, qkv_bias=qkv_bias, out_bias=out_bias, dropout_rate=dropout_rate,
                         rngs=rngs, **kwargs)
        self.selecting = nnx.Linear(d_model, 1, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

    def selection(self, x: jax.Array) -> jax.Array:
        """``s = softmax_t(score(x_t)) · √d_model / 8``: float32 ``[B, T]`` of ``x [B, T, d_model]``."""
        check_input("x", x, self.d_model)
        score = self.selecting(x)[..., 0].astype(jnp.float32)
        return jax.nn.softmax(score, axis=1) * (self.d_model ** 0.5 / 8)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None, positions: Optional[jax.Array] = None,
                 deterministic: Optional[bool] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``; ``mask``: ``None`` or ``masks.Causal()`` (the attention is
        causal either way; the selection is not); ``positions``: RoPE positions ``[B, T]`` or ``[T]``;
        ``deterministic``: ``None`` uses ``self.deterministic`` (``True``: the top-k inference rule)."""
        check_input("x", x, self.d_model)
        check_causal_mask("SelectiveLookups", mask)
        selection = self.selection(x)
        deterministic = self.deterministic if deterministic is None else deterministic
        if not deterministic:
            a = super().__call__(x, mask=masks.Causal(), positions=positions, deterministic=False)
            return x + a * selection[..., None].astype(a.dtype)
        B, T, _ = x.shape
        chosen = top_positions(selection, selection_size(T))                       # [B, k]
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.rope is not None:
            positions = jnp.arange(T) if positions is None else positions
            q, k = self.rope(q, positions), self.rope(k, positions)
        a = self.out(selected_query_attention(q, k, v, chosen, implementation=self.implementation))  # [B, k, d]
        added = a * jnp.take_along_axis(selection, chosen, axis=1)[..., None].astype(a.dtype)
        return x.astype(added.dtype).at[jnp.arange(B)[:, None], chosen].add(added)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> KVCache:
        """``NotImplementedError``: the layer is not causal (see the class docstring)."""
        raise NotImplementedError(f"SelectiveLookups has no cache: {NOT_CAUSAL}")

    def decode(self, x_t: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """``NotImplementedError``: the layer is not causal (see the class docstring)."""
        raise NotImplementedError(f"SelectiveLookups does not decode: {NOT_CAUSAL}")

    def prefill(self, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """``NotImplementedError``: the layer is not causal (see the class docstring)."""
        raise NotImplementedError(f"SelectiveLookups does not prefill a cache: {NOT_CAUSAL}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class ZoologyCache:
    """Decoding state of a ``BaseConvBlock`` / ``ZoologyHybridBlock``: the convolution's buffer and, for
    the hybrid, the attention's ``KVCache`` (``None`` for ``BaseConvBlock``)."""

    conv: jax.Array
    attention: Optional[KVCache] = None


class BaseConvBlock(nnx.Module):
    """Zoology's BaseConv block: ``h = x + BaseConv(LN(x))``, then ``y = h + MLP(LN(h))`` if ``mlp_dim``.

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: unused (the block has no heads); taken so that ``attnjax.nn.BLOCKS`` share a constructor.
      kernel_size: taps of the short convolution.
      mlp_dim: hidden width of a GELU MLP, ``0`` for none (zoology's MQAR models have none).
      dtype, param_dtype, rngs: for every sublayer.
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, kernel_size: int = 3, mlp_dim: int = 0,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(d_model=d_model)
        if mlp_dim < 0:
            raise ValueError(f"mlp_dim must be >= 0, got {mlp_dim}")
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.d_model = d_model
        self.norm_conv = nnx.LayerNorm(d_model, **common)
        self.conv = BaseConv(d_model, kernel_size=kernel_size, **common)
        self.norm_mlp = nnx.LayerNorm(d_model, **common) if mlp_dim else None
        self.mlp_in = nnx.Linear(d_model, mlp_dim, **common) if mlp_dim else None
        self.mlp_out = nnx.Linear(mlp_dim, d_model, **common) if mlp_dim else None

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal; ``mask``: ``None`` or ``masks.Causal()``."""
        check_input("x", x, self.d_model)
        check_causal_mask(type(self).__name__, mask)
        return self.channel_mix(self.token_mix(x))

    def token_mix(self, x: jax.Array) -> jax.Array:
        """The sequence mixers' residual sublayers (here ``x + BaseConv(LN(x))``)."""
        return x + self.conv(self.norm_conv(x))

    def channel_mix(self, h: jax.Array) -> jax.Array:
        """``h + MLP(LN(h))``, or ``h`` without an MLP."""
        if self.mlp_in is None:
            return h
        return h + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm_mlp(h))))

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> ZoologyCache:
        """The convolution's empty buffer (``BaseConv.init_cache``)."""
        return ZoologyCache(self.conv.init_cache(batch, max_len, dtype))

    def decode(self, x_t: jax.Array, cache: ZoologyCache) -> tuple[jax.Array, ZoologyCache]:
        """One step ``x_t [B, 1, d_model]``; equal, position by position, to ``self(x)``."""
        check_step("x_t", x_t, self.d_model, cache.conv.shape[0])
        a, conv = self.conv.decode(self.norm_conv(x_t), cache.conv)
        return self.channel_mix(x_t + a), ZoologyCache(conv)


class ZoologyHybridBlock(BaseConvBlock):
    """One period of Zoology's hybrid: ``h = x + BaseConv(LN(x))``, ``h = h + RoutedSparseAttention(LN(h))``,
    then ``y = h + MLP(LN(h))`` if ``mlp_dim``.

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: heads of the sparse attention.
      kernel_size: taps of the short convolution.
      block_kv, top_k: the attention's routed blocks (``RoutedSparseAttention``).
      mlp_dim: hidden width of a GELU MLP, ``0`` for none.
      rope: an ``attnjax.positional.RoPE`` for the attention, or ``None`` (the convolution carries
        position; ``None`` keeps the block means of the router position-free).
      head_dim, num_kv_heads, implementation: of the attention.
      dtype, param_dtype, rngs: for every sublayer.
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, kernel_size: int = 3, block_kv: int = 8,
                 top_k: int = 2, mlp_dim: int = 0, rope=None, head_dim: Optional[int] = None,
                 num_kv_heads: Optional[int] = None, implementation: str = "auto", dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        super().__init__(d_model, num_heads, kernel_size=kernel_size, mlp_dim=mlp_dim, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        self.norm_attention = nnx.LayerNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = RoutedSparseAttention(d_model, num_heads, block_kv=block_kv, top_k=top_k, rope=rope,
                                               head_dim=head_dim, num_kv_heads=num_kv_heads,
                                               implementation=implementation, dtype=dtype, param_dtype=param_dtype,
                                               rngs=rngs)

    def token_mix(self, x: jax.Array) -> jax.Array:
        """``h = x + BaseConv(LN(x))``, then ``h + RoutedSparseAttention(LN(h))``."""
        h = super().token_mix(x)
        return h + self.attention(self.norm_attention(h), mask=masks.Causal())

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> ZoologyCache:
        """The convolution's buffer and the attention's empty ``KVCache``."""
        return ZoologyCache(self.conv.init_cache(batch, max_len, dtype),
                            self.attention.init_cache(batch, max_len, dtype))

    def decode(self, x_t: jax.Array, cache: ZoologyCache) -> tuple[jax.Array, ZoologyCache]:
        """One step ``x_t [B, 1, d_model]``; equal, position by position, to ``self(x)``."""
        check_step("x_t", x_t, self.d_model, cache.conv.shape[0])
        a, conv = self.conv.decode(self.norm_conv(x_t), cache.conv)
        h = x_t + a
        a, kv = self.attention.decode(self.norm_attention(h), cache.attention)
        return self.channel_mix(h + a), ZoologyCache(conv, kv)


class ZoologySelectiveBlock(BaseConvBlock):
    """One period of Zoology's hybrid with the paper's learned selection: ``h = x + BaseConv(LN(x))``,
    ``h = h + SelectiveLookups(LN(h))``, then ``y = h + MLP(LN(h))`` if ``mlp_dim``.

    As zoology's ``TransformerBlock`` around ``SelectiveLookups``, whose output already holds its input
    (``LN(h) + s ⊙ attn``). Not causal (the selection reads the whole sequence): no ``init_cache``/``decode``.
    Training vs inference follows the attention's ``deterministic`` flag (``model.eval()``).

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: heads of the attention.
      kernel_size: taps of the short convolution.
      mlp_dim: hidden width of a GELU MLP, ``0`` for none.
      dropout_rate: attention dropout in training.
      rope: an ``attnjax.positional.RoPE`` for the attention, or ``None``.
      head_dim, num_kv_heads, implementation: of the attention.
      dtype, param_dtype, rngs: for every sublayer.
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, kernel_size: int = 3, mlp_dim: int = 0,
                 dropout_rate: float = 0.0, rope=None, head_dim: Optional[int] = None,
                 num_kv_heads: Optional[int] = None, implementation: str = "auto", dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        super().__init__(d_model, num_heads, kernel_size=kernel_size, mlp_dim=mlp_dim, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        self.norm_attention = nnx.LayerNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = SelectiveLookups(d_model, num_heads, dropout_rate=dropout_rate, rope=rope, head_dim=head_dim,
                                          num_kv_heads=num_kv_heads, implementation=implementation, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, not causal; ``mask``: ``None`` or ``masks.Causal()`` (of the
        convolution and the attention; the selection reads every token either way)."""
        return super().__call__(x, mask=mask)

    def token_mix(self, x: jax.Array) -> jax.Array:
        """``h = x + BaseConv(LN(x))``, then ``h + SelectiveLookups(LN(h))``."""
        h = super().token_mix(x)
        return h + self.attention(self.norm_attention(h))

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> ZoologyCache:
        """``NotImplementedError``: the block is not causal (``SelectiveLookups``)."""
        raise NotImplementedError(f"ZoologySelectiveBlock has no cache: SelectiveLookups {NOT_CAUSAL}")

    def decode(self, x_t: jax.Array, cache: ZoologyCache) -> tuple[jax.Array, ZoologyCache]:
        """``NotImplementedError``: the block is not causal (``SelectiveLookups``)."""
        raise NotImplementedError(f"ZoologySelectiveBlock does not decode: SelectiveLookups {NOT_CAUSAL}")


register_module(ModuleSpec("baseconv", BaseConvBlock, dict(d_model=8, num_heads=2, mlp_dim=16), (2, 9, 8),
                           kind="block", paper=PAPER, causal=True, decodes=True))
register_module(ModuleSpec("zoology_hybrid", ZoologyHybridBlock,
                           dict(d_model=8, num_heads=2, block_kv=2, top_k=2, mlp_dim=16), (2, 9, 8), kind="block",
                           paper=PAPER + "; routing: Lu et al. 2025 (MoBA)", causal=True, decodes=True))
register_module(ModuleSpec("base_conv", BaseConv, dict(d_model=8), (2, 9, 8), kind="layer", paper=PAPER,
                           causal=True, decodes=True))
register_module(ModuleSpec("routed_sparse", RoutedSparseAttention, dict(d_model=8, num_heads=2, block_kv=2, top_k=2),
                           (2, 9, 8), kind="layer", paper=PAPER + "; routing: Lu et al. 2025 (MoBA)", causal=True,
                           decodes=True))
register_module(ModuleSpec("zoology_selective", ZoologySelectiveBlock, dict(d_model=8, num_heads=2, mlp_dim=16),
                           (2, 9, 8), kind="block", paper=PAPER + "; official zoology/mixers/selective.py"))
register_module(ModuleSpec("selective_lookups", SelectiveLookups, dict(d_model=8, num_heads=2), (2, 9, 8), kind="layer",
                           paper=PAPER + "; official zoology/mixers/selective.py"))
"""The blocks and their layers carry the module conformance checks (init, jit, gradients, Linen bridge,
checkpoint; causality and decode == parallel for the causal ones)."""
