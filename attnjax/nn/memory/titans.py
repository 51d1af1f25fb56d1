"""Titans as Flax NNX token mixers (Behrouz, Zhong and Mirrokni, "Titans: Learning to Memorize at Test Time",
arXiv:2501.00663, 2025): the neural long-term memory layer (``NeuralMemoryLayer``, Sections 3 and 4.4) and the
three ways of combining it with attention, memory as a context (``TitansMAC``, Sec. 4.1), as a gate
(``TitansMAG``, Sec. 4.2) and as a layer (``TitansMAL``, Sec. 4.3), each with persistent memory tokens (Sec. 3.3,
eq. 19).

**The memory layer** (LMM). For tokens ``x [T, d_model]`` (with ``N_p`` persistent tokens prepended when
``num_persistent > 0``, eq. 19):

    q_t, k_t, v_t = SiLU(conv(x W_Q))_t, SiLU(conv(x W_K))_t, SiLU(conv(x W_V))_t     (eqs. 11, 15; Sec. 4.4)
    q_t ← q_t / ‖q_t‖₂,  k_t ← k_t / ‖k_t‖₂                                             (Sec. 4.4)
    θ_t = θ_max·σ(x_t w_θ + b_θ),  η_t = σ(x_t w_η + b_η),  α_t = σ(x_t w_α + b_α)     (per head; eqs. 13-14)
    S_t = η_t S_(t−1) − θ_t ∇ℓ(M_base; k_t, v_t),  M_t = (1 − α_t) M_(t−1) + S_t        (eqs. 12-14)
    o_t = M_t(q_t)                                                                       (eq. 15)
    y_t = W_O (RMSNorm(o_t) ⊙ SiLU(x_t W_G))                                             (Sec. 4.4, "Gating")

``conv`` is a causal depthwise 1-D convolution over time of width ``conv_size`` (Sec. 4.4, "Convolution"; one per
channel of q, k and v, no bias). ``M_base`` is the memory before the chunk of ``chunk_size`` tokens holding token
t (Section 3.2's mini-batch gradient descent, chunks from the first token). The memory ``M`` and its rule are
chosen by ``memory=`` (``MEMORIES`` or a ``MemoryConfig``): Titans' linear matrix memory
(``attnjax.memory.neural_memory``, zero at the start), Titans' deep MLP memory, or Miras' Moneta, Yaad and
Memora (``attnjax.memory.deep_memory`` with ``attnjax.memory.miras``; the MLP's initial weights are learned).

What the paper leaves open and is chosen here: the order projection → convolution → SiLU → ℓ2 norm (as in the
recurrent models the paper cites for the convolution); the gates' parametrization (a sigmoid of a per-head
linear map of x, the paper's ranges α, η ∈ [0, 1], θ ≥ 0, with ``θ_max = max_lr``; biases start at
``b_θ = b_η = 0`` and ``b_α = −4``, so that the memory starts by keeping what it stores); the output gate's
nonlinearity (SiLU) and a per-head RMSNorm. lucidrains/titans-pytorch (unofficial; no official code is
public) differs: it RMS-normalizes x before the projections instead of normalizing q and k, has no convolution,
shares the momentum and decay gates over a chunk (from the chunk's mean token), and reads every token of a chunk
from the memory at the previous chunk's end; here every gate is per token and each token reads the memory after
its own update (the paper: "we make these parameters as the functions of tokens", Sec. 3.2).

**The variants.** Every variant owns a ``NeuralMemoryLayer`` (projections, convolution, data-dependent gates,
the memory chosen by ``memory=``, its gated output projection), attention projections (``attention_projections``,
GQA through ``num_kv_heads``) and ``N_p`` persistent tokens ``P = [p_1 … p_Np]`` (learnable ``[N_p, d_model]``).
Attention is ``attnjax.attention`` (softmax). The combination ``⊗`` of eqs. 25 and 28 is, as the paper describes
its experiments for MAG, the two outputs normalized with learnable vector-valued weights and a nonlinearity:
``y ⊗ m = RMSNorm_y(y) ⊙ σ(RMSNorm_m(m))`` (σ the sigmoid, on the memory branch, as titans-pytorch's
attention-output gating by the memory). Residual connections and pre-norms are the surrounding block's.

No positional encoding is applied (the paper names none; order comes from the causal masks and the memory's
convolution and recurrence). lucidrains/titans-pytorch (unofficial; no official code is public) builds MAC
differently: learned long-term memory tokens are interleaved into each segment, the memory reads and writes the
layer input (not the attention output) and its read is added to the residual stream or gates the attention
output; it has no MAG or MAL. The variants here follow the paper's equations.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.api import attention
from attnjax.memory.deep_memory import (DeepMemoryState, MemoryMLP, deep_memory, deep_memory_read,
                                        deep_memory_step, init_memory_mlp)
from attnjax.memory.miras import (HuberBias, KLRetention, L2Bias, L2Retention, LpBias, LqRetention, Objective,
                                  Retention, as_objective, as_retention)
from attnjax.memory.neural_memory import NeuralMemoryState, neural_memory, neural_memory_step
from attnjax.nn.attention import KVCache, attention_projections
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_causal_mask, check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module

PAPER = "Behrouz, Zhong and Mirrokni 2025 (Titans: Learning to Memorize at Test Time)"

IMPLEMENTATIONS = ("auto", "reference", "xla")
"""Paths of the memory core: "reference" (a scan over tokens), "xla" (chunk-parallel; what "auto" picks)."""

GATE_BIAS_INIT = {"lr": 0.0, "momentum": 0.0, "decay": -4.0, "delta": 0.0}
"""Initial biases of the gate logits (the paper gives none): θ = θ_max/2, η = 1/2, α = σ(−4) ≈ 0.018, and for
Yaad's Huber threshold δ = softplus(0) ≈ 0.69."""


def _check_count(**values) -> None:
    """``ValueError`` unless every value is a non-negative int."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Which neural memory a Titans layer trains at test time (Titans Sections 3.1-3.2; Miras Section 5).

    Attributes:
      depth: 1 is Titans' linear matrix memory ``M(k) = k·W`` (``attnjax.memory.neural_memory``, starting from
        zero); ``≥ 2`` is an MLP memory of that many layers (``attnjax.memory.deep_memory``, its initial
        weights learned parameters, Glorot-initialized).
      expansion: the MLP's hidden width is ``expansion·head_dim`` (Miras and titans-pytorch: 4).
      activation: the MLP's σ (``attnjax.memory.deep_memory.ACTIVATIONS``).
      residual: the MLP is ``x + MLP(x)`` (Miras' ``M(x) = x + W_1 σ(W_2 x)``) or plain.
      objective: the attentional bias (``miras``: "l2" (Titans eq. 12), "lp", "huber", or an instance).
      retention: the retention gate (``miras``: "l2" (Titans' weight decay, eq. 13), "lq", "kl", or an instance).
      momentum: learn a momentum gate η (Titans eq. 14); without it η = 0, plain gradient descent (Miras'
        Moneta, Yaad and Memora).
    """

    depth: int = 1
    expansion: float = 4.0
    activation: str = "gelu"
    residual: bool = True
    objective: Union[str, Objective] = "l2"
    retention: Union[str, Retention] = "l2"
    momentum: bool = True

    def __post_init__(self):
        check_positive(depth=self.depth)
        if not isinstance(self.expansion, (int, float)) or isinstance(self.expansion, bool) or self.expansion <= 0:
            raise ValueError(f"MemoryConfig.expansion must be a positive number, got {self.expansion!r}")
        object.__setattr__(self, "objective", as_objective(self.objective))
        object.__setattr__(self, "retention", as_retention(self.retention))
        MemoryMLP(self.activation, self.residual)
        if self.depth == 1 and not (isinstance(self.objective, L2Bias) and isinstance(self.retention, L2Retention)):
            raise ValueError("a depth-1 memory is Titans' linear matrix memory (l2 objective, l2 retention); Miras' "
                             f"objectives and retention gates need depth >= 2, got objective {self.objective}, "
                             f"retention {self.retention}")

    @property
    def linear(self) -> bool:
        """Titans' matrix memory, run by ``neural_memory``'s closed-form chunk sums."""
        return self.depth == 1

    @property
    def mlp(self) -> MemoryMLP:
        """The deep memory's architecture."""
        return MemoryMLP(self.activation, self.residual)


MEMORIES = {
    "titans_linear": MemoryConfig(depth=1),
    "titans_deep": MemoryConfig(depth=2),
    "moneta": MemoryConfig(depth=2, objective=LpBias(3.0), retention=LqRetention(4.0), momentum=False),
    "yaad": MemoryConfig(depth=2, objective=HuberBias(), momentum=False),
    "memora": MemoryConfig(depth=2, retention=KLRetention(), momentum=False),
}
"""Named memories: Titans' linear and deep (2-layer residual GELU MLP, expansion 4) memories with momentum, and
Miras' Moneta (ℓ3 bias, ℓ4 retention), Yaad (Huber bias with a data-dependent δ_t) and Memora (KL retention),
each a 2-layer MLP trained by plain gradient descent (Miras Section 5)."""


def as_memory(memory: Union[str, MemoryConfig]) -> MemoryConfig:
    """A ``MemoryConfig`` from a name in ``MEMORIES`` or an instance."""
    if isinstance(memory, MemoryConfig):
        return memory
    if isinstance(memory, str) and memory in MEMORIES:
        return MEMORIES[memory]
    raise ValueError(f"memory must be one of {sorted(MEMORIES)} or a MemoryConfig, got {memory!r}")


def prepend_persistent(tokens: jax.Array, x: jax.Array) -> jax.Array:
    """``[p_1 … p_Np] ‖ x`` (Titans eq. 19): learnable tokens ``[N_p, d]`` before every sequence of ``x [B, T, d]``,
    in x's dtype."""
    prefix = jnp.broadcast_to(tokens.astype(x.dtype), (x.shape[0], *tokens.shape))
    return jnp.concatenate([prefix, x], axis=1)


class MemoryGates(NamedTuple):
    """The data-dependent gates of the memory's update, float32 ``[B, T, H]``: θ (``lr``), η (``momentum``),
    α (``decay``), and Yaad's Huber threshold δ (``delta``; None for the other objectives)."""

    lr: jax.Array
    momentum: jax.Array
    decay: jax.Array
    delta: Optional[jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class NeuralMemoryCache:
    """The running state of a ``NeuralMemoryLayer`` after some tokens (a decode cache).

    Attributes:
      conv: ``[B, K − 1, 3·H·D]``, the last ``K − 1`` projected (pre-convolution) q, k, v rows, or None without a
        convolution.
      state: the memory's ``NeuralMemoryState`` (linear) or ``DeepMemoryState`` (MLP), in the cache's dtype;
        ``state.position`` counts every token written, persistent tokens included.
    """

    conv: Optional[jax.Array]
    state: Union[NeuralMemoryState, DeepMemoryState]


def unit_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / ‖x‖₂`` over the last axis, as ``x·rsqrt(max(‖x‖², ε²))`` in float32: finite values and gradients at
    ``x = 0`` (dividing by ``max(‖x‖, ε)`` is not: ``√·`` has an infinite derivative at 0)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def cast_floats(tree, dtype):
    """Every floating-point leaf of ``tree`` in ``dtype`` (integer leaves, e.g. positions, unchanged)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


class NeuralMemoryLayer(nnx.Module):
    """Titans' neural long-term memory (LMM) as a layer ``[B, T, d_model] -> [B, T, d_model]`` (see the module
    docstring for the equations; Titans Sections 3.1-3.3 and 4.4).

    Example::

      layer = NeuralMemoryLayer(64, 4, chunk_size=16, memory="titans_deep", rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())         # causal by construction
      cache = layer.init_cache(B, max_len)      # conv rows + memory state: O(1) in the length
      y_t, cache = layer.decode(x_t, cache)     # equal to the parallel call, token by token

    The building blocks (``project``, ``gates``, ``write``, ``step``, ``read``, ``output``) are public: the Titans
    variants call them with queries, keys and values from different streams.

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: memory heads ``H`` (each its own memory).
      head_dim: ``D`` of q, k and v (default ``d_model // num_heads``).
      chunk_size: Section 3.2's mini-batch C (1: exact online gradient descent).
      conv_size: width K of the causal depthwise convolution after the q, k, v projections (0: none).
      num_persistent: ``N_p`` persistent memory tokens prepended to every sequence (eq. 19; 0: none). They are
        written into the memory first; their outputs are dropped.
      memory: a name in ``MEMORIES`` or a ``MemoryConfig``.
      max_lr: θ_max, the largest inner learning rate θ (with unit-norm keys, θ ≤ 1 keeps each step from
        overshooting).
      implementation: the memory core's path, one of ``IMPLEMENTATIONS``.
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes every parameter.
    """

    def __init__(self, d_model: int, num_heads: int, *, head_dim: Optional[int] = None, chunk_size: int = 1,
                 conv_size: int = 4, num_persistent: int = 0, memory: Union[str, MemoryConfig] = "titans_linear",
                 max_lr: float = 1.0, implementation: str = "auto", dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(chunk_size=chunk_size)
        _check_count(conv_size=conv_size, num_persistent=num_persistent)
        if not isinstance(max_lr, (int, float)) or isinstance(max_lr, bool) or max_lr <= 0:
            raise ValueError(f"max_lr must be a positive number, got {max_lr!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.config = as_memory(memory)
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.chunk_size, self.conv_size, self.num_persistent = chunk_size, conv_size, num_persistent
        self.max_lr, self.implementation = float(max_lr), implementation
        self.dtype, self.param_dtype = dtype, param_dtype
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query, self.key, self.value, self.out = attention_projections(d_model, num_heads, num_heads, head_dim,
                                                                           **common)
        channels = 3 * num_heads * head_dim
        self.conv = (nnx.Conv(channels, channels, (conv_size,), feature_group_count=channels, padding="VALID",
                              use_bias=False, **common) if conv_size else None)
        names = ["lr", "decay"] + (["momentum"] if self.config.momentum else [])
        names += ["delta"] if self.config.objective.needs_delta else []
        for name in names:
            setattr(self, f"{name}_gate", nnx.Linear(d_model, num_heads, bias_init=nnx.initializers.constant(
                GATE_BIAS_INIT[name]), **common))
        self.gate = nnx.LinearGeneral(d_model, (num_heads, head_dim), use_bias=False, **common)
        self.norm = nnx.RMSNorm(head_dim, **common)
        if self.config.linear:
            self.initial_weights = None
        else:
            hidden = max(1, int(round(self.config.expansion * head_dim)))
            weights = init_memory_mlp(rngs.params(), num_heads, head_dim, hidden, self.config.depth)
            self.initial_weights = nnx.List([nnx.Param(w.astype(param_dtype)) for w in weights])
        self.persistent = (nnx.Param(jax.random.normal(rngs.params(), (num_persistent, d_model), param_dtype))
                           if num_persistent else None)

    # ---- building blocks ---------------------------------------------------------------------------------------------

    def project(self, x: jax.Array, conv: Optional[jax.Array] = None
                ) -> tuple[jax.Array, jax.Array, jax.Array, Optional[jax.Array]]:
        """``x [B, T, d_model]`` -> ``(q, k, v, conv)``: each ``[B, T, H, D]`` (q and k of unit ℓ2 norm), and the
        convolution's next state (the last ``K − 1`` pre-convolution rows; ``conv`` is the state before x, zeros
        if None). Titans eqs. 11 and 15 with Section 4.4's convolution, SiLU and ℓ2 norm."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        u = jnp.concatenate([p(x).reshape(B, T, H * D) for p in (self.query, self.key, self.value)], axis=-1)
        if self.conv is not None:
            if conv is None:
                conv = jnp.zeros((B, self.conv_size - 1, u.shape[-1]), u.dtype)
            extended = jnp.concatenate([conv.astype(u.dtype), u], axis=1)
            u = self.conv(extended)
            conv = extended[:, extended.shape[1] - (self.conv_size - 1):]
        q, k, v = (a.reshape(B, T, H, D) for a in jnp.split(jax.nn.silu(u), 3, axis=-1))
        q, k = (unit_norm(a).astype(a.dtype) for a in (q, k))
        return q, k, v, conv

    def gates(self, x: jax.Array) -> MemoryGates:
        """The per-token, per-head gates of ``x [B, T, d_model]`` (float32 ``[B, T, H]``): ``θ = θ_max·σ(·)``,
        ``η = σ(·)`` (zeros without momentum), ``α = σ(·)``, Yaad's ``δ = softplus(·)``."""
        logit = lambda name: getattr(self, f"{name}_gate")(x).astype(jnp.float32)  # noqa: E731
        lr = self.max_lr * jax.nn.sigmoid(logit("lr"))
        momentum = jax.nn.sigmoid(logit("momentum")) if self.config.momentum else jnp.zeros_like(lr)
        delta = jax.nn.softplus(logit("delta")) if self.config.objective.needs_delta else None
        return MemoryGates(lr, momentum, jax.nn.sigmoid(logit("decay")), delta)

    def output(self, o: jax.Array, x: jax.Array) -> jax.Array:
        """``W_O (RMSNorm(o) ⊙ SiLU(x W_G))``: memory reads ``o [B, T, H, D]`` gated by the tokens ``x [B, T, d]``
        they belong to, ``-> [B, T, d_model]`` (Titans Section 4.4, "Gating")."""
        return self.out(self.norm(o) * jax.nn.silu(self.gate(x)))

    def initial_state(self, batch: int) -> Union[NeuralMemoryState, DeepMemoryState]:
        """The memory at position 0 (float32): zeros (linear) or the learned initial MLP weights, momentum zeros."""
        H, D = self.num_heads, self.head_dim
        if self.config.linear:
            zeros = jnp.zeros((batch, H, D, D), jnp.float32)
            return NeuralMemoryState(zeros, zeros, zeros, jnp.zeros((), jnp.int32))
        weights = tuple(jnp.broadcast_to(w[...].astype(jnp.float32), (batch, *w.shape))
                        for w in self.initial_weights)
        zeros = tuple(jnp.zeros_like(w) for w in weights)
        return DeepMemoryState(weights, zeros, weights, jnp.zeros((), jnp.int32))

    def initial_cache(self, batch: int) -> NeuralMemoryCache:
        """The cache before any token (no persistent tokens written): zero conv rows, ``initial_state``."""
        conv = (None if self.conv is None else
                jnp.zeros((batch, self.conv_size - 1, 3 * self.num_heads * self.head_dim), jnp.float32))
        return NeuralMemoryCache(conv, self.initial_state(batch))

    def write(self, q: jax.Array, k: jax.Array, v: jax.Array, gates: MemoryGates,
              state: Union[NeuralMemoryState, DeepMemoryState]) -> tuple[jax.Array, Union[NeuralMemoryState,
                                                                                            DeepMemoryState]]:
        """Write T tokens into the memory and read each after its own update (Titans eqs. 12-15, Section 3.2):
        ``o [B, T, H, D]`` in q's dtype and the state after them (float32).

        ``state`` is the state before them, at a ``position`` that opens a chunk (a multiple of ``chunk_size``):
        the call's chunks start at its first token.
        """
        g = gates
        common = dict(chunk_size=self.chunk_size, initial_momentum=state.momentum, return_state=True,
                      implementation=self.implementation)
        if self.config.linear:
            out, new = neural_memory(q, k, v, g.lr, g.momentum, g.decay, initial_state=state.memory, **common)
        else:
            out, new = deep_memory(q, k, v, g.lr, g.momentum, g.decay, state.memory, objective=self.config.objective,
                                   retention=self.config.retention, delta=g.delta, mlp=self.config.mlp, **common)
        return out, new._replace(position=jnp.asarray(state.position, jnp.int32) + q.shape[1])

    def step(self, q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, gates: MemoryGates,
             state: Union[NeuralMemoryState, DeepMemoryState]) -> tuple[jax.Array, Union[NeuralMemoryState,
                                                                                          DeepMemoryState]]:
        """``write`` for one token (``[B, 1, H, D]``, gates ``[B, 1, H]``) at any position: ``neural_memory_step``
        / ``deep_memory_step``, which keep the chunk base. Returns ``(o_t [B, 1, H, D], state)``."""
        g = [None if a is None else a[:, 0] for a in gates]
        if self.config.linear:
            o, new = neural_memory_step(q_t[:, 0], k_t[:, 0], v_t[:, 0], g[0], g[1], g[2], state,
                                        chunk_size=self.chunk_size)
        else:
            o, new = deep_memory_step(q_t[:, 0], k_t[:, 0], v_t[:, 0], g[0], g[1], g[2], state,
                                      objective=self.config.objective, retention=self.config.retention,
                                      delta_t=g[3], mlp=self.config.mlp, chunk_size=self.chunk_size)
        return o[:, None], new

    def read(self, q: jax.Array, memory) -> jax.Array:
        """Read without writing, ``M*(q)`` (Titans eqs. 15 and 21): ``q [B, T, H, D]`` against a state's
        ``memory`` (``[B, H, D, D]`` linear, or the MLP's tuple), ``-> [B, T, H, D]`` in q's dtype."""
        if self.config.linear:
            out = jnp.einsum("bthd,bhde->bthe", q.astype(jnp.float32), memory.astype(jnp.float32))
            return out.astype(q.dtype)
        return deep_memory_read(q, memory, retention=self.config.retention, mlp=self.config.mlp)

    def scan(self, x: jax.Array, cache: NeuralMemoryCache) -> tuple[jax.Array, NeuralMemoryCache]:
        """The layer on ``x [B, T, d_model]`` continuing ``cache`` (its position a multiple of ``chunk_size``):
        ``(y [B, T, d_model], cache)`` with the cache's float dtype kept. No persistent tokens are added."""
        q, k, v, conv = self.project(x, cache.conv)
        o, state = self.write(q, k, v, self.gates(x), cache.state)
        dtype = jax.tree.leaves(cache.state.memory)[0].dtype
        return self.output(o, x), NeuralMemoryCache(None if conv is None else conv.astype(dtype),
                                                    cast_floats(state, dtype))

    def advance(self, x_t: jax.Array, cache: NeuralMemoryCache) -> tuple[jax.Array, NeuralMemoryCache]:
        """One token ``x_t [B, 1, d_model]`` through the layer from ``cache`` (any position):
        ``(y_t [B, 1, d_model], cache)`` with the cache's float dtype kept."""
        q, k, v, conv = self.project(x_t, cache.conv)
        o, state = self.step(q, k, v, self.gates(x_t), cache.state)
        dtype = jax.tree.leaves(cache.state.memory)[0].dtype
        return self.output(o, x_t), NeuralMemoryCache(None if conv is None else conv.astype(dtype),
                                                      cast_floats(state, dtype))

    def persistent_cache(self, tokens: Optional[jax.Array], batch: int,
                         dtype: Optional[Dtype] = None) -> tuple[Optional[jax.Array], NeuralMemoryCache]:
        """Write persistent tokens ``[N_p, d_model]`` (or None) into a fresh memory: ``(their outputs
        [batch, N_p, d_model] or None, the cache after them)`` with float leaves in ``dtype`` (default float32)."""
        cache = cast_floats(self.initial_cache(batch), jnp.float32 if dtype is None else dtype)
        if tokens is None:
            return None, cache
        prefix = jnp.broadcast_to(tokens, (batch, *tokens.shape))
        return self.scan(prefix.astype(self.dtype or tokens.dtype), cache)

    # ---- the layer ---------------------------------------------------------------------------------------------------

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``; output t depends on tokens 0..t only.

        ``mask``: None or ``masks.Causal()`` (the same, causal, result); other masks raise
        ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("NeuralMemoryLayer", mask)
        if self.persistent is not None:
            x = prepend_persistent(self.persistent[...], x)
        y, _ = self.scan(x, self.initial_cache(x.shape[0]))
        return y[:, self.num_persistent:]

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> NeuralMemoryCache:
        """The cache after the persistent tokens (if any): conv rows and memory state, float leaves in ``dtype``
        (default float32, the library's running-state precision). ``max_len`` is checked and otherwise unused:
        the state does not grow."""
        check_positive(batch=batch, max_len=max_len)
        return self.persistent_cache(None if self.persistent is None else self.persistent[...], batch, dtype)[1]

    def decode(self, x_t: jax.Array, cache: NeuralMemoryCache) -> tuple[jax.Array, NeuralMemoryCache]:
        """One step: equal, position by position, to ``self(x)``.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: a ``NeuralMemoryCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        check_step("x_t", x_t, self.d_model, jax.tree.leaves(cache.state.memory)[0].shape[0])
        return self.advance(x_t, cache)


# ---- the Titans variants ---------------------------------------------------------------------------------------------

class _TitansParts:
    """The parts every variant has (a mixin of the modules below): the memory layer, attention projections,
    persistent tokens and the ⊗ norms."""

    def build(self, d_model: int, num_heads: int, *, num_kv_heads: Optional[int], head_dim: Optional[int],
                 num_persistent: int, memory_heads: Optional[int], memory_head_dim: Optional[int], chunk_size: int,
                 conv_size: int, memory: Union[str, MemoryConfig], max_lr: float, implementation: str,
                 dtype: Optional[Dtype], param_dtype: Dtype, rngs: nnx.Rngs, gate: bool):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(num_kv_heads=num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        _check_count(num_persistent=num_persistent)
        memory_heads = num_heads if memory_heads is None else memory_heads
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.memory = NeuralMemoryLayer(d_model, memory_heads, head_dim=memory_head_dim, chunk_size=chunk_size,
                                        conv_size=conv_size, memory=memory, max_lr=max_lr,
                                        implementation=implementation, **common)
        self.query, self.key, self.value, self.out = attention_projections(d_model, num_heads, num_kv_heads,
                                                                           head_dim, **common)
        self.persistent = (nnx.Param(jax.random.normal(rngs.params(), (num_persistent, d_model), param_dtype))
                           if num_persistent else None)
        self.attention_norm = nnx.RMSNorm(d_model, **common) if gate else None
        self.memory_norm = nnx.RMSNorm(d_model, **common) if gate else None
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.num_persistent, self.dtype, self.param_dtype = num_persistent, dtype, param_dtype

    def combine(self, y: jax.Array, m: jax.Array) -> jax.Array:
        """``y ⊗ m = RMSNorm_y(y) ⊙ σ(RMSNorm_m(m))`` (eqs. 25, 28)."""
        return self.attention_norm(y) * jax.nn.sigmoid(self.memory_norm(m))

    def persistent_kv(self, batch: int, dtype) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
        """Keys and values of the persistent tokens ``[batch, N_p, Hkv, D]`` in ``dtype`` (None without them)."""
        if self.persistent is None:
            return None, None
        p = self.persistent[...]
        if self.dtype is not None:
            p = p.astype(self.dtype)
        return tuple(jnp.broadcast_to(f(p).astype(dtype), (batch, *f(p).shape)) for f in (self.key, self.value))

    def cache_dtype(self, dtype: Optional[Dtype]):
        return (self.param_dtype if self.dtype is None else self.dtype) if dtype is None else dtype


# ---- MAC -------------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class TitansMACCache:
    """Decoding state of ``TitansMAC``.

    Attributes:
      memory: the memory layer's cache after the tokens so far (its convolution rows over the attention outputs
        ``y`` and the running memory ``M_(s−1)`` updated by the current segment's tokens).
      segment_memory: the memory before the current segment, ``M_(s−1)``, which the segment's tokens read (eq. 21).
      query_conv: the memory convolution's rows over the inputs x (for the eq. 21 queries), or None.
      kv: keys and values of the current segment: slots ``0..L−1`` the memory tokens ``h`` (eq. 22), slots
        ``L..2L−1`` the segment's tokens; ``kv.length`` counts every token decoded.
    """

    memory: NeuralMemoryCache
    segment_memory: object
    query_conv: Optional[jax.Array]
    kv: KVCache


class TitansMAC(_TitansParts, nnx.Module):
    """Titans MAC, memory as a context (Titans Sec. 4.1, eqs. 21-25; Fig. 2, Fig. 3a): ``[B, T, d] -> [B, T, d]``.

    The sequence is split into segments ``S^(s)`` of ``segment_size`` L tokens. For segment s, with ``M_(s−1)`` the
    memory after the previous segments:

        h = M*_(s−1)(q),  q from S^(s) (the memory layer's query stream)                   (eq. 21)
        S̃ = [p_1 … p_Np] ‖ h ‖ S^(s)                                                         (eq. 22)
        y = Attn(S̃) at the positions of S^(s)                                               (eq. 23)
        M_s = M_(s−1)(y): the memory written with y, token by token                         (eq. 24)
        o = y ⊗ M*(y), each token reading the memory after its own write                    (eq. 25)

    ``h`` is read by the memory layer (``NeuralMemoryLayer.read`` then its gated output projection with S^(s) as
    the gate's input), so the memory tokens are ``d_model`` vectors that attention projects like the others.

    Causality, where the equations leave it open: ``h_j`` is read with the query of token j, so a token i of the
    segment attends to the persistent tokens, to ``h_0 … h_i`` and to ``S_0 … S_i`` (a plain causal mask over the
    concatenation would show token i every ``h_j``, including those computed from later tokens); and eq. 25's
    read for token i is of the memory after token i's own write (the memory after the whole segment would let
    later tokens in). With these the layer is causal, and decoding (memory writes token by token, the segment's
    attention context growing inside the segment, ``M_(s−1)`` held for the reads) equals the parallel call. The
    outputs of attention at the persistent and memory-token positions are not used.

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: attention query heads; num_kv_heads: attention key/value heads (GQA; default ``num_heads``).
      segment_size: L, the attention's segment (a multiple of ``chunk_size``).
      num_persistent: ``N_p`` persistent tokens (eq. 19; 0: none).
      head_dim: attention head dim (default ``d_model // num_heads``).
      memory_heads, memory_head_dim: the memory's heads and head dim (defaults ``num_heads``,
        ``d_model // memory_heads``).
      chunk_size, conv_size, memory, max_lr, implementation: of the ``NeuralMemoryLayer``.
      dtype, param_dtype, rngs: as usual.
    """

    def __init__(self, d_model: int, num_heads: int, *, segment_size: int = 64, num_persistent: int = 4,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 memory_heads: Optional[int] = None, memory_head_dim: Optional[int] = None, chunk_size: int = 1,
                 conv_size: int = 4, memory: Union[str, MemoryConfig] = "titans_linear", max_lr: float = 1.0,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(segment_size=segment_size, chunk_size=chunk_size)
        if segment_size % chunk_size:
            raise ValueError(f"segment_size ({segment_size}) must be a multiple of chunk_size ({chunk_size}): the "
                             "memory is written segment by segment, in whole chunks")
        self.build(d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, num_persistent=num_persistent,
                   memory_heads=memory_heads, memory_head_dim=memory_head_dim, chunk_size=chunk_size,
                   conv_size=conv_size, memory=memory, max_lr=max_lr, implementation=implementation, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs, gate=True)
        self.segment_size = segment_size

    def segment_mask(self) -> jax.Array:
        """bool ``[L, N_p + 2L]``: token i sees every persistent token, ``h_j`` and ``S_j`` for ``j ≤ i``."""
        L = self.segment_size
        i, j = jnp.arange(L)[:, None], jnp.arange(2 * L)[None, :] % L
        return jnp.concatenate([jnp.ones((L, self.num_persistent), bool), j <= i], axis=1)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """Attention of the segment queries ``q`` over ``[P ‖ h ‖ S]`` (``k``, ``v``: the ``h ‖ S`` part, ``[B, 2L,
        Hkv, D]``) under ``mask`` (``segment_mask`` rows), through the output projection: ``[B, L, d_model]``."""
        k_p, v_p = self.persistent_kv(q.shape[0], k.dtype)
        if k_p is not None:
            k, v = jnp.concatenate([k_p, k], axis=1), jnp.concatenate([v_p, v], axis=1)
        return self.out(attention(q, k, v, mask=masks.Explicit(mask)))

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal (see the class docstring); T need not be a multiple of
        L (the last segment is padded, and the padding's outputs dropped).

        ``mask``: None or ``masks.Causal()`` (the same, causal, result); other masks raise ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("TitansMAC", mask)
        B, T, _ = x.shape
        L = self.segment_size
        N = -(-T // L)
        x = jnp.pad(x, ((0, 0), (0, N * L - T), (0, 0)))
        queries, _, _, _ = self.memory.project(x)                                     # eq. 21's q, [B, N·L, H, D]
        segments = lambda a: jnp.moveaxis(a.reshape(B, N, L, *a.shape[2:]), 1, 0)  # noqa: E731
        xs = tuple(segments(a) for a in (x, queries, self.query(x), self.key(x), self.value(x)))
        mask = self.segment_mask()

        def segment(cache: NeuralMemoryCache, inputs):
            x_s, q_mem, q, k, v = inputs
            h = self.memory.output(self.memory.read(q_mem, cache.state.memory), x_s)     # eq. 21
            k_all = jnp.concatenate([self.key(h), k], axis=1)                             # eq. 22
            v_all = jnp.concatenate([self.value(h), v], axis=1)
            y = self.attend(q, k_all, v_all, mask)                                         # eq. 23
            m, cache = self.memory.scan(y, cache)                                          # eqs. 24-25
            return cache, (self.combine(y, m), k_all if capturing else None)

        capturing = is_capturing()
        _, (out, keys) = jax.lax.scan(segment, self.memory.initial_cache(B), xs)
        if capturing:  # segments as the batch, [B·N, ...] batch-major: the calls of self.attend
            batch_major = lambda a: jnp.moveaxis(a, 0, 1).reshape(B * N, *a.shape[2:])  # noqa: E731
            k_p, _ = self.persistent_kv(B * N, keys.dtype)
            keys = batch_major(keys) if k_p is None else jnp.concatenate([k_p, batch_major(keys)], axis=1)
            sow_attention_inputs(self, batch_major(xs[2]), keys, mask=masks.Explicit(mask), scale=None,
                                 mechanism="softmax")
        return jnp.moveaxis(out, 0, 1).reshape(B, N * L, -1)[:, :T]

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> TitansMACCache:
        """An empty cache: memory state, convolution rows and the segment's ``2L`` key/value slots (it does not
        grow with ``max_len``, which is checked and otherwise unused). Float leaves in ``dtype`` (default: the
        key/value slots in the module's dtype, else ``param_dtype``; the memory in float32)."""
        check_positive(batch=batch, max_len=max_len)
        kv_dtype = self.cache_dtype(dtype)
        memory = cast_floats(self.memory.initial_cache(batch), jnp.float32 if dtype is None else dtype)
        shape = (batch, 2 * self.segment_size, self.num_kv_heads, self.head_dim)
        kv = KVCache(jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype), jnp.zeros((), jnp.int32))
        return TitansMACCache(memory, memory.state.memory, memory.conv, kv)

    def decode(self, x_t: jax.Array, cache: TitansMACCache) -> tuple[jax.Array, TitansMACCache]:
        """One step, equal, position by position, to ``self(x)``: at a segment's first token the segment memory
        becomes the running memory; the token's memory read ``h_t`` and its keys/values go to slots ``i`` and
        ``L + i`` (``i`` = its index in the segment); it attends to ``P``, slots ``0..i`` and ``L..L+i``; its
        attention output is written into the running memory and read back.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: a ``TitansMACCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        check_step("x_t", x_t, self.d_model, cache.kv.k.shape[0])
        L = self.segment_size
        i = cache.kv.length % L
        running = cache.memory.state.memory
        segment_memory = jax.tree.map(lambda s, r: jnp.where(i == 0, r, s), cache.segment_memory, running)
        q_mem, _, _, query_conv = self.memory.project(x_t, cache.query_conv)
        h = self.memory.output(self.memory.read(q_mem, segment_memory), x_t)
        dtype = cache.kv.k.dtype
        write = lambda buf, a, slot: jax.lax.dynamic_update_slice(buf, a.astype(dtype), (0, slot, 0, 0))  # noqa
        k_all = write(write(cache.kv.k, self.key(h), i), self.key(x_t), L + i)
        v_all = write(write(cache.kv.v, self.value(h), i), self.value(x_t), L + i)
        valid = jnp.arange(2 * L) % L <= i
        mask = jnp.concatenate([jnp.ones((self.num_persistent,), bool), valid])[None, :]
        y = self.attend(self.query(x_t).astype(dtype), k_all, v_all, mask)
        m, memory = self.memory.advance(y, cache.memory)
        conv = None if query_conv is None else query_conv.astype(cache.query_conv.dtype)
        segment_memory = cast_floats(segment_memory, jax.tree.leaves(cache.segment_memory)[0].dtype)
        return self.combine(y, m), TitansMACCache(memory, segment_memory, conv,
                                                  KVCache(k_all, v_all, cache.kv.length + 1))


# ---- MAG and MAL -----------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class TitansWindowCache:
    """Decoding state of ``TitansMAG`` / ``TitansMAL``: the memory layer's cache and a ring buffer of the
    sliding window's keys and values (``window.length`` counts the tokens decoded, persistent tokens excluded)."""

    memory: NeuralMemoryCache
    window: KVCache


class _WindowParts(_TitansParts):
    """MAG and MAL (a mixin): sliding-window attention of ``window`` keys beside or after the memory layer."""

    def build_window(self, d_model: int, num_heads: int, *, window: int, gate: bool, **kwargs):
        check_positive(window=window)
        self.build(d_model, num_heads, gate=gate, **kwargs)
        self.window = window

    def prefixed(self, x: jax.Array) -> jax.Array:
        """``x̃ = [p_1 … p_Np] ‖ x`` (eqs. 26, 29)."""
        return x if self.persistent is None else prepend_persistent(self.persistent[...], x)

    def ring(self, batch: int, size: int, dtype) -> KVCache:
        shape = (batch, size, self.num_kv_heads, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


class TitansMAG(_WindowParts, nnx.Module):
    """Titans MAG, memory as a gate (Titans Sec. 4.2, eqs. 26-28; Fig. 3b, Fig. 4): ``[B, T, d] -> [B, T, d]``.

        x̃ = [p_1 … p_Np] ‖ x                                                                (eq. 26)
        y = SW-Attn*(x̃): sliding-window attention with the persistent tokens as a prefix    (eq. 27)
        o = y ⊗ M(x̃): the memory layer on x̃, each token's read after its own write          (eq. 28)

    A token sees every persistent token and the last ``window`` tokens of x̃, itself included (the mask
    ``masks.SlidingWindow(window − 1, 0) | prefix``, Fig. 3b). The memory layer reads the same x̃, so the
    persistent tokens are written into the memory first. Outputs at the persistent positions are dropped.
    Decoding keeps a ring buffer of ``min(window, max_len)`` keys/values and the memory layer's state.

    Args:
      d_model, num_heads, num_kv_heads, head_dim, num_persistent, memory_heads, memory_head_dim, chunk_size,
      conv_size, memory, max_lr, implementation, dtype, param_dtype, rngs: as in ``TitansMAC``.
      window: the keys each token sees in x̃, itself included (persistent tokens always seen besides).
    """

    def __init__(self, d_model: int, num_heads: int, *, window: int = 64, num_persistent: int = 4,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 memory_heads: Optional[int] = None, memory_head_dim: Optional[int] = None, chunk_size: int = 1,
                 conv_size: int = 4, memory: Union[str, MemoryConfig] = "titans_linear", max_lr: float = 1.0,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.build_window(d_model, num_heads, window=window, gate=True, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, num_persistent=num_persistent, memory_heads=memory_heads,
                          memory_head_dim=memory_head_dim, chunk_size=chunk_size, conv_size=conv_size, memory=memory,
                          max_lr=max_lr, implementation=implementation, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal.

        ``mask``: None or ``masks.Causal()`` (the same, causal, result); other masks raise ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("TitansMAG", mask)
        x_tilde = self.prefixed(x)
        m, _ = self.memory.scan(x_tilde, self.memory.initial_cache(x.shape[0]))
        window = masks.SlidingWindow(self.window - 1, 0)
        if self.num_persistent:
            window = window | masks.Explicit((jnp.arange(x_tilde.shape[1]) < self.num_persistent)[None, :])
        q, k = self.query(x), self.key(x_tilde)
        sow_attention_inputs(self, q, k, mask=window, scale=None, mechanism="softmax")
        y = self.out(attention(q, k, self.value(x_tilde), mask=window))
        return self.combine(y, m[:, self.num_persistent:])

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> TitansWindowCache:
        """The memory layer's cache after the persistent tokens (float32 unless ``dtype``) and an empty ring buffer
        of ``min(window, max_len)`` slots (the module's dtype unless ``dtype``)."""
        check_positive(batch=batch, max_len=max_len)
        prefix = None if self.persistent is None else self.persistent[...]
        _, memory = self.memory.persistent_cache(prefix, batch, dtype)
        return TitansWindowCache(memory, self.ring(batch, min(self.window, max_len), self.cache_dtype(dtype)))

    def decode(self, x_t: jax.Array, cache: TitansWindowCache) -> tuple[jax.Array, TitansWindowCache]:
        """One step, equal, position by position, to ``self(x)``: the token's keys/values go to ring slot
        ``length mod size``; it attends to the persistent tokens and the filled slots; the memory layer takes one
        step.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: a ``TitansWindowCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        ring = cache.window
        check_step("x_t", x_t, self.d_model, ring.k.shape[0])
        dtype, size = ring.k.dtype, ring.k.shape[1]
        start = (0, ring.length % size, 0, 0)
        k_all = jax.lax.dynamic_update_slice(ring.k, self.key(x_t).astype(dtype), start)
        v_all = jax.lax.dynamic_update_slice(ring.v, self.value(x_t).astype(dtype), start)
        k, v = k_all, v_all
        k_p, v_p = self.persistent_kv(x_t.shape[0], dtype)
        filled = jnp.arange(size) <= ring.length
        if k_p is not None:
            k, v = jnp.concatenate([k_p, k], axis=1), jnp.concatenate([v_p, v], axis=1)
            filled = jnp.concatenate([jnp.ones((self.num_persistent,), bool), filled])
        y = self.out(attention(self.query(x_t).astype(dtype), k, v, mask=masks.Explicit(filled[None, :])))
        m, memory = self.memory.advance(x_t, cache.memory)
        return self.combine(y, m), TitansWindowCache(memory, KVCache(k_all, v_all, ring.length + 1))


class TitansMAL(_WindowParts, nnx.Module):
    """Titans MAL, memory as a layer (Titans Sec. 4.3, eqs. 29-31; Fig. 5): ``[B, T, d] -> [B, T, d]``.

        x̃ = [p_1 … p_Np] ‖ x                                                     (eq. 29)
        y = M(x̃): the memory layer on x̃                                          (eq. 30; the paper prints M(x))
        o = SW-Attn(y): sliding-window attention over y, the last ``window``
            positions of x̃ (persistent positions included while in the window)   (eq. 31)

    The output projection of the memory layer feeds the attention's projections; no ⊗ gate. Decoding keeps a ring
    buffer of ``min(window, N_p + max_len)`` keys/values, filled at ``init_cache`` with the persistent tokens'
    memory outputs, and the memory layer's state.

    Args: as in ``TitansMAG``.
    """

    def __init__(self, d_model: int, num_heads: int, *, window: int = 64, num_persistent: int = 4,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 memory_heads: Optional[int] = None, memory_head_dim: Optional[int] = None, chunk_size: int = 1,
                 conv_size: int = 4, memory: Union[str, MemoryConfig] = "titans_linear", max_lr: float = 1.0,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.build_window(d_model, num_heads, window=window, gate=False, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, num_persistent=num_persistent, memory_heads=memory_heads,
                          memory_head_dim=memory_head_dim, chunk_size=chunk_size, conv_size=conv_size, memory=memory,
                          max_lr=max_lr, implementation=implementation, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal.

        ``mask``: None or ``masks.Causal()`` (the same, causal, result); other masks raise ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("TitansMAL", mask)
        y, _ = self.memory.scan(self.prefixed(x), self.memory.initial_cache(x.shape[0]))
        q, k, window = self.query(y[:, self.num_persistent:]), self.key(y), masks.SlidingWindow(self.window - 1, 0)
        sow_attention_inputs(self, q, k, mask=window, scale=None, mechanism="softmax")
        return self.out(attention(q, k, self.value(y), mask=window))

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> TitansWindowCache:
        """The memory layer's cache after the persistent tokens (float32 unless ``dtype``) and a ring buffer of
        ``min(window, N_p + max_len)`` slots (the module's dtype unless ``dtype``) holding the persistent tokens'
        keys/values at slots ``p mod size``."""
        check_positive(batch=batch, max_len=max_len)
        prefix = None if self.persistent is None else self.persistent[...]
        y_p, memory = self.memory.persistent_cache(prefix, batch, dtype)
        size = min(self.window, self.num_persistent + max_len)
        ring = self.ring(batch, size, self.cache_dtype(dtype))
        if y_p is not None:
            kept = min(size, self.num_persistent)
            slots = jnp.arange(self.num_persistent - kept, self.num_persistent) % size
            y_p = y_p[:, self.num_persistent - kept:]
            ring = KVCache(ring.k.at[:, slots].set(self.key(y_p).astype(ring.k.dtype)),
                           ring.v.at[:, slots].set(self.value(y_p).astype(ring.v.dtype)), ring.length)
        return TitansWindowCache(memory, ring)

    def decode(self, x_t: jax.Array, cache: TitansWindowCache) -> tuple[jax.Array, TitansWindowCache]:
        """One step, equal, position by position, to ``self(x)``: the memory layer takes one step, and its output's
        keys/values go to ring slot ``(N_p + length) mod size``; the query attends to the filled slots.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: a ``TitansWindowCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        ring = cache.window
        check_step("x_t", x_t, self.d_model, ring.k.shape[0])
        dtype, size = ring.k.dtype, ring.k.shape[1]
        y, memory = self.memory.advance(x_t, cache.memory)
        position = self.num_persistent + ring.length
        start = (0, position % size, 0, 0)
        k_all = jax.lax.dynamic_update_slice(ring.k, self.key(y).astype(dtype), start)
        v_all = jax.lax.dynamic_update_slice(ring.v, self.value(y).astype(dtype), start)
        filled = masks.Explicit((jnp.arange(size) <= position)[None, :])
        o = self.out(attention(self.query(y).astype(dtype), k_all, v_all, mask=filled))
        return o, TitansWindowCache(memory, KVCache(k_all, v_all, ring.length + 1))


_EXAMPLE = dict(d_model=16, num_heads=2, num_persistent=2, chunk_size=2, conv_size=3)
register_module(ModuleSpec(
    "neural_memory", NeuralMemoryLayer, _EXAMPLE, (2, 9, 16), kind="layer",
    paper=PAPER + ", neural long-term memory (LMM), Sec. 3 and 4.4", causal=True, decodes=True))
register_module(ModuleSpec(
    "titans_mac", TitansMAC, dict(_EXAMPLE, segment_size=4, num_kv_heads=1), (2, 9, 16), kind="layer",
    paper=PAPER + ", memory as a context (MAC), Sec. 4.1", causal=True, decodes=True))
register_module(ModuleSpec(
    "titans_mag", TitansMAG, dict(_EXAMPLE, window=4), (2, 9, 16), kind="layer",
    paper=PAPER + ", memory as a gate (MAG), Sec. 4.2", causal=True, decodes=True))
register_module(ModuleSpec(
    "titans_mal", TitansMAL, dict(_EXAMPLE, window=4, memory="titans_deep"), (2, 9, 16), kind="layer",
    paper=PAPER + ", memory as a layer (MAL), Sec. 4.3", causal=True, decodes=True))
