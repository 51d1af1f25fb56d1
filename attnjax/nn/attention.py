"""Multi-head attention as a Flax NNX module over ``attnjax.attention``.

The module owns the projections and the dropout stream; the math is the functional core:
``y = concat_h(attention(x W_q^h, c W_k^h, c W_v^h)) W_o`` (Vaswani et al., "Attention Is All You
Need", 2017), with grouped-query attention when ``num_kv_heads < num_heads`` (Ainslie et al.,
"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints", 2023), and
K and V with their own head counts and head dims (DiffQKV, Lin et al. 2025, "Sigma: Differential
Rescaling of Query, Key and Value for Efficient Language Models", Fig. 3).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import Dtype

from attnjax import masks, parallel, registry
from attnjax.api import attention
from attnjax.dispatch import check_implementation
from attnjax.linear import (KernelizedRPE, kernelized_rpe_attention_reference, linear_attention,
                            linear_attention_step)
from attnjax.linear.kernelized_rpe import rule_rpe_bias
from attnjax.linear.mechanism import LinearMechanism
from attnjax.nn.capture import refuse_capture, sow_attention_inputs
from attnjax.nn.checks import check_chunk, check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.parallel import layouts, sharding
from attnjax.positional import RoPE
from attnjax.relative.urpe import URPE
from attnjax.softmax import Selective, Simplicial, Softmax, Softplus, StickBreaking, selective_attention
from attnjax.sparse import StaticSelector
from pallas_kernels.paged_attention import common as paged_common


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class KVCache:
    """Keys and values of the tokens decoded so far, for ``MultiHeadAttention.decode``.

    Attributes:
      k: ``[B, max_len, Hk, D]`` keys (RoPE already applied); slots ``>= length`` are unused.
      v: ``[B, max_len, Hv, Dv]`` values; ``Hv``, ``Dv`` may differ from ``Hk``, ``D`` (DiffQKV), so
        the cache holds ``B·max_len·(Hk·D + Hv·Dv)`` elements.
      length: int32 scalar, the number of filled slots, i.e. the position of the next token.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @classmethod
    def empty(cls, batch: int, max_len: int, heads: int, head_dim: int, dtype: Dtype,
              v_heads: Optional[int] = None, v_head_dim: Optional[int] = None) -> "KVCache":
        """Zero keys ``[batch, max_len, heads, head_dim]`` and values ``[batch, max_len, v_heads, v_head_dim]``
        (default: the keys' heads and dim), length 0."""
        check_positive(batch=batch, max_len=max_len)
        v_shape = (batch, max_len, heads if v_heads is None else v_heads, head_dim if v_head_dim is None else v_head_dim)
        return cls(jnp.zeros((batch, max_len, heads, head_dim), dtype), jnp.zeros(v_shape, dtype),
                   jnp.zeros((), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class LinearCache:
    """Recurrent state of a linear-attention layer, for ``decode``.

    Attributes:
      state: ``[B, H, Dk', Dv]`` (``Dv + 1`` with a normalizer column; float32 unless ``init_cache``
        was given a ``dtype``), the (decayed) sum of ``φ(k_t)ᵀ v_t`` so far.
      length: int32 scalar, the number of tokens decoded so far, i.e. the position of the next token.
    """

    state: jax.Array
    length: jax.Array


DECODE_PATHS = {
    "softmax": "the KV cache restricted to the filled slots (without a position bias: an online softmax over "
               "blocks of the filled slots, read in place)",
    "filled": "the KV cache restricted to the filled slots (position-free scores)",
    "selective": "the KV cache restricted to the filled slots, the query temperature at the token's position",
    "right_aligned": "the KV cache rolled so the filled slots end at the query (relative positions kept), "
                     "Causal() & Explicit(filled) (simplicial_2: a key pair needs both keys filled); "
                     "kernelized_rpe with b = -inf on the empty slots",
    "block_pattern": "softmax over the cached keys in the selector's key blocks for the token's query block",
    "linear": "a LinearCache state, S <- lambda S + phi(k_t)^T v_t",
}
"""How ``MultiHeadAttention.decode`` serves each kind of mechanism (``decode_path``)."""


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """Run a module's softmax attention sequence-parallel over the mesh axis ``axis``.

    The tokens of ``x`` are sharded over ``axis`` in ``layout`` order (``parallel.to_layout``;
    "contiguous" is the natural order). Two ways to run a model with it, no model code changes:

    - inside ``jax.shard_map`` over a mesh with ``axis`` (the model sees its local ``[B, T/W, d]``
      shard): attention calls the per-device ``scheme`` on ``axis`` directly;
    - on global arrays, under ``jax.set_mesh(mesh)`` or with ``mesh=`` given: the projections run
      on global arrays and attention is wrapped in ``shard_map`` (sequence over ``axis``, batch over
      ``batch_axis``, heads over ``head_axis``).

    In both, RoPE positions default to the global positions of the tokens under ``layout``.

    Attributes:
      axis: mesh axis name that shards the sequence.
      layout: "contiguous", "zigzag" or "striped" (``attnjax.parallel.layouts``).
      scheme: "ring" (default), "allgather" or "ulysses" (``attnjax.parallel.SCHEMES``).
      mesh: mesh for the global-array mode (default: the one set by ``jax.set_mesh``).
      batch_axis, head_axis: mesh axes sharding batch and heads in the global-array mode.
    """

    axis: str
    layout: str = "contiguous"
    scheme: str = "ring"
    mesh: Any = None
    batch_axis: Any = None
    head_axis: Any = None

    def __post_init__(self):
        if not isinstance(self.axis, str):
            raise TypeError(f"SequenceParallel.axis must be a mesh axis name (str), got {self.axis!r}")
        layouts.check_layout(self.layout, 1)
        if self.scheme not in parallel.SCHEMES:
            raise ValueError(f"unknown sequence-parallel scheme {self.scheme!r}; expected one of "
                             f"{tuple(parallel.SCHEMES)}")

    @classmethod
    def coerce(cls, value) -> Optional["SequenceParallel"]:
        """``None``, a ``SequenceParallel``, an axis name, or a tuple ``(axis, layout[, scheme])``."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, tuple) and 1 <= len(value) <= 3:
            return cls(*value)
        raise TypeError("sequence_parallel must be None, a SequenceParallel, a mesh axis name or a tuple "
                        f"(axis, layout[, scheme]), got {value!r}")

    def _mesh(self):
        """The mesh of the global-array mode; ValueError if there is none with ``axis``."""
        mesh = self.mesh if self.mesh is not None else sharding.ambient_mesh()
        if mesh is None or self.axis not in tuple(mesh.axis_names):
            found = None if mesh is None else tuple(mesh.axis_names)
            raise ValueError(
                f"sequence_parallel axis {self.axis!r} is not bound: call the module inside jax.shard_map over "
                f"a mesh with that axis, under jax.set_mesh(mesh), or give SequenceParallel(mesh=...) "
                f"(mesh axes found: {found})")
        return mesh

    def positions(self, length: int) -> jax.Array:
        """Global positions of ``length`` tokens of ``x`` (local in ``shard_map``, else global)."""
        if sharding.is_manual_axis(self.axis):
            world = sharding.axis_size(self.axis)
            return layouts.local_positions(self.layout, world, jax.lax.axis_index(self.axis), length)
        return jnp.asarray(layouts.permutation(self.layout, self._mesh().shape[self.axis], length))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, **kwargs) -> jax.Array:
        """The scheme's attention of ``q [B, T, Hq, D]`` over ``k``, ``v`` (local or global arrays)."""
        if sharding.is_manual_axis(self.axis):
            return parallel.SCHEMES[self.scheme](q, k, v, axis_name=self.axis, layout=self.layout, **kwargs)
        return parallel.SHARDED[self.scheme](q, k, v, mesh=self._mesh(), seq_axis=self.axis, layout=self.layout,
                                             batch_axis=self.batch_axis, head_axis=self.head_axis, **kwargs)


def attention_projections(
    d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *, context_dim: Optional[int] = None,
    num_v_heads: Optional[int] = None, v_head_dim: Optional[int] = None, qkv_bias: bool = False,
    out_bias: bool = False, kernel_init: Optional[Callable] = None, dtype: Optional[Dtype] = None,
    param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs,
) -> tuple[nnx.LinearGeneral, nnx.LinearGeneral, nnx.LinearGeneral, nnx.LinearGeneral]:
    """Multi-head attention's projections ``(query, key, value, out)`` as ``nnx.LinearGeneral``.

    ``query: d_model -> [Hq, D]``, ``key: context_dim -> [Hk, D]``, ``value: context_dim -> [Hv, Dv]`` (with
    ``qkv_bias``), ``out: [Hq, Dv] -> d_model`` (with ``out_bias``); ``context_dim`` defaults to ``d_model``,
    ``Hv`` to ``Hk``, ``Dv`` to ``D``, ``kernel_init`` to flax's default. Every layer that owns these four
    projections builds them here, so their parameter names and layouts match ``MultiHeadAttention``'s.
    """
    context_dim = d_model if context_dim is None else context_dim
    num_v_heads = num_kv_heads if num_v_heads is None else num_v_heads
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    init = {} if kernel_init is None else {"kernel_init": kernel_init}

    def linear(in_features, out_features, axis=-1, use_bias=qkv_bias):
        return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=use_bias, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs, **init)

    return (linear(d_model, (num_heads, head_dim)), linear(context_dim, (num_kv_heads, head_dim)),
            linear(context_dim, (num_v_heads, v_head_dim)),
            linear((num_heads, v_head_dim), d_model, axis=(-2, -1), use_bias=out_bias))


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with GQA/MQA, optional RoPE, any registered mechanism, and a KV cache.

    ``y = concat_h(attention(x W_q^h, c W_k^h, c W_v^h)) W_o`` with ``c = x`` (self-attention) or
    ``c = context`` (cross-attention); Vaswani et al. 2017. Query head ``h`` reads K head
    ``h // (num_heads // num_kv_heads)`` (GQA, Ainslie et al. 2023; MQA when ``num_kv_heads=1``) and
    V head ``h // (num_heads // num_v_heads)``: with ``num_v_heads != num_kv_heads`` K and V are
    compressed differently (DiffQKV, Lin et al. 2025, "Sigma", Fig. 3; the mechanism must support
    "kv_heads"), and the ``KVCache`` holds each with its own head count and head dim.

    Dropout on the attention weights draws keys from the ``dropout`` stream of ``rngs``. As with
    ``nnx.Dropout``, it is on by default and off after ``model.eval()``,
    ``nnx.view(model, deterministic=True)`` or with ``deterministic=True`` at call time.

    Example::

      layer = MultiHeadAttention(64, 8, num_kv_heads=2, rope=RoPE(), rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())                     # x, y: [B, T, 64]
      cache = layer.init_cache(B, max_len)
      y_t, cache = layer.decode(x_t, cache)                 # x_t, y_t: [B, 1, 64]

    Sigma's DiffQKV attention (Lin et al. 2025, Fig. 3; the registered layer "sigma"): K compressed
    more than V (1 K head, 2 V heads) and augmented Q (query heads of 16 features, ``8·16 > 64``,
    against 8-feature value heads). K shares the query head dim, since the logits are ``q·kᵀ``; the
    cache holds ``max_len·(1·16 + 2·8)`` features per sequence::

      layer = MultiHeadAttention(64, 8, num_kv_heads=1, num_v_heads=2, head_dim=16, v_head_dim=8,
                                 rope=RoPE(), rngs=nnx.Rngs(0))

    Sequence parallelism (ring attention over mesh axis "sp" with W devices, zigzag layout)::

      layer = MultiHeadAttention(64, 8, sequence_parallel=("sp", "zigzag"), rngs=nnx.Rngs(0))
      with jax.set_mesh(mesh):                              # or call the model inside jax.shard_map
          y = layer(parallel.to_layout(x, "zigzag", W), mask=masks.Causal())   # y in zigzag order

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: query heads ``Hq``.
      num_kv_heads: key heads ``Hk`` (and value heads, unless ``num_v_heads`` is given; default
        ``num_heads``); must divide ``num_heads``.
      num_v_heads: value heads ``Hv`` (default ``num_kv_heads``); must divide ``num_heads``.
      head_dim: features per query/key head ``D`` (default ``d_model // num_heads``).
      v_head_dim: features per value head ``Dv`` (default ``head_dim``); the output projection reads
        ``num_heads·Dv`` features.
      context_dim: features of ``context`` in cross-attention (default ``d_model``).
      qkv_bias: add a bias to the q/k/v projections.
      out_bias: add a bias to the output projection (flax's ``use_bias=True`` has both).
      rope: rotary embedding applied to q and k in self-attention and decoding; ``None`` for none.
      position_bias: ``None``, or a factory ``(num_heads, rngs=rngs) -> module`` whose call
        ``module(query_offset=None)`` returns an ``attnjax.bias.Bias`` rule for self-attention and
        decoding, e.g. ``functools.partial(T5RelativeBias, bidirectional=False)`` (T5's learned relative
        bias; the mechanism must support "bias"). Cross-attention adds none, as in T5.
      mechanism: a registry name or config object, passed to ``attnjax.attention``. Checked here:
        an unknown name raises ``ValueError`` (with the registered names); a mechanism without the
        ``supports`` this configuration needs ("gqa" when ``num_kv_heads < num_heads`` or
        ``num_v_heads < num_heads``, "kv_heads" when ``num_v_heads != num_kv_heads``, "dropout" when
        ``dropout_rate > 0``) or without the named ``implementation`` raises ``NotImplementedError``.
      dropout_rate: attention-weight dropout probability, in ``[0, 1)``.
      implementation: "auto", "reference", "xla" or "pallas", passed to ``attnjax.attention``.
      sequence_parallel: ``None``, or a ``SequenceParallel`` (or its shorthand ``("sp", "zigzag")``)
        to run self-attention sequence-parallel (ring attention by default) over that mesh axis;
        softmax mechanism only, no attention dropout, separate K and V head counts with "ring" only;
        ``decode`` is unaffected.
      dtype: computation dtype of the projections (default: inferred from inputs and params).
      param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the projections; ``dropout`` (or ``default``) seeds dropout.
    """

    def __init__(
        self, d_model: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
        num_v_heads: Optional[int] = None, head_dim: Optional[int] = None, v_head_dim: Optional[int] = None,
        context_dim: Optional[int] = None, qkv_bias: bool = False,
        out_bias: bool = False, rope: Optional[RoPE] = None,
        position_bias: Optional[Callable[..., nnx.Module]] = None, mechanism: Union[str, registry.Mechanism] = "softmax",
        dropout_rate: float = 0.0, implementation: str = "auto",
        sequence_parallel: Union[None, str, tuple, SequenceParallel] = None, dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        num_v_heads = num_kv_heads if num_v_heads is None else num_v_heads
        context_dim = d_model if context_dim is None else context_dim
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        check_positive(num_kv_heads=num_kv_heads, num_v_heads=num_v_heads, v_head_dim=v_head_dim,
                       context_dim=context_dim)
        for name, heads in (("num_kv_heads", num_kv_heads), ("num_v_heads", num_v_heads)):
            if num_heads % heads:
                raise ValueError(f"num_heads ({num_heads}) must be a multiple of {name} ({heads})")
        if rope is not None:
            if not isinstance(rope, RoPE):
                raise TypeError(f"rope must be an attnjax.positional.RoPE or None, got {type(rope).__name__}")
            rope.frequencies(head_dim)  # raises ValueError if rotary_dim doesn't fit head_dim
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        check_implementation(implementation)

        self.d_model, self.num_heads = d_model, num_heads
        self.num_kv_heads, self.num_v_heads = num_kv_heads, num_v_heads
        self.head_dim, self.v_head_dim, self.context_dim = head_dim, v_head_dim, context_dim
        self.rope = rope
        self.mechanism = registry.resolve(mechanism)
        if implementation != "auto" and implementation not in self.mechanism.implementations():
            raise NotImplementedError(f"mechanism {self.mechanism.name!r} has no {implementation!r} implementation; "
                                      f"available: {list(self.mechanism.implementations())}")
        self.require_support(*(option for option, used in (
            ("gqa", num_kv_heads != num_heads or num_v_heads != num_heads),
            ("kv_heads", num_v_heads != num_kv_heads), ("dropout", dropout_rate > 0),
            ("bias", position_bias is not None)) if used))
        self.sequence_parallel = SequenceParallel.coerce(sequence_parallel)
        if self.sequence_parallel is not None:
            if self.mechanism.name != "softmax":
                raise NotImplementedError(f"sequence_parallel runs softmax attention; mechanism "
                                          f"{self.mechanism.name!r} has no sequence-parallel path here")
            if num_v_heads != num_kv_heads and self.sequence_parallel.scheme != "ring":
                raise NotImplementedError(f"sequence_parallel scheme {self.sequence_parallel.scheme!r} takes one "
                                          "K/V head count; num_v_heads != num_kv_heads runs with scheme 'ring'")
            if dropout_rate > 0:
                raise NotImplementedError("sequence_parallel attention has no attention dropout; use dropout_rate=0")
            if position_bias is not None:
                raise NotImplementedError("sequence_parallel attention takes no position_bias rule")
        self.dropout_rate = dropout_rate
        self.implementation = implementation
        self.dtype, self.param_dtype = dtype, param_dtype
        self.deterministic = False

        self.query, self.key, self.value, self.out = attention_projections(
            d_model, num_heads, num_kv_heads, head_dim, context_dim=context_dim, num_v_heads=num_v_heads,
            v_head_dim=v_head_dim, qkv_bias=qkv_bias, out_bias=out_bias, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs)
        self.position_bias = None if position_bias is None else position_bias(num_heads, rngs=rngs)
        self.rngs = rngs.dropout.fork() if dropout_rate > 0 else None

    def __call__(
        self, x: jax.Array, context: Optional[jax.Array] = None, *, mask: Optional[masks.Mask] = None,
        positions: Optional[jax.Array] = None, deterministic: Optional[bool] = None,
    ) -> jax.Array:
        """Self-attention of ``x`` (``context=None``) or cross-attention from ``x`` to ``context``.

        The call every layer in ``attnjax.nn`` shares: ``layer(x, mask=masks.Causal())`` is the
        parallel form of ``init_cache(batch, max_len)`` and ``decode`` (``tests/nn/test_layer_signatures.py``).

        Args:
          x: ``[B, T, d_model]`` floating-point queries (and keys/values in self-attention).
          context: ``[B, S, context_dim]`` floating-point keys/values for cross-attention, or ``None``.
          mask: an ``attnjax.masks`` value over ``[B, Hq, T, S]`` (bottom-right aligned if T != S).
          positions: int ``[B, T]`` or ``[T]`` RoPE positions of ``x`` (default ``arange(T)``, or
            the layout's global positions under ``sequence_parallel``); self-attention only, since
            RoPE is not applied in cross-attention.
          deterministic: ``True`` disables dropout; ``None`` uses ``self.deterministic``.
        Returns:
          ``[B, T, d_model]``.
        """
        check_input("x", x, self.d_model)
        cross = context is not None
        if cross:
            check_input("context", context, self.context_dim)
            if positions is not None:
                raise ValueError("positions are for RoPE, which cross-attention (context given) does not apply")
        else:
            context = x
        sp = self.sequence_parallel
        if sp is not None and cross:
            raise NotImplementedError("sequence_parallel is for self-attention; cross-attention (context given) "
                                      "is not sequence-parallel")
        q, k, v = self.query(x), self.key(context), self.value(context)
        if positions is None and not cross:
            positions = jnp.arange(x.shape[1]) if sp is None else sp.positions(x.shape[1])
        q, v = self.scale_qv(q, v, positions)
        if self.rope is not None and not cross:
            q, k = self.rope(q, positions), self.rope(k, positions)
        if sp is not None:
            refuse_capture(f"{type(self).__name__} with sequence_parallel (tokens in layout order)")
            return self.out(sp.attend(q, k, v, mask=mask, implementation=self.implementation))
        deterministic = self.deterministic if deterministic is None else deterministic
        rate = 0.0 if deterministic else self.dropout_rate
        bias = None if self.position_bias is None or cross else self.position_bias()
        sow_attention_inputs(self, q, k, mask=mask, bias=bias, scale=None, mechanism=self.mechanism.name)
        out = attention(q, k, v, mechanism=self.mechanism, mask=mask, bias=bias, dropout_rate=rate,
                        rng=self.rngs() if rate > 0 else None, implementation=self.implementation)
        return self.out(out)

    def init_cache(self, batch: int, max_len: int,
                   dtype: Optional[Dtype] = None) -> Union[KVCache, LinearCache]:
        """An empty cache for ``decode``, of the type the mechanism needs (``decode_path``).

        KV-cache mechanisms: a ``KVCache`` with keys ``[batch, max_len, Hk, D]`` and values
        ``[batch, max_len, Hv, Dv]`` of zeros (each with its own head count and dim), length 0; ``dtype``
        defaults to ``dtype`` of the module, else ``param_dtype``. Linear-family mechanisms: a
        ``LinearCache`` with a zero state ``[batch, Hq, Dk', Dv (+1 when normalized)]`` (``Dk'`` the
        feature map's width), float32 unless ``dtype`` is given, length 0.

        Every decoding layer in ``attnjax.nn`` takes these arguments. ``batch`` and ``max_len`` (the
        most tokens ``decode`` will see) are positive ints. ``NotImplementedError`` for a mechanism
        that cannot decode (naming it and why).
        """
        path = self.decode_path()
        check_positive(batch=batch, max_len=max_len)
        if path == "linear":
            q_t = jnp.zeros((batch, self.num_heads, self.head_dim), jnp.float32)
            k_t = jnp.zeros((batch, self.num_kv_heads, self.head_dim), jnp.float32)
            v_t = jnp.zeros((batch, self.num_v_heads, self.v_head_dim), jnp.float32)
            state = jax.eval_shape(lambda: linear_attention_step(q_t, k_t, v_t, None, **self._linear_options()))[1]
            return LinearCache(jnp.zeros(state.shape, jnp.float32 if dtype is None else dtype),
                               jnp.zeros((), jnp.int32))
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        return KVCache.empty(batch, max_len, self.num_kv_heads, self.head_dim, dtype, self.num_v_heads,
                             self.v_head_dim)

    def decode(self, x_t: jax.Array, cache: Union[KVCache, LinearCache]) -> tuple[jax.Array, Union[KVCache, LinearCache]]:
        """One autoregressive step: attend from token ``x_t`` to itself and every cached token.

        Equal, position by position, to ``self(x, mask=masks.Causal(), deterministic=True)``.
        The token sits at position ``cache.length`` (its RoPE angle and cache slot); no dropout.
        Decoding past ``max_len`` tokens is undefined (the write clamps to the last slot).
        How the cache is read depends on the mechanism (``decode_path``, ``DECODE_PATHS``):

        - softmax, softplus: the one-token query against the whole cache with ``Explicit(filled)``; softmax
          without a position bias (implementation "auto"/"xla") reads the filled slots only, in place
          (``_attend_filled``);
        - selective: the same, with the query temperature ``1 + c·log(t + 1)`` of position ``t``
          (``selective_attention(positions=)``) rather than of the cache's last slot;
        - stick_breaking, urpe (relative positions), simplicial_2 (relative windows; a key pair needs both keys
          filled): the cache rolled so the filled slots end at the last slot, where a one-token query sits
          (bottom-right alignment), with ``Causal() & Explicit(filled)``; a ``position_bias`` rule is evaluated
          for a query at that slot;
        - kernelized_rpe (which takes no mask but ``Causal()``): the same rolled cache through
          ``kernelized_rpe_attention_reference`` with ``b = −∞`` on the empty slots (as
          ``nn.KernelizedRPEAttention.decode``), O(t) per token;
        - static block selectors (sparse_window, dilated, streaming, power, radial, s2): softmax over
          the filled keys of the key blocks ``pattern(max_len, max_len)`` lists for the token's query
          block (tiles are dense, so this is the selector's row); with implementation "auto"/"xla" only those
          blocks are read (``_listed_blocks``), O(listed blocks · block_kv) per token;
        - linear family (linear, lightning, performer, based_linear): ``linear_attention_step`` on a
          ``LinearCache`` state, O(1) in the length.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: the cache from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)`` with the token added to the cache.
        """
        path = self._check_cache(cache)
        batch = (cache.state if path == "linear" else cache.k).shape[0]
        check_step("x_t", x_t, self.d_model, batch)
        if path == "linear":
            return self._linear_cached(x_t, cache, "recurrent")
        q, k_all, v_all = self.write_cache(x_t, cache.k, cache.v, slot=cache.length, positions=cache.length[None])
        out = self._attend_cache(q, k_all, v_all, cache.length)
        return self.out(out), KVCache(k_all, v_all, cache.length + 1)

    def _attend_filled(self, q: jax.Array, k_all: jax.Array, v_all: jax.Array, length: jax.Array, *,
                       blocks: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
        """Softmax of ``q [B, T, Hq, D]`` at positions ``length … length + T − 1`` over the cache slots up to each
        query's position, read in place: an online softmax (FlashAttention-2's update, ``common.softmax_update``)
        over blocks of ``block_kv`` slots taken with ``dynamic_slice``, the blocks past the last query skipped by
        ``lax.cond``. O(B·T·Hq·(length + T)·(D + Dv)) flops and O(B·block_kv·(Hk·D + Hv·Dv)) extra memory.

        ``blocks = (ids [n], heads [n, Hq or 1])`` visits only the key blocks ``ids`` (a static selector's row,
        ``_listed_blocks``), block ``ids[j]`` for the query heads where ``heads[j]``: O(n·block_kv) per query.

        Reading the updated cache directly keeps XLA's write of the new keys in place: the blocked path re-lays the
        whole cache out heads-major every step, and a gather from the cache cut into pages (``paged_attention``)
        made XLA duplicate the cache update into the pages' reshape and copy both donated ``max_len`` buffers
        four times per step (CPU, ``compiled.as_text()``)."""
        B, T, Hq, D = q.shape
        S, Hk = k_all.shape[1:3]
        Hv, Dv = v_all.shape[2:]
        block = min(self.mechanism.block_kv, S)
        limit = (length + 1 + jnp.arange(T))[:, None, None]                   # [T, 1, 1] exclusive key bound
        qg = q.reshape(B, T, Hk, Hq // Hk, D)
        ids, heads = (jnp.arange(-(-S // block)), jnp.ones((-(-S // block), 1), bool)) if blocks is None else blocks

        def visit(carry, i, heads_i):
            start = jnp.minimum(i * block, S - block)                          # the last block ends at slot S − 1
            k, v = (jax.lax.dynamic_slice_in_dim(a, start, block, axis=1) for a in (k_all, v_all))
            s = jnp.einsum("btkgd,bskd->btkgs", qg, k, preferred_element_type=jnp.float32).reshape(B, T, Hq, block)
            slot = start + jnp.arange(block)
            s = jnp.where((slot >= i * block) & (slot < limit) & heads_i[:, None], s * D ** -0.5, -jnp.inf)

            def weighted_values(p):
                p = p.reshape(B, T, Hv, Hq // Hv, block).astype(v.dtype)
                return jnp.einsum("btvgs,bsve->btvge", p, v, preferred_element_type=jnp.float32).reshape(B, T, Hq, Dv)

            return paged_common.softmax_update(*carry, s, weighted_values)

        def step(carry, x):
            i, heads_i = x
            return jax.lax.cond((i * block < length + T) & jnp.any(heads_i), visit, lambda c, *_: c, carry, i,
                                heads_i), None

        init = (jnp.full((B, T, Hq, 1), -jnp.inf, jnp.float32), jnp.zeros((B, T, Hq, 1), jnp.float32),
                jnp.zeros((B, T, Hq, Dv), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(step, init, (ids, heads))
        return paged_common.normalize(acc, l).astype(q.dtype)

    def prefill(self, x: jax.Array,
                cache: Union[KVCache, LinearCache]) -> tuple[jax.Array, Union[KVCache, LinearCache]]:
        """Several tokens in one pass: ``x [B, T, d_model]`` at positions ``cache.length … cache.length + T − 1``
        (RoPE angles and cache slots), each attending to the cached tokens and causally to the new ones. Equal to
        ``T`` calls of ``decode``, so a prompt is cached by one blocked pass instead of ``T`` steps.

        Every ``decode_path`` has one (``_attend_cache``, the same function ``decode`` calls with ``T = 1``):

        - softmax, softplus ("softmax", "filled"): the ``T`` queries against the cache with
          ``Explicit(slot <= position)``, O(T·max_len);
        - selective: the same, with each query's temperature at its own position;
        - stick_breaking, urpe ("right_aligned"): the cache rolled so the filled slots end at the last slot, the
          ``T`` queries in the last ``T`` slots (bottom-right ``Causal()``), ``& Explicit(filled)``, O(T·max_len);
        - kernelized_rpe (no mask but ``Causal()``, so the empty slots cannot be cut out of a Toeplitz bias for
          several queries): the mechanism's causal call over all ``max_len`` slots with the ``T`` queries written at
          their slots (rows ``<=`` a query's position are filled, later rows are dropped), O(max_len²) for the
          reference (the FFT path O(max_len·log max_len));
        - static block selectors ("block_pattern"): each query's selector row, ANDed with ``slot <= position``;
        - linear family: ``linear_attention`` (chunked, ``chunk_size`` of the mechanism) from the cache's state,
          its final state the new cache, O(T) in the length.

        Writing past ``max_len`` is undefined, as for ``decode``.

        Returns:
          ``(y [B, T, d_model], cache)`` with the ``T`` tokens added.
        """
        path = self._check_cache(cache)
        check_chunk("x", x, self.d_model, (cache.state if path == "linear" else cache.k).shape[0])
        if path == "linear":
            return self._linear_cached(x, cache, self.implementation)
        positions = cache.length + jnp.arange(x.shape[1])
        q, k_all, v_all = self.write_cache(x, cache.k, cache.v, slot=cache.length, positions=positions)
        out = self._attend_cache(q, k_all, v_all, cache.length)
        return self.out(out), KVCache(k_all, v_all, cache.length + x.shape[1])

    def _check_cache(self, cache) -> str:
        """The ``decode_path``; ``TypeError`` unless ``cache`` is the type ``init_cache`` gives for it."""
        path = self.decode_path()
        expected = LinearCache if path == "linear" else KVCache
        if not isinstance(cache, expected):
            raise TypeError(f"mechanism {self.mechanism.name!r} decodes from a {expected.__name__} "
                            f"(init_cache), got {type(cache).__name__}")
        return path

    def _attend_cache(self, q: jax.Array, k_all: jax.Array, v_all: jax.Array, length: jax.Array) -> jax.Array:
        """Attention of ``q [B, T, Hq, D]`` at positions ``length … length + T − 1`` over the KV cache ``k_all``,
        ``v_all`` (``[B, max_len, ·, ·]``, slots ``< length + T`` filled), each query seeing the slots up to its
        own position: the read of every KV ``decode_path`` (``DECODE_PATHS``), for ``decode`` and ``prefill``."""
        path, mechanism = self.decode_path(), self.mechanism
        if path == "softmax" and self.position_bias is None and self.implementation in ("auto", "xla"):
            return self._attend_filled(q, k_all, v_all, length)
        T, S = q.shape[1], k_all.shape[1]
        slots = jnp.arange(S)
        seen = slots[None, :] <= (length + jnp.arange(T))[:, None]                          # [T, S]
        common = dict(implementation=self.implementation)
        if path == "right_aligned" and isinstance(mechanism, KernelizedRPE) and T > 1:
            q_all = jax.lax.dynamic_update_slice(jnp.zeros((q.shape[0], S, *q.shape[2:]), q.dtype), q,
                                                 (0, length, 0, 0))
            out = attention(q_all, k_all, v_all, mechanism=mechanism, mask=masks.Causal(), bias=self._decode_bias(None),
                            **common)
            return jax.lax.dynamic_slice_in_dim(out, length, T, axis=1)
        if path == "right_aligned":
            shift = S - T - length
            k_r, v_r = (jnp.roll(a, shift, axis=1) for a in (k_all, v_all))
            keep = slots >= shift
            bias = self._decode_bias(jnp.asarray(S - T, jnp.int32))
            if isinstance(mechanism, KernelizedRPE):
                b = jnp.zeros((1, S), jnp.float32) if bias is None else rule_rpe_bias(bias, self.num_heads, 1, S)
                return kernelized_rpe_attention_reference(q, k_r, v_r, jnp.where(keep, b, -jnp.inf),
                                                          feature_map=mechanism.feature_map, qk_norm=mechanism.qk_norm)
            mask = masks.Causal() & masks.Explicit(keep[None, None, None, :])
            return attention(q, k_r, v_r, mechanism=mechanism, mask=mask, bias=bias, **common)
        if path == "block_pattern" and T == 1 and self.implementation in ("auto", "xla"):
            ids, heads = (jnp.asarray(a)[length // mechanism.block_q] for a in self._listed_blocks(S))
            return self._attend_filled(q, k_all, v_all, length, blocks=(ids, heads))
        if path == "block_pattern":
            return attention(q, k_all, v_all, mechanism=Softmax(), mask=self._block_rows(seen, length), **common)
        explicit = masks.Explicit(seen[None, None])
        if path == "selective":
            return selective_attention(q, k_all, v_all, position_scale=mechanism.position_scale,
                                       positions=length + jnp.arange(T), mask=explicit, bias=self._decode_bias(length),
                                       block_q=mechanism.block_q, block_kv=mechanism.block_kv, **common)
        return attention(q, k_all, v_all, mechanism=mechanism, mask=explicit, bias=self._decode_bias(length), **common)

    def write_cache(self, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, *, slot: jax.Array,
                    positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The tokens ``x [B, T, d_model]`` projected (in the cache's dtype), rescaled (``scale_qv``) and rotated
        by RoPE at ``positions [T]``, their keys and values written into ``cache_k``/``cache_v`` from ``slot``.

        The step ``decode`` and ``prefill`` share, and that caches keeping a slot apart from a token's position
        (``attnjax.inference`` SnapKV) call. Returns ``(q [B, T, Hq, D], k_all, v_all)``.
        """
        q, k, v = (p(x).astype(cache_k.dtype) for p in (self.query, self.key, self.value))
        q, v = self.scale_qv(q, v, positions)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        start = (0, slot, 0, 0)
        return q, jax.lax.dynamic_update_slice(cache_k, k, start), jax.lax.dynamic_update_slice(cache_v, v, start)

    def decode_path(self) -> str:
        """How ``decode`` reads the cache for this module's mechanism, a key of ``DECODE_PATHS``.

        ``NotImplementedError`` naming the mechanism and the reason when it cannot decode: its registry
        entry says ``decodes=False``, or it decodes from a cache but no path here serves it (a config class
        without a path here, including subclasses of the softmax-family configs, whose math this module cannot
        vouch for).
        """
        mechanism, name = self.mechanism, self.mechanism.name
        if not mechanism.decodes:
            raise NotImplementedError(
                f"mechanism {name!r} does not decode from a cache (its registry entry has decodes=False: a "
                "one-token query against the keys so far does not give its row of causal attention)")
        paths = {Softmax: "softmax", Softplus: "filled", Selective: "selective", StickBreaking: "right_aligned",
                 URPE: "right_aligned", KernelizedRPE: "right_aligned", Simplicial: "right_aligned"}
        if type(mechanism) in paths:
            return paths[type(mechanism)]
        for family, path in ((StaticSelector, "block_pattern"), (LinearMechanism, "linear")):
            if isinstance(mechanism, family):
                return path
        raise NotImplementedError(f"MultiHeadAttention.decode has no cache path for mechanism {name!r} (a config of "
                                  "its own class; decode serves softmax, softplus, selective, stick_breaking, urpe, "
                                  "kernelized_rpe, simplicial_2, the static block selectors and the linear family)")

    def _decode_bias(self, query_offset: jax.Array):
        return None if self.position_bias is None else self.position_bias(query_offset=query_offset)

    def _listed_blocks(self, S: int) -> tuple[np.ndarray, np.ndarray]:
        """A static selector's causal block lists over ``S`` cache slots: ``ids [nq, n]`` int32, the key blocks of
        ``pattern(S, S)`` that row ``r`` lists for some head and that start before the row's last query, padded to
        the longest row ``n``, and ``heads [nq, n, Hq or 1]``, which heads list each (False on padding)."""
        mechanism = self.mechanism
        pattern = np.asarray(mechanism.pattern(S, S, self.num_heads))
        pattern = pattern if pattern.ndim == 3 else pattern[None]                           # [H', nq, nk]
        nq, nk = pattern.shape[1:]
        row_ends = (np.arange(nq)[:, None] + 1) * mechanism.block_q
        pattern = pattern & (np.arange(nk)[None, :] * mechanism.block_kv < row_ends)     # blocks holding a key <= row
        listed = pattern.any(axis=0)                                                         # [nq, nk]
        n = max(1, int(listed.sum(axis=1).max()))
        ids = np.argsort(~listed, axis=1, kind="stable")[:, :n]                              # listed blocks first
        heads = np.take_along_axis(pattern, ids[None], axis=2).transpose(1, 2, 0)
        heads &= np.take_along_axis(listed, ids, axis=1)[..., None]
        return ids.astype(np.int32), heads

    def _block_rows(self, seen: jax.Array, length: jax.Array) -> masks.Explicit:
        """The keys a static selector lists for the queries at positions ``length + arange(T)``: the key blocks of
        rows ``position // block_q`` of ``pattern(S, S)`` (``[nq, nk]`` or per head), ANDed with ``seen [T, S]``."""
        mechanism, (T, S) = self.mechanism, seen.shape
        pattern = jnp.asarray(mechanism.pattern(S, S, self.num_heads))
        rows = pattern[..., (length + jnp.arange(T)) // mechanism.block_q, :][..., jnp.arange(S) // mechanism.block_kv]
        rows = rows & seen
        return masks.Explicit(rows[None] if rows.ndim == 3 else rows[None, None])

    def _linear_options(self) -> dict:
        """``feature_map``, ``normalize`` and ``decay`` of the linear mechanism, as ``linear_attention`` takes them."""
        mechanism = self.mechanism
        decay = jnp.asarray(mechanism.decay, jnp.float32) if isinstance(mechanism.decay, tuple) else mechanism.decay
        return dict(feature_map=mechanism.feature_map, normalize=mechanism.normalize, decay=decay)

    def _linear_cached(self, x: jax.Array, cache: LinearCache, implementation: str) -> tuple[jax.Array, LinearCache]:
        """``x [B, T, d_model]`` at positions ``cache.length …``: causal ``linear_attention`` from the cache's state
        (``implementation`` "recurrent" for a decode step, the module's for prefill), its final state the new cache."""
        q, k, v = (p(x) for p in (self.query, self.key, self.value))
        positions = cache.length + jnp.arange(x.shape[1])
        q, v = self.scale_qv(q, v, positions)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        o, state = linear_attention(q, k, v, causal=True, chunk_size=self.mechanism.chunk_size,
                                    initial_state=cache.state.astype(jnp.float32), return_state=True,
                                    implementation=implementation, **self._linear_options())
        return self.out(o), LinearCache(state.astype(cache.state.dtype), cache.length + x.shape[1])

    def scale_qv(self, q: jax.Array, v: jax.Array, positions: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Per-token rescaling of the projected ``q [B, T, Hq, D]`` and ``v [B, S, Hv, Dv]`` before
        RoPE and attention: the identity here, a hook for subclasses (``SelectiveAttention``).

        ``positions`` are the query positions, ``None`` in cross-attention.
        """
        return q, v

    def require_support(self, *options: str) -> None:
        """``NotImplementedError`` unless the mechanism ``supports`` every option (``registry.OPTIONS``)
        that this module will pass to ``attnjax.attention``; modules call it at construction."""
        missing = sorted(set(options) - set(self.mechanism.supports))
        if missing:
            raise NotImplementedError(f"{type(self).__name__} needs {missing} from its mechanism, which "
                                      f"{self.mechanism.name!r} does not support (it supports "
                                      f"{sorted(self.mechanism.supports)})")

    def set_view(self, deterministic: Optional[bool] = None):
        """Used by ``nnx.view``: ``deterministic=True`` disables dropout."""
        if deterministic is not None:
            self.deterministic = deterministic

    def _check_decodable(self) -> None:
        """For subclasses whose own ``decode`` reads a ``KVCache`` softmax-style (``Explicit(filled)``):
        ``NotImplementedError`` unless the mechanism is softmax."""
        if self.mechanism.name != "softmax":
            raise NotImplementedError(
                f"KV-cache decoding is implemented for mechanism 'softmax' only, not {self.mechanism.name!r}")


register_module(ModuleSpec(
    "mha", MultiHeadAttention, dict(d_model=16, num_heads=4, num_kv_heads=2, rope=RoPE(base=100.0)), (2, 9, 16),
    kind="layer", paper="Vaswani et al. 2017 (Attention Is All You Need); Ainslie et al. 2023 (GQA)",
    causal=True, decodes=True))
register_module(ModuleSpec(
    "sigma", MultiHeadAttention,
    dict(d_model=16, num_heads=4, num_kv_heads=1, num_v_heads=2, head_dim=8, v_head_dim=4, rope=RoPE(base=100.0)),
    (2, 9, 16), kind="layer",
    paper="Lin et al. 2025 (Sigma: Differential Rescaling of Query, Key and Value; DiffQKV attention, Fig. 3: "
          "differentially compressed KV, augmented Q)", causal=True, decodes=True))
