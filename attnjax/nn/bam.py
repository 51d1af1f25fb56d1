"""BAM's mixture of attention experts as a Flax NNX module, and upcycling from dense attention.

Zhang et al., "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts"
(NeurIPS 2024): ``y_t = Σ_e g_e(x_t) · MHA_e(x)_t`` with ``E`` full attention experts (own Q/K/V/O) or,
with ``shared_kv=True``, experts that share one K/V projection (one KV cache). ``g = softmax(x W_r)``
(soft routing, BAM's choice) or its top-k renormalized (``top_k``). ``upcycle_attention`` builds the
experts from dense ``MultiHeadAttention`` layers (BAM's "branch" models), so a layer upcycled from one
dense model computes exactly that model at initialization. The math is ``attnjax.heads.bam``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.heads.bam import (bam_attention, bam_attention_reference, bam_attention_routed, load_balancing_loss,
                               router_z_loss, top_k_gates)
from attnjax.nn.attention import KVCache, MultiHeadAttention
from attnjax.nn.checks import check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional import RoPE

IMPLEMENTATIONS = ("auto", "reference")
""""reference": ``bam_attention_reference`` (expert by expert); "auto": ``bam_attention_routed`` for
top-k routing with shared K/V, else ``bam_attention`` (all experts in one call)."""


class BAMAttention(nnx.Module):
    """A mixture of ``num_experts`` multi-head attention experts with a soft (or top-k) router.

    ``y = Σ_e g_e (concat_h attention(x W_q^{e,h}, x W_k^{e,h}, x W_v^{e,h}) W_o^e + b_o^e)`` with
    ``g = softmax(x W_r)`` (``top_k=None``, BAM's soft routing) or the top-k probabilities renormalized
    (``attnjax.heads.bam.top_k_gates``). ``shared_kv=True``: every expert reads one ``W_k, W_v`` (BAM's
    KV-sharing variant). GQA within each expert, optional RoPE. ``router_losses`` gives the router's
    auxiliary losses; ``upcycle_attention`` initializes the experts from dense layers.

    Example::

      layer = BAMAttention(64, 4, num_experts=4, shared_kv=True, rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())                   # x, y: [B, T, 64]
      aux = layer.router_losses(x)                        # {"load_balancing": ..., "z": ...}
      cache = layer.init_cache(B, max_len); y_t, cache = layer.decode(x_t, cache)

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: query heads per expert ``H``.
      num_experts: attention experts ``E``.
      num_kv_heads: key/value heads per expert (default ``num_heads``); must divide ``num_heads``.
      head_dim: features per head (default ``d_model // num_heads``).
      shared_kv: one K/V projection for all experts.
      top_k: experts per token (``None``: all, soft routing).
      qkv_bias, out_bias: biases of the q/k/v projections and of each expert's output projection.
      rope: rotary embedding of q and k (all experts), or ``None``.
      implementation: "auto" or "reference" (see ``IMPLEMENTATIONS``).
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the projections and the router.
    """

    def __init__(self, d_model: int, num_heads: int, num_experts: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, shared_kv: bool = False, top_k: Optional[int] = None,
                 qkv_bias: bool = False, out_bias: bool = False, rope: Optional[RoPE] = None,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(num_experts=num_experts, num_kv_heads=num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if top_k is not None:
            check_positive(top_k=top_k)
            if top_k > num_experts:
                raise ValueError(f"top_k ({top_k}) must be at most num_experts ({num_experts})")
        if rope is not None:
            if not isinstance(rope, RoPE):
                raise TypeError(f"rope must be an attnjax.positional.RoPE or None, got {type(rope).__name__}")
            rope.frequencies(head_dim)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"BAMAttention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.d_model, self.num_heads, self.num_experts = d_model, num_heads, num_experts
        self.num_kv_heads, self.head_dim, self.shared_kv, self.top_k = num_kv_heads, head_dim, shared_kv, top_k
        self.rope, self.implementation = rope, implementation
        self.dtype, self.param_dtype = dtype, param_dtype

        def linear(out_features, use_bias=qkv_bias):
            return nnx.LinearGeneral(d_model, out_features, use_bias=use_bias, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

        kv_features = (num_kv_heads, head_dim) if shared_kv else (num_experts, num_kv_heads, head_dim)
        self.router = nnx.Linear(d_model, num_experts, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
        self.query = linear((num_experts, num_heads, head_dim))
        self.key, self.value = linear(kv_features), linear(kv_features)
        init = nnx.initializers.lecun_normal(in_axis=(1, 2), out_axis=3, batch_axis=(0,))
        self.out_kernel = nnx.Param(init(rngs.params(), (num_experts, num_heads, head_dim, d_model), param_dtype))
        self.out_bias = nnx.Param(jnp.zeros((num_experts, d_model), param_dtype)) if out_bias else None

    def router_gates(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``(logits, gates, indices, probs)`` of the router on ``x [B, T, d_model]``: ``[B, T, E]`` logits,
        gates and probabilities, ``[B, T, k]`` routed experts (``top_k_gates``)."""
        logits = self.router(x)
        gates, indices, probs = top_k_gates(logits, self.top_k)
        return logits, gates, indices, probs

    def router_losses(self, x: jax.Array) -> dict[str, jax.Array]:
        """The router's auxiliary losses on ``x [B, T, d_model]`` (float32 scalars), to add to the task loss.

        ``"load_balancing"``: ``E · Σ_e f_e P_e`` (Switch Transformer eq. 4-6; constant 1 under soft
        routing, where every expert is selected); ``"z"``: ``mean (log Σ_e exp z_e)²`` (ST-MoE eq. 5).
        """
        check_input("x", x, self.d_model)
        logits, gates, _, probs = self.router_gates(x)
        return {"load_balancing": load_balancing_loss(probs, gates > 0), "z": router_z_loss(logits)}

    def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``q [B, T, E, H, D]``, ``k, v [B, T, Ekv, Hkv, D]`` (RoPE applied at ``positions``)."""
        B, T, _ = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.shared_kv:
            k, v = k[:, :, None], v[:, :, None]
        if self.rope is not None:
            q = self.rope(q.reshape(B, T, -1, self.head_dim), positions).reshape(q.shape)
            k = self.rope(k.reshape(B, T, -1, self.head_dim), positions).reshape(k.shape)
        return q, k, v

    def _mix(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[masks.Mask]) -> jax.Array:
        _, gates, indices, _ = self.router_gates(x)
        w_o = self.out_kernel[...]
        b_o = None if self.out_bias is None else self.out_bias[...]
        if self.dtype is not None:
            w_o = w_o.astype(self.dtype)
            b_o = None if b_o is None else b_o.astype(self.dtype)
        if self.implementation == "reference":
            return bam_attention_reference(q, k, v, gates, w_o, b_o, mask=mask)
        if self.top_k is not None and self.shared_kv:
            weights = jnp.take_along_axis(gates, indices, axis=-1)
            return bam_attention_routed(q, k, v, indices, weights, w_o, b_o, mask=mask)
        return bam_attention(q, k, v, gates, w_o, b_o, mask=mask)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None,
                 positions: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``.

        ``mask``: an ``attnjax.masks`` value the same for every head (e.g. ``masks.Causal()``);
        ``positions``: int ``[B, T]`` or ``[T]`` RoPE positions (default ``arange(T)``).
        """
        check_input("x", x, self.d_model)
        if positions is None:
            positions = jnp.arange(x.shape[1])
        q, k, v = self._project(x, positions)
        return self._mix(x, q, k, v, mask)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> KVCache:
        """An empty ``KVCache``: zeros ``[batch, max_len, Ekv·Hkv, D]`` (``Ekv = 1`` with shared K/V) and
        length 0; ``dtype`` defaults to ``dtype``, else ``param_dtype``."""
        check_positive(batch=batch, max_len=max_len)
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        kv_experts = 1 if self.shared_kv else self.num_experts
        shape = (batch, max_len, kv_experts * self.num_kv_heads, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One step at position ``cache.length``: equal, position by position, to ``self(x, mask=masks.Causal())``.

        Args:
          x_t: ``[B, 1, d_model]``; cache: a ``KVCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)`` with the token's keys and values written at ``cache.length``.
        """
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        dtype = cache.k.dtype
        q, k, v = (a.astype(dtype) for a in self._project(x_t, cache.length[None]))
        B, L = cache.k.shape[:2]
        start = (0, cache.length, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k.reshape(B, 1, -1, self.head_dim), start)
        v_all = jax.lax.dynamic_update_slice(cache.v, v.reshape(B, 1, -1, self.head_dim), start)
        filled = masks.Explicit((jnp.arange(L) <= cache.length)[None, None, None, :])
        kv_shape = (B, L) + k.shape[2:]
        y = self._mix(x_t, q, k_all.reshape(kv_shape), v_all.reshape(kv_shape), filled)
        return y, KVCache(k_all, v_all, cache.length + 1)


def upcycle_attention(dense: Union[MultiHeadAttention, Sequence[MultiHeadAttention]],
                      num_experts: Optional[int] = None, *, shared_kv: bool = False, top_k: Optional[int] = None,
                      implementation: str = "auto", rngs: nnx.Rngs) -> BAMAttention:
    """A ``BAMAttention`` whose experts are copies of dense attention layers (BAM's upcycling).

    Expert ``e`` takes ``W_q, W_o`` (and biases) of ``dense[e]``; its ``W_k, W_v`` too, or with
    ``shared_kv`` the mean of all the dense layers' (BAM averages the parameters it does not upcycle
    into experts). The router is freshly initialized from ``rngs``. From one dense layer copied
    ``num_experts`` times, every expert equals it and the gates sum to 1, so the upcycled layer's
    output equals the dense layer's.

    Args:
      dense: one ``MultiHeadAttention`` (copied ``num_experts`` times) or one per expert, all of one
        configuration: self-attention (``context_dim == d_model``), mechanism "softmax", no dropout,
        no sequence parallelism.
      num_experts: required with one dense layer; with a sequence it must be ``None`` or its length.
      shared_kv, top_k, implementation: as ``BAMAttention``.
      rngs: ``params`` initializes the router.
    Returns:
      the upcycled ``BAMAttention`` (the dense layers' ``rope``, biases, dtypes).
    """
    if isinstance(dense, MultiHeadAttention):
        if num_experts is None:
            raise ValueError("num_experts is required to upcycle a single MultiHeadAttention")
        check_positive(num_experts=num_experts)
        layers = [dense] * num_experts
    else:
        layers = list(dense)
        if not layers or not all(isinstance(m, MultiHeadAttention) for m in layers):
            raise TypeError("dense must be a MultiHeadAttention or a non-empty sequence of them, got "
                            f"{[type(m).__name__ for m in layers]}")
        if num_experts not in (None, len(layers)):
            raise ValueError(f"num_experts ({num_experts}) must be None or the number of dense layers ({len(layers)})")
    first = layers[0]

    def config(m):
        return (m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.context_dim, m.rope, m.query.bias is not None,
                m.out.bias is not None, m.dtype, m.param_dtype)

    if any(config(m) != config(first) for m in layers):
        raise ValueError("all dense layers must share one configuration (d_model, heads, kv heads, head_dim, "
                         "context_dim, rope, biases, dtypes)")
    for m in layers:
        if m.mechanism.name != "softmax" or m.dropout_rate > 0 or m.sequence_parallel is not None:
            raise NotImplementedError("upcycle_attention takes softmax MultiHeadAttention without dropout or "
                                      f"sequence parallelism; got mechanism {m.mechanism.name!r}, dropout "
                                      f"{m.dropout_rate}, sequence_parallel {m.sequence_parallel}")
    if first.context_dim != first.d_model:
        raise NotImplementedError("upcycle_attention takes self-attention layers (context_dim == d_model), got "
                                  f"context_dim={first.context_dim}, d_model={first.d_model}")
    bam = BAMAttention(first.d_model, first.num_heads, len(layers), num_kv_heads=first.num_kv_heads,
                       head_dim=first.head_dim, shared_kv=shared_kv, top_k=top_k,
                       qkv_bias=first.query.bias is not None, out_bias=first.out.bias is not None, rope=first.rope,
                       implementation=implementation, dtype=first.dtype, param_dtype=first.param_dtype, rngs=rngs)

    def stacked(get, axis):
        return jnp.stack([get(m)[...] for m in layers], axis=axis)

    bam.query.kernel[...] = stacked(lambda m: m.query.kernel, 1)
    bam.out_kernel[...] = stacked(lambda m: m.out.kernel, 0)
    for name in ("key", "value"):
        kernel = stacked(lambda m: getattr(m, name).kernel, 1)
        getattr(bam, name).kernel[...] = jnp.mean(kernel, axis=1) if shared_kv else kernel
    if first.query.bias is not None:
        bam.query.bias[...] = stacked(lambda m: m.query.bias, 0)
        for name in ("key", "value"):
            bias = stacked(lambda m: getattr(m, name).bias, 0)
            getattr(bam, name).bias[...] = jnp.mean(bias, axis=0) if shared_kv else bias
    if first.out.bias is not None:
        bam.out_bias[...] = stacked(lambda m: m.out.bias, 0)
    return bam


register_module(ModuleSpec(
    "bam", BAMAttention, dict(d_model=16, num_heads=2, num_experts=3, num_kv_heads=1, rope=RoPE(base=100.0)),
    (2, 9, 16), kind="layer", paper="Zhang et al. 2024 (BAM! Just Like That: parameter upcycling for MoE)",
    causal=True, decodes=True))
register_module(ModuleSpec(
    "bam_shared_kv_top2", BAMAttention, dict(d_model=16, num_heads=2, num_experts=3, shared_kv=True, top_k=2,
                                             out_bias=True),
    (2, 9, 16), kind="layer", paper="Zhang et al. 2024 (BAM, KV sharing); Zhang et al. 2022 (MoA, top-k routing)",
    causal=True, decodes=True))
