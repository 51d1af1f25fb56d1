"""Titans' neural long-term memory with a linear (matrix) memory (Behrouz, Zhong and Mirrokni, "Titans: Learning to
Memorize at Test Time", 2025, Sections 3.1-3.2).

Per head the memory is a matrix ``S [Dk, Dv]`` read as ``o_t = q_t·S_t`` (eq. 15 with a one-layer linear memory)
and written at test time by gradient descent with momentum and weight decay on the associative loss
``ℓ_t(S) = ½‖k_t·S − v_t‖²`` (eq. 12; the paper's loss has no ½, which the learning rate θ absorbs)::

    U_t = η_t·U_(t−1) − θ_t·∇ℓ_t(S_base),    ∇ℓ_t(S) = k_tᵀ(k_t·S − v_t)      (eqs. 10/14: momentum, "surprise")
    S_t = (1 − α_t)·S_(t−1) + U_t                                             (eq. 13: forgetting gate α)
    o_t = q_t·S_t                                                             (read after token t's update)

with ``U_(−1) = 0`` (or ``initial_momentum``) and ``S_(−1) = initial_state`` (zeros by default). ``θ`` is ``lr``,
``η`` is ``momentum`` and ``α`` is ``decay``, all per token and head. ``S_base`` is the state before the
chunk holding token t (Section 3.2, mini-batch gradient descent): chunks of ``chunk_size`` C tokens start at
t = 0, C, 2C, ...; with C = 1 ``S_base = S_(t−1)`` (exact online gradient descent, eq. 8 with eqs. 13-14). The
last chunk may be shorter.

Paths: ``neural_memory_reference`` scans token by token (the definition above; ``neural_memory_step`` is its one-token
step, for decoding); ``neural_memory(..., implementation="xla")`` is Section 3.2's chunk-parallel form. Within a
chunk with base ``S_0`` and momentum ``U_0`` every gradient is the rank-one ``k_jᵀ r_j``, ``r_j = θ_j(k_j·S_0 − v_j)``,
and the two scalar-gated recurrences unroll to

    S_i = A_i·S_0 + w_i·U_0 − Σ_{j≤i} W_ij·k_jᵀ r_j,    U_i = P_i·U_0 − Σ_{j≤i} D_ij·k_jᵀ r_j,

with ``D_ij = Π_{j<m≤i} η_m``, ``E_il = Π_{l<m≤i} (1 − α_m)``, ``W = E·D``, ``P_i = Π_{m≤i} η_m``,
``A_i = Π_{m≤i} (1 − α_m)``, ``w = E·P`` (products over the chunk's tokens). So ``o = A⊙(Q·S_0) + w⊙(Q·U_0) −
((Q·Kᵀ)⊙W)·R`` is matmuls, and a ``lax.scan`` over chunks carries ``(S, U)``. The products are cumulative products
(``jnp.cumprod``), not differences of log cumsums, so gates at η = 0 or α = 1 give exact zeros and finite gradients.

This follows the paper text; no official code is public. lucidrains/titans-pytorch (unofficial) differs: there the
chunk's gradients are summed into one update, the momentum and decay gates are one per chunk (from a pooled chunk
representation) and scanned over chunks, and queries read the memory as of a chunk boundary rather than after each
token. The memory here is one linear layer; the paper's deep MLP memory has no closed-form chunk sums.

States, gates and accumulators are float32; outputs take q's dtype.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from attnjax.checks import check_positive, check_qkv, describe
from attnjax.dispatch import dispatch
from attnjax.meshes import vary_like


class NeuralMemoryState(NamedTuple):
    """The recurrent state of ``neural_memory`` after some tokens (a pytree; batch ``B``, memory heads ``H``).

    Attributes:
      memory: float32 ``[B, H, Dk, Dv]``, the memory ``S`` after the last token.
      momentum: float32 ``[B, H, Dk, Dv]``, the momentum (surprise) ``U`` after the last token.
      base: float32 ``[B, H, Dk, Dv]``, the memory before the chunk holding the last token: the point where that
        chunk's gradients are taken (equal to the memory before the last token when ``chunk_size = 1``).
      position: int32 ``[]``, the number of tokens consumed; token ``position`` opens a chunk when
        ``position % chunk_size == 0``.
    """

    memory: jax.Array
    momentum: jax.Array
    base: jax.Array
    position: jax.Array


def neural_memory_init_state(batch: int, num_heads: int, key_dim: int, value_dim: int) -> NeuralMemoryState:
    """The empty state (zero memory and momentum at position 0) for ``neural_memory_step``, e.g. a decode cache."""
    check_positive(batch=batch, num_heads=num_heads, key_dim=key_dim, value_dim=value_dim)
    zeros = jnp.zeros((batch, num_heads, key_dim, value_dim), jnp.float32)
    return NeuralMemoryState(zeros, zeros, zeros, jnp.zeros((), jnp.int32))


class _Inputs(NamedTuple):
    """Validated float32 operands; query heads grouped by memory head (``G = Hq // H``)."""

    q: jax.Array         # [B, T, H, G, Dk]
    k: jax.Array         # [B, T, H, Dk]
    v: jax.Array         # [B, T, H, Dv]
    lr: jax.Array        # [B, T, H], θ
    eta: jax.Array       # [B, T, H], η
    keep: jax.Array      # [B, T, H], 1 − α
    state: NeuralMemoryState


def neural_memory(
    q: jax.Array, k: jax.Array, v: jax.Array, lr: jax.Array, momentum: jax.Array, decay: jax.Array, *,
    chunk_size: int = 1, initial_state: Optional[jax.Array] = None, initial_momentum: Optional[jax.Array] = None,
    return_state: bool = False, implementation: str = "auto",
) -> Union[jax.Array, tuple[jax.Array, NeuralMemoryState]]:
    """Titans' linear neural memory (Behrouz et al. 2025, eqs. 8-15 and Section 3.2; see the module docstring).

    ``U_t = η_t·U_(t−1) − θ_t·k_tᵀ(k_t·S_base − v_t)``, ``S_t = (1 − α_t)·S_(t−1) + U_t``, ``o_t = q_t·S_t``, where
    ``S_base`` is the memory before token t's chunk (chunks of ``chunk_size`` from t = 0).

    Args:
      q: ``[B, T, Hq, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``; one float dtype. GQA: ``Hq % H == 0``
        and query head ``h`` reads memory ``h // (Hq // H)`` (the memories, keys, values and gates have ``H`` heads).
      lr: θ ``[B, T, H]``, the per-token learning rate (the paper's θ_t, typically ≥ 0).
      momentum: η ``[B, T, H]``, the momentum gate (typically in [0, 1]).
      decay: α ``[B, T, H]``, the forgetting gate (typically in [0, 1]; the memory keeps ``1 − α``).
      chunk_size: C, the mini-batch of Section 3.2: the tokens of a chunk take their gradients at the memory before
        the chunk. 1 is exact online gradient descent; larger C changes the result (it is part of the model, not
        only a speed knob). Chunks start at t = 0, C, 2C, ...; the last one may be shorter.
      initial_state: ``S_(−1)`` ``[B, H, Dk, Dv]`` (zeros if None).
      initial_momentum: ``U_(−1)`` ``[B, H, Dk, Dv]`` (zeros if None).
      return_state: also return the ``NeuralMemoryState`` after token T−1. To continue a sequence in a second call
        pass its ``memory`` and ``momentum`` as ``initial_state`` / ``initial_momentum`` (equal to one call when
        this call's T is a multiple of C, since the next call's chunks start at its own t = 0); or continue
        token by token with ``neural_memory_step`` (always equal: the state keeps the chunk base and position).
      implementation: "reference" (``neural_memory_reference``: a scan over tokens, O(T·Dk·Dv) per head, T
        sequential steps), "xla" (chunk-parallel: a scan over T/C chunks, each a few matmuls; per head O(T·C·(Dk + Dv)
        + T·C² + T·Dk·Dv) work and O(T·C) memory for the backward pass) or "auto" (xla).
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype, or ``(out, NeuralMemoryState)`` (float32) with ``return_state``.
    """
    x = _prepare(q, k, v, lr, momentum, decay, chunk_size, initial_state, initial_momentum)
    paths = {"reference": lambda: _reference(x, chunk_size), "xla": lambda: _chunked(x, chunk_size)}
    out, state = dispatch(paths, implementation, what="neural_memory")
    out = out.reshape(*q.shape[:3], v.shape[-1]).astype(q.dtype)
    return (out, state) if return_state else out


def neural_memory_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, lr: jax.Array, momentum: jax.Array, decay: jax.Array, *,
    chunk_size: int = 1, initial_state: Optional[jax.Array] = None, initial_momentum: Optional[jax.Array] = None,
    return_state: bool = False,
) -> Union[jax.Array, tuple[jax.Array, NeuralMemoryState]]:
    """The token-by-token definition of ``neural_memory`` (Titans, Behrouz et al. 2025, eqs. 12-15; Section 3.2's
    chunk base): a ``lax.scan`` over t carrying ``(S, U, S_base, position)``, with ``S_base ← S_(t−1)`` where t opens
    a chunk (``t % chunk_size == 0``), then ``U ← η_t·U − θ_t·k_tᵀ(k_t·S_base − v_t)``, ``S ← (1 − α_t)·S + U``,
    ``o_t = q_t·S``. Arguments and returns as in ``neural_memory``."""
    return neural_memory(q, k, v, lr, momentum, decay, chunk_size=chunk_size, initial_state=initial_state,
                         initial_momentum=initial_momentum, return_state=return_state, implementation="reference")


def neural_memory_step(
    q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, lr_t: jax.Array, momentum_t: jax.Array, decay_t: jax.Array,
    state: Optional[NeuralMemoryState] = None, *, chunk_size: int = 1,
) -> tuple[jax.Array, NeuralMemoryState]:
    """One token of ``neural_memory_reference`` (Titans eqs. 13-15), for decoding.

    At ``state.position % chunk_size == 0`` the token opens a chunk (``base ← memory``); then
    ``U ← η·U − θ·kᵀ(k·base − v)``, ``S ← (1 − α)·S + U``, ``o = q·S``. Stepping from ``neural_memory_init_state``
    (or from the state a ``neural_memory(..., return_state=True)`` call returned with the same ``chunk_size``)
    reproduces the parallel call token by token, for any chunk size.

    Args:
      q_t: ``[B, Hq, Dk]``; k_t: ``[B, H, Dk]``; v_t: ``[B, H, Dv]``; ``Hq % H == 0`` (GQA as in ``neural_memory``).
      lr_t, momentum_t, decay_t: θ, η, α ``[B, H]``.
      state: a ``NeuralMemoryState`` with ``[B, H, Dk, Dv]`` arrays, or None for the empty state.
      chunk_size: C, as in ``neural_memory``.
    Returns:
      ``(o_t [B, Hq, Dv] in q_t's dtype, the next NeuralMemoryState)``.
    """
    for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if getattr(t, "ndim", None) != 3:
            raise ValueError(f"{name} must have shape [batch, heads, dim], got {describe(t)}")
    check_qkv(q_t[:, None], k_t[:, None], v_t[:, None])
    check_positive(chunk_size=chunk_size)
    B, Hq, Dk = q_t.shape
    H, Dv = k_t.shape[1], v_t.shape[2]
    for name, g in (("lr_t", lr_t), ("momentum_t", momentum_t), ("decay_t", decay_t)):
        _check_float(name, g, (B, H), "[B, H]")
    if state is None:
        state = neural_memory_init_state(B, H, Dk, Dv)
    if not isinstance(state, NeuralMemoryState):
        raise TypeError(f"state must be a NeuralMemoryState or None, got {type(state).__name__}")
    for name in ("memory", "momentum", "base"):
        _check_float(f"state.{name}", getattr(state, name), (B, H, Dk, Dv), "[B, H, Dk, Dv]")
    if jnp.shape(state.position) != ():
        raise ValueError(f"state.position must be a scalar int, got {describe(state.position)}")
    state = NeuralMemoryState(*(s.astype(jnp.float32) for s in state[:3]), jnp.asarray(state.position, jnp.int32))
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    inputs = (f32(q_t).reshape(B, H, Hq // H, Dk), f32(k_t), f32(v_t), f32(lr_t), f32(momentum_t),
              1.0 - f32(decay_t))
    state, o = _token_step(state, inputs, chunk_size)
    return o.reshape(B, Hq, Dv).astype(q_t.dtype), state


def _check_float(name: str, x, shape: tuple, layout: str) -> None:
    """``ValueError`` unless ``x`` has ``shape``, ``TypeError`` unless it is floating-point."""
    if getattr(x, "shape", None) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {describe(x)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def _prepare(q, k, v, lr, momentum, decay, chunk_size, initial_state, initial_momentum) -> _Inputs:
    """Validate the arguments of ``neural_memory`` and cast to float32, grouping query heads."""
    check_qkv(q, k, v)
    check_positive(chunk_size=chunk_size)
    B, T, Hq, Dk = q.shape
    H, Dv = k.shape[2], v.shape[3]
    if k.shape[1] != T:
        raise ValueError(f"q and k must have the same seq length (a causal memory), got q {q.shape}, k {k.shape}")
    if T == 0:
        raise ValueError(f"neural_memory needs at least one token, got q {q.shape}")
    for name, g in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        _check_float(name, g, (B, T, H), "[B, T, H]")
    states = []
    for name, s in (("initial_state", initial_state), ("initial_momentum", initial_momentum)):
        if s is None:
            states.append(jnp.zeros((B, H, Dk, Dv), jnp.float32))
        else:
            _check_float(name, s, (B, H, Dk, Dv), "[B, H, Dk, Dv]")
            states.append(s.astype(jnp.float32))
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    state = NeuralMemoryState(states[0], states[1], states[0], jnp.zeros((), jnp.int32))
    return _Inputs(f32(q).reshape(B, T, H, Hq // H, Dk), f32(k), f32(v), f32(lr), f32(momentum), 1.0 - f32(decay),
                   state)


def _token_step(state: NeuralMemoryState, inputs, chunk_size: int):
    """One token of the recurrence on float32 ``[B, H, ...]`` inputs; returns ``(state, o [B, H, G, Dv])``."""
    q, k, v, lr, eta, keep = inputs
    memory, momentum, base, position = state
    base = jnp.where(position % chunk_size == 0, memory, base)
    residual = jnp.einsum("bhd,bhde->bhe", k, base) - v                            # k·S_base − v
    grad = jnp.einsum("bhd,bhe->bhde", k, residual)                                # kᵀ(k·S_base − v)
    momentum = eta[..., None, None] * momentum - lr[..., None, None] * grad
    memory = keep[..., None, None] * memory + momentum
    o = jnp.einsum("bhgd,bhde->bhge", q, memory)
    return NeuralMemoryState(memory, momentum, base, position + 1), o


def _reference(x: _Inputs, chunk_size: int):
    """``lax.scan`` of ``_token_step`` over t; returns ``(out [B, T, H, G, Dv], state)``."""
    xs = tuple(a.swapaxes(0, 1) for a in (x.q, x.k, x.v, x.lr, x.eta, x.keep))
    state0 = vary_like(x.state, *xs)
    state, out = jax.lax.scan(lambda s, i: _token_step(s, i, chunk_size), state0, xs)
    return out.swapaxes(0, 1), state


def segment_products(g: jax.Array) -> jax.Array:
    """``L [..., C, C]`` with ``L_ij = Π_{j<m≤i} g_m`` for ``j ≤ i`` (1 on the diagonal) and 0 above it, from gates
    ``g [..., C]``: the weight a scalar-gated recurrence ``x_i = g_i·x_(i−1) + u_i`` gives ``u_j`` in ``x_i``.

    A cumulative product down each column (no log-space differences), so zero gates give exact zeros, and
    autodiff (``cumprod``'s product-rule scan, no division) keeps finite gradients there.
    """
    C = g.shape[-1]
    i = jnp.arange(C)[:, None]
    j = jnp.arange(C)[None, :]
    factors = jnp.where(i > j, g[..., :, None], 1.0)
    return jnp.where(i >= j, jnp.cumprod(factors, axis=-2), 0.0)


def _chunk_step(carry, inputs):
    """One chunk of Section 3.2's parallel form (shapes ``[B, H, ...]``, c = the chunk's length).

    Carry ``(S_0, U_0, base)``; inputs: q ``[B, H, G, c, Dk]``, k ``[B, H, c, Dk]``, v ``[B, H, c, Dv]``, θ
    ``[B, H, c]``, the masked scores ``(Q·Kᵀ)⊙W`` ``[B, H, G, c, c]``, the coefficient rows ``A``, ``w`` ``[B, H, c]``
    and the chunk-end rows ``W_(c−1)``, ``D_(c−1)`` ``[B, H, c]`` with ``P_(c−1)`` ``[B, H]``.
    """
    s0, u0, _ = carry
    q, k, v, lr, scores, a_row, w_row, w_end, d_end, p_end = inputs
    r = lr[..., None] * (jnp.einsum("bhcd,bhde->bhce", k, s0) - v)                 # θ_j (k_j·S_0 − v_j)
    qs = jnp.einsum("bhgcd,bhde->bhgce", q, s0)
    qu = jnp.einsum("bhgcd,bhde->bhgce", q, u0)
    out = (a_row[:, :, None, :, None] * qs + w_row[:, :, None, :, None] * qu
           - jnp.einsum("bhgij,bhje->bhgie", scores, r))
    s = (a_row[..., -1, None, None] * s0 + w_row[..., -1, None, None] * u0
         - jnp.einsum("bhjd,bhje->bhde", k * w_end[..., None], r))
    u = p_end[..., None, None] * u0 - jnp.einsum("bhjd,bhje->bhde", k * d_end[..., None], r)
    return (s, u, s0), out


def _chunk_inputs(q, k, v, lr, eta, keep):
    """The scan inputs of ``_chunk_step`` for chunks laid out ``[N, B, H, c, ...]`` (q ``[N, B, H, G, c, Dk]``)."""
    decay_w = segment_products(keep)                                               # E [N, B, H, c, c]
    mom_w = segment_products(eta)                                                  # D
    weights = jnp.einsum("...il,...lj->...ij", decay_w, mom_w)                     # W = E·D
    p_row = jnp.cumprod(eta, axis=-1)                                              # P_i
    a_row = jnp.cumprod(keep, axis=-1)                                             # A_i
    w_row = jnp.einsum("...il,...l->...i", decay_w, p_row)                         # w = E·P
    scores = jnp.einsum("nbhgid,nbhjd->nbhgij", q, k) * weights[:, :, :, None]
    return q, k, v, lr, scores, a_row, w_row, weights[..., -1, :], mom_w[..., -1, :], p_row[..., -1]


def _chunked(x: _Inputs, chunk_size: int):
    """``lax.scan`` of ``_chunk_step`` over the full chunks, then the shorter last chunk (if any) once."""
    B, T, H, G, Dk = x.q.shape
    Dv = x.v.shape[-1]
    C = min(chunk_size, T)
    N, tail = divmod(T, C)

    def chunks(a, start, n, c):
        """``[B, T, H, ...]`` tokens ``start .. start + n·c`` -> ``[n, B, H, ..., c, X]`` (gates: ``[n, B, H, c]``)."""
        a = a[:, start:start + n * c].reshape(B, n, c, *a.shape[2:])
        a = jnp.moveaxis(a, (1, 2), (0, 3))                                        # [n, B, H, c, ...]
        return jnp.moveaxis(a, 3, -2) if a.ndim == 6 else a                        # q: [n, B, H, G, c, Dk]

    def inputs(start, n, c):
        return _chunk_inputs(*(chunks(a, start, n, c) for a in (x.q, x.k, x.v, x.lr, x.eta, x.keep)))

    carry = vary_like((x.state.memory, x.state.momentum, x.state.base), x.q, x.k, x.v, x.lr, x.eta, x.keep)
    carry, out = jax.lax.scan(_chunk_step, carry, inputs(0, N, C))                 # out [N, B, H, G, C, Dv]
    outs = [jnp.moveaxis(out, (0, 4), (1, 2)).reshape(B, N * C, H, G, Dv)]
    if tail:
        carry, last = _chunk_step(carry, tuple(a[0] for a in inputs(N * C, 1, tail)))
        outs.append(jnp.moveaxis(last, 3, 1))
    memory, momentum, base = carry
    state = NeuralMemoryState(memory, momentum, base, jnp.asarray(T, jnp.int32))
    return jnp.concatenate(outs, axis=1) if tail else outs[0], state


__all__ = ["NeuralMemoryState", "neural_memory", "neural_memory_reference", "neural_memory_step",
           "neural_memory_init_state", "segment_products"]
