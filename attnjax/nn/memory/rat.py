"""The RAT layer as a Flax NNX token mixer (Wei et al., "RAT: Bridging RNN Efficiency and Attention Accuracy via
Chunk-based Sequence Modeling", arXiv:2507.04416, 2025).

``y = W_o (z ⊙ RAT(q, k, v, g))`` with ``z = σ(x W_z)`` the output gate, ``g = σ(x W_g + b_g)`` the forget gate
of the intra-chunk recurrence and ``RAT`` the functional core ``attnjax.memory.rat`` (the paper's
equations: intra-chunk RNN, inter-chunk attention, output gate). The parametrization follows the official
layer (github.com/CLAIRE-Labo/RAT, ``src/model/backbone/rat/rat.py``): q and k are projected to
``num_qk_heads`` groups (``ngroups`` there, 2 in the official configs) that the ``num_heads`` value/gate heads
share; ``g`` and ``z`` are per head and channel; ``b_g`` starts at ``log u``, ``u ~ U(1, L − 1)`` (so ``g``
starts in ``[1/2, (L − 1)/L]``); no biases elsewhere; optional RoPE at the chunk index (``InterRoPE``).
Left to the surrounding block, as for every ``attnjax.nn`` layer: the official layer's input RMSNorm and
residual connection. The projections use flax's default initialization (the official code: normal(0.02)).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.dispatch import dispatch
from attnjax.memory.rat import RATCache, rat, rat_init_cache, rat_reference, rat_step
from attnjax.nn.checks import check_causal_mask, check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional import RoPE

PATHS = {"reference": rat_reference, "xla": rat}
"""Implementations of the parallel call: "reference" (per-token recurrence, dense masked ``[T, T]`` softmax)
and "xla" (scan within chunks, blocked attention over the chunk states; what "auto" picks)."""


class RAT(nnx.Module):
    """RAT: gated recurrence within chunks of ``chunk_size`` tokens, softmax attention over the chunk states.

    Example::

      layer = RAT(64, 4, chunk_size=16, num_qk_heads=2, rope=RoPE(), rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())             # x, y: [B, T, 64]; causal by construction
      cache = layer.init_cache(B, max_len)          # ⌈max_len / 16⌉ state slots per head: O(T/L)
      y_t, cache = layer.decode(x_t, cache)         # x_t, y_t: [B, 1, 64]

    ``__call__``, ``init_cache`` and ``decode`` take ``MultiHeadAttention``'s arguments.

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: value / gate / state heads ``H``.
      chunk_size: ``L`` (16 in the paper's headline numbers); ``L = 1`` is softmax attention over gated
        tokens, ``L ≥ T`` a gated RNN.
      num_qk_heads: query/key groups (default ``num_heads``: no sharing); must divide ``num_heads``; head
        ``h`` reads group ``h // (num_heads // num_qk_heads)``.
      head_dim: features per head ``D`` (default ``d_model // num_heads``).
      rope: RoPE applied to q and the key states at their chunk index (official ``InterRoPE``), or None.
      implementation: "auto", or a name in ``PATHS``.
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the projections and the gate bias.
    """

    def __init__(self, d_model: int, num_heads: int, *, chunk_size: int = 16, num_qk_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, rope: Optional[RoPE] = None, implementation: str = "auto",
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        num_qk_heads = num_heads if num_qk_heads is None else num_qk_heads
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(chunk_size=chunk_size, num_qk_heads=num_qk_heads)
        if num_heads % num_qk_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_qk_heads ({num_qk_heads})")
        if rope is not None:
            if not isinstance(rope, RoPE):
                raise TypeError(f"rope must be an attnjax.positional.RoPE or None, got {type(rope).__name__}")
            rope.frequencies(head_dim)
        if implementation != "auto" and implementation not in PATHS:
            raise ValueError(f"RAT implementation must be 'auto' or one of {tuple(PATHS)}, got {implementation!r}")
        self.d_model, self.num_heads, self.num_qk_heads, self.head_dim = d_model, num_heads, num_qk_heads, head_dim
        self.chunk_size, self.rope, self.implementation = chunk_size, rope, implementation
        self.dtype, self.param_dtype = dtype, param_dtype

        def linear(in_features, out_features, axis=-1):
            return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=False, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

        self.query = linear(d_model, (num_qk_heads, head_dim))
        self.key = linear(d_model, (num_qk_heads, head_dim))
        self.value = linear(d_model, (num_heads, head_dim))
        self.forget_gate = linear(d_model, (num_heads, head_dim))
        self.output_gate = linear(d_model, (num_heads, head_dim))
        self.out = linear((num_heads, head_dim), d_model, axis=(-2, -1))
        u = jax.random.uniform(rngs.params(), (num_heads, head_dim), jnp.float32, 1.0, max(chunk_size - 1, 1))
        self.forget_bias = nnx.Param(jnp.log(u).astype(param_dtype))

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
        """``x [B, T, d_model]`` -> ``(q, k, v, g, z)``, each ``[B, T, H, D]``: q and k shared by head groups,
        ``g = σ(x W_g + b_g)`` in float32, ``z = σ(x W_z)``."""
        groups = self.num_heads // self.num_qk_heads
        q = jnp.repeat(self.query(x), groups, axis=2)
        k = jnp.repeat(self.key(x), groups, axis=2)
        g = jax.nn.sigmoid(self.forget_gate(x).astype(jnp.float32) + self.forget_bias[...].astype(jnp.float32))
        return q, k, self.value(x), g, jax.nn.sigmoid(self.output_gate(x))

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``; output ``t`` depends on tokens ``0..t`` only.

        ``mask``: ``None`` or ``masks.Causal()`` (the same, causal, result); any other mask raises
        ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("RAT", mask)
        q, k, v, g, z = self.project(x)
        y = dispatch(PATHS, self.implementation, q, k, v, g, chunk_size=self.chunk_size, rope=self.rope, what="RAT")
        return self.out(z * y)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> RATCache:
        """An empty ``RATCache``: ``⌈max_len / L⌉`` chunk slots ``[batch, ·, H, D]`` for keys and values and the
        running states, in ``dtype`` (default the module's ``dtype``, else ``param_dtype``), length 0."""
        check_positive(batch=batch, max_len=max_len)
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        return rat_init_cache(batch, max_len, chunk_size=self.chunk_size, num_kv_heads=self.num_heads,
                              head_dim=self.head_dim, dtype=dtype)

    def decode(self, x_t: jax.Array, cache: RATCache) -> tuple[jax.Array, RATCache]:
        """One step (``attnjax.memory.rat.rat_step``): equal, position by position, to ``self(x)``.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: a ``RATCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        q, k, v, g, z = self.project(x_t)
        y, cache = rat_step(q, k, v, g, cache, chunk_size=self.chunk_size, rope=self.rope)
        return self.out(z * y), cache


register_module(ModuleSpec(
    "rat", RAT, dict(d_model=16, num_heads=4, chunk_size=4, num_qk_heads=2, rope=RoPE(base=100.0)), (2, 9, 16),
    kind="layer", paper="Wei et al. 2025 (RAT: Bridging RNN Efficiency and Attention Accuracy via Chunk-based "
                        "Sequence Modeling)", causal=True, decodes=True))
