"""Flow-Attention: linear attention with flow conservation (Flowformer).

Wu et al., "Flowformer: Linearizing Transformers with Conservation Flows", ICML 2022, §3. Attention is a
flow network from the ``m`` sources (keys/values) to the ``n`` sinks (queries/results) with capacities
``A_ij = φ(q_i)·φ(k_j)``, ``φ = sigmoid`` (per head, ``[B, T, H, D]`` layout, GQA by head groups)::

    I_i = Σ_j A_ij,   O_j = Σ_i A_ij                           incoming / outgoing flow      (eq. 4)
    Î_i = Σ_j A_ij / O_j,   Ô_j = Σ_i A_ij / I_i                conserved flows                (eq. 5-6)
    V̂ = m·softmax_j(Ô) ⊙ V                                      competition                    (eq. 7)
    A_out = (φ(Q) / I) (φ(K)ᵀ V̂)                                aggregation, right product first
    R = sigmoid(Î·n/m) ⊙ A_out                                  allocation

The causal variant (§3.3, the official ``Flow_Attention_Causal``) restricts every sum to the past and
rescales by the number of tokens seen, ``n_t = t + 1``: ``I_i = Σ_{j≤i} A_ij``, ``O_j = Σ_{i≤j} A_ij`` (the
queries known when source ``j`` arrives), ``Î_i = Σ_{j≤i} A_ij n_j/O_j / n_i``, ``Ô_j = Σ_{i≤j} A_ij n_i/I_i / n_j``,
competition by the running softmax ``n_j e^(Ô_j) / Σ_{j'≤j} e^(Ô_j')``, allocation ``sigmoid(Î_i)`` and
aggregation ``Σ_{j≤i} A_ij/I_i V̂_j``. Every sum is a prefix sum of ``[T, D]`` vectors, so the causal form
is a recurrence on a constant-size state (``FlowState``, ``flow_attention_step``).

Choices where the paper is silent, following the official code (thuml/Flowformer, ``Flow_Attention.py``):
``Ô`` is clipped to ``[−clamp, clamp]`` "for stability" (``clamp = 1`` there; its CV and NLP copies use 5),
the softmax is scaled by ``m`` (the number of sources) and ``Î`` by ``n/m`` so both average 1.
The official code adds ``eps = 1e-6`` to each feature and to each summed vector; here one ``eps`` is added to
``I`` and ``O`` (the divisors), an ``O(eps)`` difference that keeps the reference a plain matrix formula.

Implementations: ``reference`` (the ``[T, S]`` capacity matrix, the equations above), ``recurrent``
(causal: ``lax.scan`` over ``flow_attention_step``) and ``xla``: non-causal right product first, O(T·D·Dv)
time and O((T + S)·H·(D + Dv)) memory; causal by prefix sums of ``[T, H, D]`` vectors and the chunked
linear-attention scan of ``attnjax.linear.linear_attention`` (no ``[T, T]`` array; O(T·C) per chunk of
``C``). All accumulate in float32; the output takes q's dtype. The ``xla`` path is written on one chunk of a
sequence against ``attnjax.linear.sequence_state.StateExchange`` (its global sums are exchange calls), so
``Flow.chunk_attention`` runs it split over devices (LASP-2, ``attnjax.parallel.lasp2_mechanism``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from attnjax import masks, registry
from attnjax.checks import check_qkv, check_scalar
from attnjax.dispatch import dispatch
from attnjax.linear.linear_attention import linear_attention
from attnjax.linear.sequence_state import WHOLE, StateExchange

FLOW_EPS = 1e-6
"""Added to the incoming and outgoing flows before dividing by them (official code: ``eps=1e-6``)."""

FLOW_CLAMP = 1.0
"""Bound of the conserved outgoing flow ``Ô`` before the competition softmax (official ``Flow_Attention.py``)."""

SHIFT_BY_CLAMP = 64.0
"""Up to this ``clamp`` the non-causal competition softmax subtracts ``clamp`` itself (``e^(−clamp)`` is a normal
float32), else the largest clipped ``Ô``."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class FlowState:
    """Running sums of causal Flow-Attention after ``length`` tokens (``flow_attention_step``).

    Attributes:
      query_sum: ``[B, Hq, D]``, ``Σ_{i≤t} φ(q_i)``.
      key_sum: ``[B, Hkv, D]``, ``Σ_{j≤t} φ(k_j)``.
      key_flow: ``[B, Hq, D]``, ``Σ_{j≤t} φ(k_j)·n_j/O_j`` (for the conserved incoming flow).
      query_flow: ``[B, Hq, D]``, ``Σ_{i≤t} φ(q_i)·n_i/I_i`` (for the conserved outgoing flow).
      competition: ``[B, Hq]``, ``Σ_{j≤t} exp(Ô_j)``, the running softmax normalizer.
      kv: ``[B, Hq, D, Dv]``, ``Σ_{j≤t} φ(k_j) V̂_jᵀ``.
      length: int32 scalar, the number of tokens so far (``t + 1``).
    """

    query_sum: jax.Array
    key_sum: jax.Array
    key_flow: jax.Array
    query_flow: jax.Array
    competition: jax.Array
    kv: jax.Array
    length: jax.Array


def flow_initial_state(batch: int, num_heads: int, num_kv_heads: int, head_dim: int, value_dim: int,
                       dtype=jnp.float32) -> FlowState:
    """The empty ``FlowState`` (zeros, length 0) for ``num_heads`` query heads over ``num_kv_heads`` K/V heads."""
    zeros = functools.partial(jnp.zeros, dtype=dtype)
    return FlowState(zeros((batch, num_heads, head_dim)), zeros((batch, num_kv_heads, head_dim)),
                     zeros((batch, num_heads, head_dim)), zeros((batch, num_heads, head_dim)),
                     zeros((batch, num_heads)), zeros((batch, num_heads, head_dim, value_dim)),
                     jnp.zeros((), jnp.int32))


def flow_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                             eps: float = FLOW_EPS, clamp: float = FLOW_CLAMP) -> jax.Array:
    """Flow-Attention from the explicit capacity matrix ``A = φ(Q)φ(K)ᵀ`` (Flowformer §3.2-3.3, eq. 4-7).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``. Causal needs ``S == T``.
      causal: the causal variant (§3.3), else every sink sees every source.
      eps: added to the flows ``I`` and ``O`` before dividing.
      clamp: ``Ô`` is clipped to ``[−clamp, clamp]`` before the competition softmax.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype. Memory O(B·Hq·T·S).
    """
    _check(q, k, v, causal, eps, clamp)
    B, T, Hq, _ = q.shape
    S, G = k.shape[1], Hq // k.shape[2]
    phi_q = jax.nn.sigmoid(q.astype(jnp.float32))
    phi_k = jnp.repeat(jax.nn.sigmoid(k.astype(jnp.float32)), G, axis=2)
    values = jnp.repeat(v.astype(jnp.float32), G, axis=2)
    capacity = jnp.einsum("bthd,bshd->bhts", phi_q, phi_k)                    # A_ij, [B, Hq, T, S]
    if causal:
        n = jnp.arange(1, T + 1, dtype=jnp.float32)
        past = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]                 # [i, j]: j ≤ i
        into_sink = jnp.where(past, capacity, 0.0)                              # edges j → i known at time i
        out_of_source = jnp.where(past.T, capacity, 0.0)                        # edges j → i known at time j (i ≤ j)
        incoming = into_sink.sum(-1) + eps                                      # I_i
        outgoing = out_of_source.sum(-2) + eps                                  # O_j
        conserved_in = jnp.einsum("bhts,bhs->bht", into_sink, n / outgoing) / n
        conserved_out = jnp.einsum("bhts,bht->bhs", out_of_source, n / incoming) / n
        e = jnp.exp(jnp.clip(conserved_out, -clamp, clamp))
        competition = n * e / jnp.einsum("js,bhs->bhj", past.astype(jnp.float32), e)
        allocation = jax.nn.sigmoid(conserved_in)
    else:
        into_sink = capacity
        incoming = capacity.sum(-1) + eps
        outgoing = capacity.sum(-2) + eps
        conserved_in = jnp.einsum("bhts,bhs->bht", capacity, 1.0 / outgoing)
        conserved_out = jnp.einsum("bhts,bht->bhs", capacity, 1.0 / incoming)
        competition = S * jax.nn.softmax(jnp.clip(conserved_out, -clamp, clamp), axis=-1)
        allocation = jax.nn.sigmoid(conserved_in * (T / S))
    weights = into_sink / incoming[..., None] * competition[:, :, None, :]
    out = jnp.einsum("bhts,bshe->bthe", weights, values) * allocation.transpose(0, 2, 1)[..., None]
    return out.astype(q.dtype)


def flow_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, eps: float = FLOW_EPS,
                   clamp: float = FLOW_CLAMP, chunk_size: int = 64, implementation: str = "auto") -> jax.Array:
    """Flow-Attention (Flowformer §3, eq. 4-7; see the module docstring), in linear time.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0`` (query head ``h``
        reads K/V head ``h // (Hq // Hkv)``). Causal needs ``S == T``.
      causal: the causal variant (§3.3).
      eps, clamp: as in ``flow_attention_reference``.
      chunk_size: chunk of the causal ``xla`` path's linear-attention scan.
      implementation: "reference", "recurrent" (causal only), "xla" or "auto" (xla).
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    _check(q, k, v, causal, eps, clamp)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    def fast(path):
        a, b, values = _features(q, k, v)
        if not causal:
            return _noncausal(a, b, values, eps, clamp)
        return _recurrent(a, b, values, eps, clamp) if path == "recurrent" else _causal(a, b, values, eps, clamp,
                                                                                        chunk_size)

    def recurrent():
        if not causal:
            raise NotImplementedError("the recurrent implementation of flow attention is causal only; use 'xla'")
        return fast("recurrent")

    paths = {
        "reference": lambda: flow_attention_reference(q, k, v, causal=causal, eps=eps, clamp=clamp),
        "recurrent": recurrent,
        "xla": lambda: fast("xla"),
    }
    out = dispatch(paths, implementation, what="flow attention")
    return out.reshape(*q.shape[:3], v.shape[-1]).astype(q.dtype)


def flow_attention_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, state: Optional[FlowState] = None, *,
                        eps: float = FLOW_EPS, clamp: float = FLOW_CLAMP) -> tuple[jax.Array, FlowState]:
    """One token of causal Flow-Attention: update the running sums, then read out (§3.3).

    Args:
      q_t: ``[B, Hq, D]``; k_t: ``[B, Hkv, D]``; v_t: ``[B, Hkv, Dv]``.
      state: a ``FlowState`` (``flow_initial_state`` for the first token; ``None`` is that).
      eps, clamp: as in ``flow_attention``.
    Returns:
      ``(o_t [B, Hq, Dv] in q's dtype, new state in the state's dtype)``; step by step equal to
      ``flow_attention(..., causal=True)``. Computed in float32.
    """
    for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if getattr(t, "ndim", None) != 3:
            raise ValueError(f"{name} must have shape [batch, heads, dim], got {getattr(t, 'shape', None)}")
    check_qkv(q_t[:, None], k_t[:, None], v_t[:, None])
    _check_constants(eps, clamp)
    B, Hq, D = q_t.shape
    Hkv, Dv = k_t.shape[1], v_t.shape[-1]
    if state is None:
        state = flow_initial_state(B, Hq, Hkv, D, Dv)
    expected = flow_initial_state(B, Hq, Hkv, D, Dv)
    seen = [getattr(state, f.name).shape for f in dataclasses.fields(FlowState)]
    if seen != [getattr(expected, f.name).shape for f in dataclasses.fields(FlowState)]:
        raise ValueError(f"state shapes {seen} do not match q_t {q_t.shape}, k_t {k_t.shape}, v_t {v_t.shape}; "
                         "expected flow_initial_state(B, Hq, Hkv, D, Dv)")
    a, b, values = _features(q_t[:, None], k_t[:, None], v_t[:, None])
    new, out = _step(_grouped(state, Hkv), (a[:, 0], b[:, 0], values[:, 0]), eps, clamp)
    return out.reshape(B, Hq, Dv).astype(q_t.dtype), _flat(new, state.kv.dtype)


def _check_constants(eps: float, clamp: float) -> None:
    check_scalar("eps", eps)
    check_scalar("clamp", clamp)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not clamp > 0:
        raise ValueError(f"clamp must be positive, got {clamp}")


def _check(q, k, v, causal: bool, eps: float, clamp: float) -> None:
    check_qkv(q, k, v)
    _check_constants(eps, clamp)
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal flow attention needs as many keys as queries, got q {q.shape}, k {k.shape}")


def _features(q, k, v):
    """``φ(q) [B, T, Hkv, G, D]``, ``φ(k) [B, S, Hkv, D]`` and ``v [B, S, Hkv, Dv]`` in float32."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    a = jax.nn.sigmoid(q.astype(jnp.float32)).reshape(B, T, Hkv, Hq // Hkv, D)
    return a, jax.nn.sigmoid(k.astype(jnp.float32)), v.astype(jnp.float32)


def _noncausal(a, b, v, eps: float, clamp: float, exchange: StateExchange = WHOLE) -> jax.Array:
    """Right product first: flows from the summed features, ``φ(K)ᵀV̂`` before ``φ(Q)``; ``[B, T, Hkv, G, Dv]``.

    On chunk ``t`` of ``exchange.world`` (``a``, ``b``, ``v``: the chunk's tokens) the sums over all tokens are
    three ``exchange.total`` calls, each needing the one before: ``Σφ(q)``, ``Σφ(k)`` (for ``I``, ``O``); the
    conserved-flow sums ``Σ φ(k_j)/O_j``, ``Σ φ(q_i)/I_i``; the competition's ``Σ e_j`` with ``Σ φ(k_j) e_j v_jᵀ``.
    The softmax shift: ``Ô ≥ 0`` (positive features), so with ``clamp ≤ SHIFT_BY_CLAMP`` the shift ``clamp``
    keeps ``e = exp(clip(Ô) − clamp)`` in ``[e^(−clamp), 1]`` (no underflow to 0) and needs no collective; a
    larger ``clamp`` shifts by the largest ``clip(Ô)``, one more collective (``gather`` of each chunk's maximum).
    """
    T, S = a.shape[1] * exchange.world, b.shape[1] * exchange.world
    query_sum, key_sum = exchange.total((a.sum(1), b.sum(1)))
    incoming = jnp.einsum("bthgf,bhf->bthg", a, key_sum) + eps
    outgoing = jnp.einsum("bshf,bhgf->bshg", b, query_sum) + eps
    key_flow, query_flow = exchange.total((jnp.einsum("bshf,bshg->bhgf", b, 1.0 / outgoing),
                                           jnp.einsum("bthgf,bthg->bhgf", a, 1.0 / incoming)))
    conserved_in = jnp.einsum("bthgf,bhgf->bthg", a, key_flow)
    conserved_out = jnp.einsum("bshf,bhgf->bshg", b, query_flow)
    clipped = jnp.clip(conserved_out, -clamp, clamp)
    if clamp <= SHIFT_BY_CLAMP:
        shift = clamp
    else:
        shift = jnp.max(exchange.gather(jax.lax.stop_gradient(clipped.max(axis=1))), axis=0)[:, None]
    e = jnp.exp(clipped - shift)
    e_sum, kv = exchange.total((e.sum(1), jnp.einsum("bshf,bshg,bshe->bhgfe", b, e, v)))
    kv = kv * (S / e_sum)[..., None, None]                                       # competition = S·softmax(Ô)
    out = jnp.einsum("bthgf,bhgfe->bthge", a / incoming[..., None], kv)
    return out * jax.nn.sigmoid(conserved_in * (T / S))[..., None]


def _causal(a, b, v, eps: float, clamp: float, chunk_size: int, exchange: StateExchange = WHOLE) -> jax.Array:
    """Prefix sums for the flows, then causal linear attention of ``φ(Q)/I`` over ``φ(K)`` and ``V̂``.

    ``linear_attention`` takes one value per K head, but ``V̂`` is per query head (its competition is), so
    ``φ(K)`` is repeated over the ``G`` query heads of a group: O(T·Hq·D) memory, as ``V̂`` itself.

    On chunk ``t`` (``n`` counts global positions from ``t·C + 1``) every prefix sum is the chunk's own
    ``cumsum`` plus the earlier chunks' totals, four ``exchange.combine`` calls, each needing the one before:
    ``Σφ(q)``, ``Σφ(k)``; the key and query flows; ``Σ e``; the state ``Σ φ(k_j) V̂_jᵀ``, which enters the chunk's
    linear-attention scan as its initial state.
    """
    B, C, Hkv, G, F = a.shape
    n = (exchange.rank() * C).astype(jnp.float32) + jnp.arange(1, C + 1, dtype=jnp.float32)[None, :, None, None]

    def prefix(x, before):
        return before[:, None] + jnp.cumsum(x, axis=1)

    query_before, key_before = exchange.combine((a.sum(1), b.sum(1)), causal=True)
    incoming = jnp.einsum("bthgf,bthf->bthg", a, prefix(b, key_before)) + eps
    outgoing = jnp.einsum("bthf,bthgf->bthg", b, prefix(a, query_before)) + eps
    key_flow = b[:, :, :, None] * (n / outgoing)[..., None]
    query_flow = a * (n / incoming)[..., None]
    key_flow_before, query_flow_before = exchange.combine((key_flow.sum(1), query_flow.sum(1)), causal=True)
    conserved_in = jnp.einsum("bthgf,bthgf->bthg", a, prefix(key_flow, key_flow_before)) / n
    conserved_out = jnp.einsum("bthf,bthgf->bthg", b, prefix(query_flow, query_flow_before)) / n
    e = jnp.exp(jnp.clip(conserved_out, -clamp, clamp))
    competition = n * e / prefix(e, exchange.combine(e.sum(1), causal=True))
    kv_before = exchange.combine(jnp.einsum("bshf,bshg,bshe->bhgfe", b, competition, v), causal=True)
    values = (competition[..., None] * v[:, :, :, None]).reshape(B, C, Hkv * G, -1)
    out = linear_attention((a / incoming[..., None]).reshape(B, C, Hkv * G, F), jnp.repeat(b, G, axis=2), values,
                           feature_map="identity", causal=True, scale=1.0, chunk_size=chunk_size,
                           initial_state=kv_before.reshape(B, Hkv * G, F, -1), implementation="xla")
    return out.reshape(B, C, Hkv, G, -1) * jax.nn.sigmoid(conserved_in)[..., None]


def _grouped(state: FlowState, num_kv_heads: int) -> FlowState:
    """``state`` in float32 with the query heads split into ``[Hkv, G]``."""
    def split(x):
        x = x.astype(jnp.float32)
        return x.reshape(x.shape[0], num_kv_heads, -1, *x.shape[2:])
    return FlowState(split(state.query_sum), state.key_sum.astype(jnp.float32), split(state.key_flow),
                     split(state.query_flow), split(state.competition), split(state.kv), state.length)


def _flat(state: FlowState, dtype) -> FlowState:
    """A grouped state (``_grouped``) back in the public layout, cast to ``dtype``."""
    def merge(x):
        return x.reshape(x.shape[0], -1, *x.shape[3:]).astype(dtype)
    return FlowState(merge(state.query_sum), state.key_sum.astype(dtype), merge(state.key_flow),
                     merge(state.query_flow), merge(state.competition), merge(state.kv), state.length)


def _step(state: FlowState, inputs, eps: float, clamp: float):
    """One token on a grouped float32 state: ``a [B, Hkv, G, D]``, ``b [B, Hkv, D]``, ``v [B, Hkv, Dv]``."""
    a, b, v = inputs
    n = (state.length + 1).astype(jnp.float32)
    query_sum, key_sum = state.query_sum + a, state.key_sum + b
    incoming = jnp.einsum("bhgf,bhf->bhg", a, key_sum) + eps
    outgoing = jnp.einsum("bhf,bhgf->bhg", b, query_sum) + eps
    key_flow = state.key_flow + b[:, :, None] * (n / outgoing)[..., None]
    query_flow = state.query_flow + a * (n / incoming)[..., None]
    conserved_in = jnp.einsum("bhgf,bhgf->bhg", a, key_flow) / n
    e = jnp.exp(jnp.clip(jnp.einsum("bhf,bhgf->bhg", b, query_flow) / n, -clamp, clamp))
    competition = state.competition + e
    kv = state.kv + jnp.einsum("bhf,bhg,bhe->bhgfe", b, n * e / competition, v)
    out = jnp.einsum("bhgf,bhgfe->bhge", a / incoming[..., None], kv) * jax.nn.sigmoid(conserved_in)[..., None]
    return FlowState(query_sum, key_sum, key_flow, query_flow, competition, kv, state.length + 1), out


def _recurrent(a, b, v, eps: float, clamp: float) -> jax.Array:
    """``lax.scan`` of ``_step`` over the tokens from the empty state; ``[B, T, Hkv, G, Dv]``."""
    B, T, Hkv, G, F = a.shape
    state = _grouped(flow_initial_state(B, Hkv * G, Hkv, F, v.shape[-1]), Hkv)
    _, out = jax.lax.scan(lambda s, x: _step(s, x, eps, clamp), state,
                          (a.swapaxes(0, 1), b.swapaxes(0, 1), v.swapaxes(0, 1)))
    return out.swapaxes(0, 1)


@registry.register
@dataclasses.dataclass(frozen=True)
class Flow:
    """Flow-Attention as a registered mechanism: no mask (non-causal) or ``masks.Causal()`` (§3.3), GQA.

    Flow-Attention has no logit scale (``φ = sigmoid`` of the raw q and k), so ``scale`` is refused, as is
    cross-attention under ``attnjax.attention`` (``T != S``: the causal form needs ``T == S``; the functional
    ``flow_attention`` serves non-causal ``T != S``). A row depends on every query so far, so it does not decode
    from a KV cache (``decodes = False``); the recurrent ``flow_attention_step`` carries the flows instead.
    """

    eps: float = FLOW_EPS
    clamp: float = FLOW_CLAMP
    chunk_size: int = 64

    name: ClassVar[str] = "flow"
    family: ClassVar[str] = "linear"
    paper: ClassVar[str] = "Wu et al. 2022, Flowformer: Linearizing Transformers with Conservation Flows"
    supports: ClassVar[frozenset] = frozenset({"mask", "gqa"})
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ("lasp2",)

    def implementations(self):
        return {name: functools.partial(_registered, self, name) for name in ("reference", "recurrent", "xla")}

    def chunk_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, *, exchange: StateExchange,
                        causal: bool = False, scale: Optional[float] = None) -> jax.Array:
        """The linear-state interface (``attnjax.linear.sequence_state``): this chunk's rows of
        ``flow_attention`` (the ``xla`` path) over the sequence split as ``exchange`` says.

        Args:
          q: chunk ``[B, C, Hq, D]``; k: ``[B, C', Hkv, D]``; v: ``[B, C', Hkv, Dv]`` (causal: ``C' = C``).
          exchange: the ``StateExchange``; causal: §3.3's form.
          scale: must be None (Flow-Attention has none).
        Returns:
          ``[B, C, Hq, Dv]`` in q's dtype. Collectives: non-causal three ``total`` (``[B, Hq, D]``-sized sums,
          then ``[B, Hq, D, Dv]``), causal four ``combine`` (the same sums as prefixes), none of size ``C``.
        """
        if scale is not None:
            raise NotImplementedError("flow attention has no logit scale (φ = sigmoid of the raw q and k); "
                                      "pass scale=None")
        _check(q, k, v, causal, self.eps, self.clamp)
        a, b, values = _features(q, k, v)
        out = (_causal(a, b, values, self.eps, self.clamp, self.chunk_size, exchange) if causal
               else _noncausal(a, b, values, self.eps, self.clamp, exchange))
        return out.reshape(*q.shape[:3], v.shape[-1]).astype(q.dtype)


def _registered(config: Flow, implementation: str, q, k, v, *, mask=None, scale=None) -> jax.Array:
    """``attnjax.attention`` signature for ``Flow``."""
    if scale is not None:
        raise NotImplementedError("flow attention has no logit scale (φ = sigmoid of the raw q and k); pass scale=None")
    if mask is not None and not isinstance(mask, masks.Causal):
        raise NotImplementedError(f"flow attention serves no mask or masks.Causal(), got {mask!r}")
    return flow_attention(q, k, v, causal=mask is not None, eps=config.eps, clamp=config.clamp,
                          chunk_size=config.chunk_size, implementation=implementation)


__all__ = ["FLOW_EPS", "FLOW_CLAMP", "FlowState", "flow_initial_state", "flow_attention_reference", "flow_attention",
           "flow_attention_step", "Flow"]
