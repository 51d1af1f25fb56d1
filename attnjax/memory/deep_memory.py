"""Titans' deep neural long-term memory: a per-head MLP trained at test time by gradient descent with momentum and
weight decay (Behrouz, Zhong and Mirrokni, "Titans: Learning to Memorize at Test Time", 2025, Sections 3.1-3.2),
with Miras' attentional biases and retention gates (``attnjax.memory.miras``).

Per head the memory is an MLP ``M_W`` of depth L ≥ 1 (Titans: "MLPs with L_M ≥ 1 layers"; deep memory is L ≥ 2)::

    M_W(x) = x + W_L·σ(… σ(W_1·x))          (``MemoryMLP(residual=True)``, the default)
    M_W(x) =     W_L·σ(… σ(W_1·x))          (``MemoryMLP(residual=False)``, the plain MLP)

The residual form with L = 2 is Miras' memory ``M(x) = x + W_1 σ(W_2 x)`` (Section 5; GELU, expansion 4) and
lucidrains/titans-pytorch's default (``MemoryMLP`` wrapped in ``ResidualNorm``); the LayerNorm both put on the
branch is left out here (a module may normalize its output). Weights are row-vector matrices: ``W_l [d_in, d_out]``,
``x·W_l``.

The memory carries a state ``P`` (a tuple of ``[B, H, d_in, d_out]`` matrices) and a momentum ``U`` of the same
layout; the MLP's weights are ``W = ψ(P)`` for the retention gate's map ψ (identity for Titans' weight decay; the
ℓq-normalized accumulator for Moneta; a softmax of logits for Memora). For token t with key k_t, value v_t, query
q_t and gates θ_t (``lr``), η_t (``momentum``), α_t (``decay``), all per token and head::

    U_t = η_t·U_(t−1) − θ_t·∇_W ℓ(ψ(P_base); k_t, v_t)      (Titans eq. 14, momentum = "surprise")
    P_t = (1 − α_t)·P_(t−1) + U_t                             (Titans eq. 13, forgetting gate α)
    o_t = M_(ψ(P_t))(q_t)                                     (eq. 15's read, after token t's update)

with ``ℓ`` the attentional bias (Titans eq. 12: ``½‖M_W(k) − v‖²``; or Miras' ℓp / Huber). ``P_base`` is the
state before the chunk holding t (Titans Section 3.2, mini-batch gradient descent): chunks of ``chunk_size`` C start
at t = 0, C, 2C, ...; with C = 1 ``P_base = P_(t−1)`` and this is exact online gradient descent (eq. 8 with
momentum and decay). The last chunk may be shorter. These are the conventions of ``attnjax.memory.neural_memory``
(the linear memory): same gate names and shapes, same chunk semantics and state fields.

Paths: ``deep_memory_reference`` is a ``lax.scan`` over tokens whose step takes ``jax.grad`` of the written loss
(``deep_memory_step`` is that step, for decoding). ``deep_memory(..., implementation="xla")`` is the chunk-parallel
form: within a chunk every token's gradient ``g_j`` is taken at the same base weights (one ``jax.vmap`` over the
chunk's tokens, with the bias's closed-form ``∂ℓ/∂pred``), and since the two scalar-gated recurrences are linear in
those gradients, ``P_i = A_i·P_0 + w_i·U_0 − Σ_{j≤i} W_ij·θ_j·g_j`` for every position i of the chunk at once, with
the same C×C gate matrices as the linear memory (``segment_products``: ``W = E·D``, ``A`` and ``w``). A ``lax.scan``
over chunks carries ``(P, U)``. Each token reads the MLP with its own weights ``ψ(P_i)``:

* with the ℓ2 retention (ψ = identity; Titans, Yaad) without forming them: layer l's gradient is the outer product
  ``a_ljᵀ δ_lj`` of its input and the loss gradient at its output, so a query's path through the layer is
  ``a·P_li = A_i·(a·P_l0) + w_i·(a·U_l0) − Σ_{j≤i} W_ij·θ_j·(a·a_lj)·δ_lj``, attention-like sums (the "dual form"
  of TTT, Sun et al. 2024, with Titans' gates). Per head and token O(|W| + C·Σ_l(d_in + d_out)) work.
* with a nonlinear ψ (Moneta's ℓq normalization, Memora's softmax) the per-token gradient pytrees and each token's
  ``P_i`` are formed (einsum with the gate matrix): per head and token O(C·|W|) work and O(C·|W|) live memory
  per chunk (|W| = the number of memory weights).

Where this follows the paper and not lucidrains/titans-pytorch (unofficial; there is no official code): the
gates are per token inside a chunk and each token reads the memory after its own update (that code averages the
chunk into one momentum and one decay gate, sums the chunk's gradients, and reads every token of a chunk from the
memory at the previous chunk's end). Miras' Moneta normalizes its accumulator only at chunk boundaries in its
parallel training and Memora linearizes the softmax inside a chunk behind a "lag" token (Section 5); here both read
the exact ψ of each token's state (see ``miras``), which is the paper's token-by-token rule at C = 1.

States, gates and accumulators are float32; outputs take q's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from attnjax.checks import check_positive, check_qkv, describe
from attnjax.dispatch import dispatch
from attnjax.memory.miras import L2Retention, Objective, Retention, as_objective, as_retention
from attnjax.memory.neural_memory import segment_products
from attnjax.meshes import vary_like

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}
"""The memory MLP's hidden activations σ (GELU, exact: Miras Section 5 and titans-pytorch's ``MemoryMLP``)."""


@dataclasses.dataclass(frozen=True)
class MemoryMLP:
    """The memory's architecture (its weights are a separate tuple): ``M_W(x) = [x +] W_L·σ(… σ(W_1·x))``.

    Attributes:
      activation: σ, a name in ``ACTIVATIONS``.
      residual: add the input (Miras' ``x + W_1 σ(W_2 x)``); needs ``d_in`` of the first layer = ``d_out`` of the last.
    """

    activation: str = "gelu"
    residual: bool = True

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MemoryMLP.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not isinstance(self.residual, bool):
            raise TypeError(f"MemoryMLP.residual must be a bool, got {self.residual!r}")

    def __call__(self, weights: Sequence[jax.Array], x: jax.Array) -> jax.Array:
        """``x [..., d_in] -> [..., d_out]`` with one head's weights ``(W_1 [d_in, d_1], …, W_L [d_(L−1), d_out])``."""
        act = ACTIVATIONS[self.activation]
        h = x
        for i, w in enumerate(weights):
            h = (act(h) if i else h) @ w
        return x + h if self.residual else h


class DeepMemoryState(NamedTuple):
    """The recurrent state of ``deep_memory`` after some tokens (a pytree; batch ``B``, memory heads ``H``).

    Attributes:
      memory: the state ``P`` after the last token: a tuple of float32 ``[B, H, d_in, d_out]``, one per MLP layer
        (the weights themselves with the ℓ2 retention; Moneta's accumulator; Memora's logits).
      momentum: the momentum (surprise) ``U`` after the last token, the same layout.
      base: ``P`` before the chunk holding the last token (where that chunk's gradients are taken).
      position: int32 ``[]``, the number of tokens consumed; token ``position`` opens a chunk when
        ``position % chunk_size == 0``.
    """

    memory: tuple
    momentum: tuple
    base: tuple
    position: jax.Array


def init_memory_mlp(key: jax.Array, heads: int, dim: int, hidden: int, depth: int = 2, *,
                    out_dim: Optional[int] = None) -> tuple:
    """Initial memory weights (learned parameters, shared over the batch): ``depth`` float32 matrices
    ``[heads, d_in, d_out]`` with dims ``dim -> hidden -> ... -> hidden -> out_dim`` (``out_dim`` defaults to
    ``dim``), each Glorot-uniform per head (as titans-pytorch's ``xavier_uniform_``).

    Pass them as ``initial_state`` of ``deep_memory`` (broadcast over the batch) or to ``deep_memory_init_state``.
    With Memora's KL retention they are the initial logits.
    """
    check_positive(heads=heads, dim=dim, hidden=hidden, depth=depth)
    out_dim = dim if out_dim is None else out_dim
    check_positive(out_dim=out_dim)
    dims = (dim, *(hidden,) * (depth - 1), out_dim)
    keys = jax.random.split(key, depth)
    init = jax.nn.initializers.glorot_uniform(in_axis=-2, out_axis=-1, batch_axis=0)
    return tuple(init(kk, (heads, d_in, d_out), jnp.float32) for kk, d_in, d_out in zip(keys, dims[:-1], dims[1:]))


def deep_memory_init_state(initial_state: Sequence[jax.Array], batch: int,
                           initial_momentum: Optional[Sequence[jax.Array]] = None) -> DeepMemoryState:
    """The state at position 0 for ``deep_memory_step`` (e.g. a decode cache): ``memory = base =`` the given
    matrices (``[H, d_in, d_out]``, broadcast over the batch, or ``[B, H, d_in, d_out]``), momentum zeros (or
    ``initial_momentum``)."""
    check_positive(batch=batch)
    memory = _check_memory("initial_state", initial_state, batch)
    momentum = (tuple(jnp.zeros_like(m) for m in memory) if initial_momentum is None
                else _check_memory("initial_momentum", initial_momentum, batch, like=memory))
    return DeepMemoryState(memory, momentum, memory, jnp.zeros((), jnp.int32))


class _Inputs(NamedTuple):
    """Validated float32 operands; query heads grouped by memory head (``G = Hq // H``)."""

    q: jax.Array         # [B, T, H, G, Dk]
    k: jax.Array         # [B, T, H, Dk]
    v: jax.Array         # [B, T, H, Dv]
    lr: jax.Array        # [B, T, H], θ
    eta: jax.Array       # [B, T, H], η
    keep: jax.Array      # [B, T, H], 1 − α
    delta: jax.Array     # [B, T, H], Huber's δ (ones for the other biases, which ignore it)
    state: DeepMemoryState


class _Rule(NamedTuple):
    """The static choices: attentional bias, retention gate, MLP."""

    objective: Objective
    retention: Retention
    mlp: MemoryMLP


def deep_memory(
    q: jax.Array, k: jax.Array, v: jax.Array, lr: jax.Array, momentum: jax.Array, decay: jax.Array,
    initial_state: Sequence[jax.Array], *, initial_momentum: Optional[Sequence[jax.Array]] = None,
    objective: Union[str, Objective] = "l2", retention: Union[str, Retention] = "l2",
    delta: Optional[jax.Array] = None, mlp: MemoryMLP = MemoryMLP(), chunk_size: int = 1,
    return_state: bool = False, implementation: str = "auto",
) -> Union[jax.Array, tuple[jax.Array, DeepMemoryState]]:
    """Titans' deep neural memory with a Miras bias and retention (Behrouz et al. 2025, Titans eqs. 12-15 and
    Section 3.2; Miras eqs. 10, 24, 26, 27; see the module docstring).

    ``U_t = η_t·U_(t−1) − θ_t·∇_W ℓ(ψ(P_base); k_t, v_t)``, ``P_t = (1 − α_t)·P_(t−1) + U_t``,
    ``o_t = M_(ψ(P_t))(q_t)``, where ``P_base`` is the state before token t's chunk (chunks of ``chunk_size``
    from t = 0).

    Args:
      q: ``[B, T, Hq, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``; one float dtype. GQA: ``Hq % H == 0``
        and query head ``h`` reads memory ``h // (Hq // H)`` (memories, keys, values and gates have ``H`` heads).
      lr: θ ``[B, T, H]``, the per-token learning rate (typically ≥ 0).
      momentum: η ``[B, T, H]``, the momentum gate (typically in [0, 1]; 0 is Miras' plain gradient descent).
      decay: α ``[B, T, H]``, the forgetting gate (typically in [0, 1]; the state keeps ``1 − α``).
      initial_state: ``P_(−1)``: a tuple of L matrices, ``[H, d_in, d_out]`` (learned initial weights, shared over
        the batch; e.g. ``init_memory_mlp``) or ``[B, H, d_in, d_out]`` (a running state's ``memory``). The first
        ``d_in`` is Dk and the last ``d_out`` is Dv.
      initial_momentum: ``U_(−1)``, the same layout (zeros if None).
      objective: the attentional bias: "l2" (Titans), "lp" (Moneta, p = 3), "huber" (Yaad) or an instance of
        ``miras.L2Bias`` / ``LpBias`` / ``HuberBias``.
      retention: the retention gate: "l2" (Titans' weight decay), "lq" (Moneta, q = 4), "kl" (Memora) or an
        instance of ``miras.L2Retention`` / ``LqRetention`` / ``KLRetention``.
      delta: Huber's threshold δ ``[B, T, H]`` (> 0; data-dependent in Yaad), required by the Huber bias only.
      mlp: the memory's ``MemoryMLP`` (activation, residual).
      chunk_size: C, the mini-batch of Titans Section 3.2: the tokens of a chunk take their gradients at the state
        before the chunk. 1 is exact online gradient descent; larger C changes the result (it is part of the
        model). Chunks start at t = 0, C, 2C, ...; the last one may be shorter.
      return_state: also return the ``DeepMemoryState`` after token T−1. To continue a sequence in a second call
        pass its ``memory`` and ``momentum`` as ``initial_state`` / ``initial_momentum`` (equal to one call when
        this call's T is a multiple of C, since the next call's chunks start at its own t = 0); or continue token
        by token with ``deep_memory_step`` (always equal: the state keeps the chunk base and position).
      implementation: "reference" (``deep_memory_reference``: a scan over tokens, T sequential steps of one
        gradient and one read each), "xla" (chunk-parallel: a scan over T/C chunks; per head and token
        O(|W| + C·Σ_l(d_in + d_out)) work with the ℓ2 retention and O(C·|W|) with Moneta's or Memora's (|W| = the
        number of memory weights; see the module docstring), each chunk recomputed in the backward pass
        (``jax.checkpoint``) so that only the chunk states are stored) or "auto" (xla).
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype, or ``(out, DeepMemoryState)`` (float32) with ``return_state``.
    """
    x, rule = _prepare(q, k, v, lr, momentum, decay, initial_state, initial_momentum, objective, retention, delta,
                       mlp, chunk_size)
    paths = {"reference": lambda: _reference(x, rule, chunk_size), "xla": lambda: _chunked(x, rule, chunk_size)}
    out, state = dispatch(paths, implementation, what="deep_memory")
    out = out.reshape(*q.shape[:3], v.shape[-1]).astype(q.dtype)
    return (out, state) if return_state else out


def deep_memory_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, lr: jax.Array, momentum: jax.Array, decay: jax.Array,
    initial_state: Sequence[jax.Array], *, initial_momentum: Optional[Sequence[jax.Array]] = None,
    objective: Union[str, Objective] = "l2", retention: Union[str, Retention] = "l2",
    delta: Optional[jax.Array] = None, mlp: MemoryMLP = MemoryMLP(), chunk_size: int = 1,
    return_state: bool = False,
) -> Union[jax.Array, tuple[jax.Array, DeepMemoryState]]:
    """The token-by-token definition of ``deep_memory`` (Titans, Behrouz et al. 2025, eqs. 12-15 with Section
    3.2's chunk base; Miras' biases and retention gates): a ``lax.scan`` over t carrying ``(P, U, P_base,
    position)``, with ``P_base ← P_(t−1)`` where t opens a chunk (``t % chunk_size == 0``), then
    ``g = jax.grad(W ↦ ℓ(M_W(k_t), v_t))(ψ(P_base))``, ``U ← η_t·U − θ_t·g``, ``P ← (1 − α_t)·P + U``,
    ``o_t = M_(ψ(P))(q_t)``. Arguments and returns as in ``deep_memory``."""
    return deep_memory(q, k, v, lr, momentum, decay, initial_state, initial_momentum=initial_momentum,
                       objective=objective, retention=retention, delta=delta, mlp=mlp, chunk_size=chunk_size,
                       return_state=return_state, implementation="reference")


def deep_memory_step(
    q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, lr_t: jax.Array, momentum_t: jax.Array, decay_t: jax.Array,
    state: DeepMemoryState, *, objective: Union[str, Objective] = "l2", retention: Union[str, Retention] = "l2",
    delta_t: Optional[jax.Array] = None, mlp: MemoryMLP = MemoryMLP(), chunk_size: int = 1,
) -> tuple[jax.Array, DeepMemoryState]:
    """One token of ``deep_memory_reference`` (Titans eqs. 13-15 with a Miras bias and retention), for decoding.

    At ``state.position % chunk_size == 0`` the token opens a chunk (``base ← memory``); then
    ``U ← η·U − θ·∇_W ℓ(ψ(base); k, v)``, ``P ← (1 − α)·P + U``, ``o = M_(ψ(P))(q)``. Stepping from
    ``deep_memory_init_state`` (or from the state a ``deep_memory(..., return_state=True)`` call returned with the
    same ``chunk_size``) reproduces the parallel call token by token, for any chunk size.

    Args:
      q_t: ``[B, Hq, Dk]``; k_t: ``[B, H, Dk]``; v_t: ``[B, H, Dv]``; ``Hq % H == 0`` (GQA as in ``deep_memory``).
      lr_t, momentum_t, decay_t: θ, η, α ``[B, H]``.
      state: a ``DeepMemoryState`` with ``[B, H, d_in, d_out]`` matrices.
      objective, retention, mlp, chunk_size: as in ``deep_memory``.
      delta_t: Huber's δ ``[B, H]`` (Huber bias only).
    Returns:
      ``(o_t [B, Hq, Dv] in q_t's dtype, the next DeepMemoryState)``.
    """
    for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if getattr(t, "ndim", None) != 3:
            raise ValueError(f"{name} must have shape [batch, heads, dim], got {describe(t)}")
    check_qkv(q_t[:, None], k_t[:, None], v_t[:, None])
    check_positive(chunk_size=chunk_size)
    rule = _rule(objective, retention, mlp)
    B, Hq, Dk = q_t.shape
    H, Dv = k_t.shape[1], v_t.shape[2]
    gates = [_check_float(name, g, (B, H), "[B, H]") for name, g in
             (("lr_t", lr_t), ("momentum_t", momentum_t), ("decay_t", decay_t))]
    delta_t = _check_delta("delta_t", delta_t, rule.objective, (B, H), "[B, H]")
    if not isinstance(state, DeepMemoryState):
        raise TypeError(f"state must be a DeepMemoryState (see deep_memory_init_state), got {type(state).__name__}")
    memory = _check_memory("state.memory", state.memory, B, heads=H, dims=(Dk, Dv), mlp=rule.mlp)
    momentum = _check_memory("state.momentum", state.momentum, B, like=memory)
    base = _check_memory("state.base", state.base, B, like=memory)
    if jnp.shape(state.position) != ():
        raise ValueError(f"state.position must be a scalar int, got {describe(state.position)}")
    state = DeepMemoryState(memory, momentum, base, jnp.asarray(state.position, jnp.int32))
    inputs = (q_t.astype(jnp.float32).reshape(B, H, Hq // H, Dk), k_t.astype(jnp.float32),
              v_t.astype(jnp.float32), gates[0], gates[1], 1.0 - gates[2], delta_t)
    state, o = _token_step(state, inputs, rule, chunk_size)
    return o.reshape(B, Hq, Dv).astype(q_t.dtype), state


def deep_memory_read(q: jax.Array, memory: Union[Sequence[jax.Array], DeepMemoryState], *,
                     retention: Union[str, Retention] = "l2", mlp: MemoryMLP = MemoryMLP()) -> jax.Array:
    """Read a memory without writing to it: ``o_t = M_(ψ(P))(q_t)`` for every t (Titans eq. 15, ``y = M*(q)``;
    MAC reads the memory this way before a segment updates it).

    Args:
      q: ``[B, T, Hq, Dk]``, ``Hq`` a multiple of the memory's H.
      memory: a ``DeepMemoryState`` (its ``memory``), or the matrices ``[H, d_in, d_out]`` / ``[B, H, d_in, d_out]``.
      retention, mlp: as in ``deep_memory`` (ψ and the architecture).
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    if getattr(q, "ndim", None) != 4:
        raise ValueError(f"q must have shape [batch, seq, heads, dim], got {describe(q)}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q must be a floating-point array, got dtype {q.dtype}")
    if not isinstance(mlp, MemoryMLP):
        raise TypeError(f"mlp must be a MemoryMLP, got {type(mlp).__name__}")
    retention = as_retention(retention)
    name = "memory"
    if isinstance(memory, DeepMemoryState):
        name, memory = "memory.memory", memory.memory
    B, T, Hq, Dk = q.shape
    leaves = _check_memory(name, memory, B, dims=(Dk, None), mlp=mlp)
    H = leaves[0].shape[1]
    if Hq % H:
        raise ValueError(f"q heads ({Hq}) must be a multiple of the memory's heads ({H}): q {q.shape}, "
                         f"{name}[0] {leaves[0].shape}")
    weights = tuple(retention.weights(m) for m in leaves)
    qg = q.astype(jnp.float32).reshape(B, T, H, Hq // H, Dk).transpose(0, 2, 1, 3, 4)     # [B, H, T, G, Dk]
    out = _per_head(mlp)(weights, qg)                                      # [B, H, T, G, Dv]
    return out.transpose(0, 2, 1, 3, 4).reshape(B, T, Hq, -1).astype(q.dtype)


def _rule(objective, retention, mlp) -> _Rule:
    if not isinstance(mlp, MemoryMLP):
        raise TypeError(f"mlp must be a MemoryMLP, got {type(mlp).__name__}")
    return _Rule(as_objective(objective), as_retention(retention), mlp)


def _check_float(name: str, x, shape: tuple, layout: str) -> jax.Array:
    """``x`` as float32; ``ValueError`` unless it has ``shape``, ``TypeError`` unless it is floating-point."""
    if getattr(x, "shape", None) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {describe(x)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x.astype(jnp.float32)


def _check_delta(name: str, delta, objective: Objective, shape: tuple, layout: str) -> jax.Array:
    """Huber's δ as float32 (ones for a bias that takes none)."""
    if objective.needs_delta:
        if delta is None:
            raise ValueError(f"the {type(objective).__name__} objective needs {name}, a float {layout} = {shape} "
                             "threshold")
        return _check_float(name, delta, shape, layout)
    if delta is not None:
        raise ValueError(f"{name} is only used by the Huber objective, got it with {type(objective).__name__}")
    return jnp.ones(shape, jnp.float32)


def _check_memory(name: str, tree, batch: int, *, heads: Optional[int] = None, dims: tuple = (None, None),
                  mlp: Optional[MemoryMLP] = None, like: Optional[tuple] = None) -> tuple:
    """Memory matrices as a tuple of float32 ``[B, H, d_in, d_out]`` (``[H, ...]`` leaves broadcast over the batch).

    Checks that consecutive layers chain (``d_out`` of one = ``d_in`` of the next), ``heads``, the outer dims
    ``(Dk, Dv)`` where given, a residual MLP's ``Dk = Dv``, or the exact layout of ``like``.
    """
    if not isinstance(tree, (tuple, list)) or not tree:
        raise TypeError(f"{name} must be a non-empty tuple of [H, d_in, d_out] or [B, H, d_in, d_out] arrays (one "
                        f"per MLP layer, e.g. init_memory_mlp), got {type(tree).__name__}")
    shapes = [getattr(m, "shape", None) for m in tree]
    for i, m in enumerate(tree):
        if getattr(m, "ndim", None) not in (3, 4):
            raise ValueError(f"{name}[{i}] must have shape [H, d_in, d_out] or [B, H, d_in, d_out], got {describe(m)}")
        if not jnp.issubdtype(m.dtype, jnp.floating):
            raise TypeError(f"{name}[{i}] must be a floating-point array, got dtype {m.dtype}")
    if len({len(s) for s in shapes}) != 1:
        raise ValueError(f"{name} mixes [H, ...] and [B, H, ...] matrices: shapes {shapes}")
    if len(shapes[0]) == 4 and shapes[0][0] != batch:
        raise ValueError(f"{name} has batch {shapes[0][0]}, expected {batch}: shapes {shapes}")
    leaves = tuple(jnp.broadcast_to(m.astype(jnp.float32), (batch, *m.shape[-3:])) for m in tree)
    if like is not None:
        expected = [m.shape for m in like]
        if [m.shape for m in leaves] != expected:
            raise ValueError(f"{name} must match the memory's layout {expected} (batch included), got shapes {shapes}")
        return leaves
    H = leaves[0].shape[1]
    for i in range(len(leaves)):
        if leaves[i].shape[1] != H:
            raise ValueError(f"{name} layers disagree on heads: shapes {shapes}")
        if i and leaves[i].shape[2] != leaves[i - 1].shape[3]:
            raise ValueError(f"{name}[{i}] d_in {leaves[i].shape[2]} != {name}[{i - 1}] d_out "
                             f"{leaves[i - 1].shape[3]}: shapes {shapes}")
    if heads is not None and H != heads:
        raise ValueError(f"{name} has {H} heads, expected {heads} (k's heads): shapes {shapes}")
    d_in, d_out = leaves[0].shape[2], leaves[-1].shape[3]
    for what, want, got in (("first d_in", dims[0], d_in), ("last d_out", dims[1], d_out)):
        if want is not None and want != got:
            raise ValueError(f"{name}'s {what} must be {'Dk' if what[0] == 'f' else 'Dv'} = {want}, got {got}: "
                             f"shapes {shapes}")
    if mlp is not None and mlp.residual and d_in != d_out:
        raise ValueError(f"a residual MemoryMLP needs the first d_in = last d_out, got {d_in} and {d_out}: {name} "
                         f"shapes {shapes} (use MemoryMLP(residual=False) for Dk != Dv)")
    return leaves


def _prepare(q, k, v, lr, momentum, decay, initial_state, initial_momentum, objective, retention, delta, mlp,
             chunk_size) -> tuple[_Inputs, _Rule]:
    """Validate the arguments of ``deep_memory`` and cast to float32, grouping query heads."""
    check_qkv(q, k, v)
    check_positive(chunk_size=chunk_size)
    rule = _rule(objective, retention, mlp)
    B, T, Hq, Dk = q.shape
    H, Dv = k.shape[2], v.shape[3]
    if k.shape[1] != T:
        raise ValueError(f"q and k must have the same seq length (a causal memory), got q {q.shape}, k {k.shape}")
    if T == 0:
        raise ValueError(f"deep_memory needs at least one token, got q {q.shape}")
    gates = [_check_float(name, g, (B, T, H), "[B, T, H]") for name, g in
             (("lr", lr), ("momentum", momentum), ("decay", decay))]
    delta = _check_delta("delta", delta, rule.objective, (B, T, H), "[B, T, H]")
    memory = _check_memory("initial_state", initial_state, B, heads=H, dims=(Dk, Dv), mlp=rule.mlp)
    moment = (tuple(jnp.zeros_like(m) for m in memory) if initial_momentum is None
              else _check_memory("initial_momentum", initial_momentum, B, like=memory))
    state = DeepMemoryState(memory, moment, memory, jnp.zeros((), jnp.int32))
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    x = _Inputs(f32(q).reshape(B, T, H, Hq // H, Dk), f32(k), f32(v), gates[0], gates[1], 1.0 - gates[2], delta,
                state)
    return x, rule


def _per_head(fn):
    """``fn`` on one head's weights, mapped over the ``[B, H]`` leading axes of every argument."""
    return jax.vmap(jax.vmap(fn))


def _gated(gate: jax.Array, leaf: jax.Array) -> jax.Array:
    """``gate [..., ] * leaf [..., d_in, d_out]``."""
    return gate[..., None, None] * leaf


def _token_step(state: DeepMemoryState, inputs, rule: _Rule, chunk_size: int):
    """One token on float32 ``[B, H, ...]`` inputs; returns ``(state, o [B, H, G, Dv])``."""
    q, k, v, lr, eta, keep, delta = inputs
    memory, momentum, base, position = state
    opens = position % chunk_size == 0
    base = tuple(jnp.where(opens, m, b) for m, b in zip(memory, base))

    def loss_grad(p, k, v, delta):
        weights = tuple(rule.retention.weights(m) for m in p)
        return jax.grad(lambda w: rule.objective.loss(rule.mlp(w, k), v, delta))(weights)

    grads = _per_head(loss_grad)(base, k, v, delta)
    momentum = tuple(_gated(eta, u) - _gated(lr, g) for u, g in zip(momentum, grads))
    memory = tuple(_gated(keep, m) + u for m, u in zip(memory, momentum))
    read = lambda p, q: rule.mlp(tuple(rule.retention.weights(m) for m in p), q)  # noqa: E731
    o = _per_head(read)(memory, q)
    return DeepMemoryState(memory, momentum, base, position + 1), o


def _reference(x: _Inputs, rule: _Rule, chunk_size: int):
    """``lax.scan`` of ``_token_step`` over t; returns ``(out [B, T, H, G, Dv], state)``."""
    xs = tuple(a.swapaxes(0, 1) for a in (x.q, x.k, x.v, x.lr, x.eta, x.keep, x.delta))
    state0 = vary_like(x.state, *xs)
    state, out = jax.lax.scan(lambda s, i: _token_step(s, i, rule, chunk_size), state0, xs)
    return out.swapaxes(0, 1), state


def _chunk_step(carry, inputs, rule: _Rule):
    """One chunk of the parallel form for any retention (shapes ``[B, H, ...]``, c = the chunk's length): the
    per-token gradient pytrees and each token's state ``P_i`` are formed, and each token reads ``ψ(P_i)``.

    Carry ``(P_0, U_0, base)``; inputs: q ``[B, H, c, G, Dk]``, k ``[B, H, c, Dk]``, v ``[B, H, c, Dv]``, θ and δ
    ``[B, H, c]``, the gate matrix ``W = E·D`` ``[B, H, c, c]``, the rows ``A``, ``w`` ``[B, H, c]``, the chunk-end
    row ``D_(c−1)`` ``[B, H, c]``, ``P_(c−1) = Π η`` ``[B, H]`` and ``last`` (int ``[]``), the chunk's last real
    token (c − 1 but in a padded last chunk).
    """
    p0, u0, _ = carry
    q, k, v, lr, delta, weights_ij, a_row, w_row, d_end, p_end, last = inputs

    def token_grads(p, k, v, delta):
        """Per-token ``∇_W ℓ(ψ(p); k_j, v_j)`` at one head's base, ``[c, d_in, d_out]`` leaves."""
        weights = tuple(rule.retention.weights(m) for m in p)

        def one(k, v, delta):
            pred, pull = jax.vjp(lambda w: rule.mlp(w, k), weights)
            return pull(rule.objective.grad(pred, v, delta))[0]

        return jax.vmap(one)(k, v, delta)

    r = tuple(_gated(lr, g) for g in _per_head(token_grads)(p0, k, v, delta))       # θ_j g_j [B, H, c, ...]
    p_all = tuple(_gated(a_row, m[:, :, None]) + _gated(w_row, u[:, :, None])
                  - jnp.einsum("bhij,bhjxy->bhixy", weights_ij, rj)
                  for m, u, rj in zip(p0, u0, r))                                     # P_i [B, H, c, ...]
    read = lambda p, q: rule.mlp(tuple(rule.retention.weights(m) for m in p), q)  # noqa: E731
    out = _per_head(jax.vmap(read))(p_all, q)                                         # [B, H, c, G, Dv]
    p1 = tuple(jax.lax.dynamic_index_in_dim(m, last, axis=2, keepdims=False) for m in p_all)
    u1 = tuple(_gated(p_end, u) - jnp.einsum("bhj,bhjxy->bhxy", d_end, rj) for u, rj in zip(u0, r))
    return (p1, u1, p0), out


def _dual_chunk_step(carry, inputs, rule: _Rule):
    """``_chunk_step`` for the ℓ2 retention (ψ = identity) without per-token weights (TTT's dual form).

    Every per-token gradient of layer l is the outer product ``a_ljᵀ δ_lj`` of the layer's input ``a_lj`` and the
    loss gradient ``δ_lj`` at its output (both at the base weights), so the query path through ``P_li`` is
    ``a·P_li = A_i·(a·P_l0) + w_i·(a·U_l0) − Σ_{j≤i} W_ij·θ_j·(a·a_lj)·δ_lj``: per token and layer O(c·(d_in + d_out))
    plus the base terms, and the chunk-end state is one sum of c outer products per layer.
    """
    p0, u0, _ = carry
    q, k, v, lr, delta, weights_ij, a_row, w_row, d_end, p_end, last = inputs
    act = ACTIVATIONS[rule.mlp.activation]

    def head(p0, u0, q, k, v, lr, delta, weights_ij, a_row, w_row, d_end, p_end):
        """One head: p0, u0 ``[d_in, d_out]`` matrices, q ``[c, G, Dk]``, k ``[c, Dk]``, v ``[c, Dv]``, θ, δ ``[c]``."""
        inputs, outs, h = [], [], k
        for i, w in enumerate(p0):                                                 # the keys' forward pass
            inputs.append(act(h) if i else h)
            h = inputs[-1] @ w
            outs.append(h)
        pred = k + h if rule.mlp.residual else h
        grads = [rule.objective.grad(pred, v, delta)]                              # δ_L = ∂ℓ/∂pred
        for i in range(len(p0) - 1, 0, -1):                                        # δ_(l−1) from δ_l
            _, pull = jax.vjp(lambda h, w=p0[i]: act(h) @ w, outs[i - 1])
            grads.insert(0, pull(grads[0])[0])
        r = [lr[:, None] * g for g in grads]                                       # θ_j δ_lj
        h = q
        for i, (m, u) in enumerate(zip(p0, u0)):                                   # the queries, layer by layer
            a = act(h) if i else h                                                 # [c, G, d_in]
            scores = jnp.einsum("igx,jx->igj", a, inputs[i]) * weights_ij[:, None, :]
            h = (a_row[:, None, None] * (a @ m) + w_row[:, None, None] * (a @ u)
                 - jnp.einsum("igj,jy->igy", scores, r[i]))
        out = q + h if rule.mlp.residual else h
        row = jax.lax.dynamic_index_in_dim(weights_ij, last, keepdims=False)
        a_last = jax.lax.dynamic_index_in_dim(a_row, last, keepdims=False)
        w_last = jax.lax.dynamic_index_in_dim(w_row, last, keepdims=False)
        p1 = tuple(a_last * m + w_last * u - jnp.einsum("jx,jy->xy", x * row[:, None], ri)
                   for m, u, x, ri in zip(p0, u0, inputs, r))
        u1 = tuple(p_end * u - jnp.einsum("jx,jy->xy", x * d_end[:, None], ri) for u, x, ri in zip(u0, inputs, r))
        return p1, u1, out

    p1, u1, out = _per_head(head)(p0, u0, q, k, v, lr, delta, weights_ij, a_row, w_row, d_end, p_end)
    return (p1, u1, p0), out


def _chunk_inputs(q, k, v, lr, eta, keep, delta, last):
    """The scan inputs of ``_chunk_step`` for chunks laid out ``[N, B, H, c, ...]`` (``last`` ``[N]``)."""
    decay_w = segment_products(keep)                                               # E [N, B, H, c, c]
    mom_w = segment_products(eta)                                                  # D
    weights = jnp.einsum("...il,...lj->...ij", decay_w, mom_w)                     # W = E·D
    p_row = jnp.cumprod(eta, axis=-1)                                              # P_i = Π_{m≤i} η_m
    a_row = jnp.cumprod(keep, axis=-1)                                             # A_i = Π_{m≤i} (1 − α_m)
    w_row = jnp.einsum("...il,...l->...i", decay_w, p_row)                         # w = E·P
    return q, k, v, lr, delta, weights, a_row, w_row, mom_w[..., -1, :], p_row[..., -1], last


def _chunked(x: _Inputs, rule: _Rule, chunk_size: int):
    """``lax.scan`` of ``_chunk_step`` (recomputed in the backward pass) over the chunks. A shorter last chunk is
    padded with tokens whose outputs are dropped and whose gates (θ = 0, η = 1) leave the momentum as it is, so the
    chunk-end momentum rows are those of the last real token; the state ``P`` is taken at that token."""
    B, T, H, G, Dk = x.q.shape
    Dv = x.v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    body = _dual_chunk_step if isinstance(rule.retention, L2Retention) else _chunk_step
    step = jax.checkpoint(functools.partial(body, rule=rule))

    def chunks(a, fill):
        """``[B, T, H, ...]`` -> ``[N, B, H, C, ...]``, padded with ``fill``."""
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
        return jnp.moveaxis(a.reshape(B, N, C, *a.shape[2:]), (1, 2), (0, 3))

    fills = ((x.q, 0.0), (x.k, 0.0), (x.v, 0.0), (x.lr, 0.0), (x.eta, 1.0), (x.keep, 1.0), (x.delta, 1.0))
    carry = vary_like((x.state.memory, x.state.momentum, x.state.base), x.q, x.k, x.v, x.lr, x.eta, x.keep)
    last = jnp.full((N,), C - 1, jnp.int32).at[-1].add(-pad)
    (memory, momentum, base), out = jax.lax.scan(step, carry,
                                                 _chunk_inputs(*(chunks(a, f) for a, f in fills), last))
    out = jnp.moveaxis(out, (0, 3), (1, 2)).reshape(B, N * C, H, G, Dv)[:, :T]      # from [N, B, H, C, G, Dv]
    return out, DeepMemoryState(memory, momentum, base, jnp.asarray(T, jnp.int32))


__all__ = ["ACTIVATIONS", "MemoryMLP", "DeepMemoryState", "init_memory_mlp", "deep_memory_init_state", "deep_memory",
           "deep_memory_reference", "deep_memory_step", "deep_memory_read"]
