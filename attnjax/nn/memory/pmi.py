"""PMI (perception–memory–inference) as a Flax NNX token mixer: working memory + long-term memory.

Zeng et al., "Understanding AI Cognition: A Neural Module for Inference Inspired by Human Memory Mechanisms"
(arXiv:2310.09297; ICLR 2024). PMI-TR puts the module in place of a Transformer layer's self-attention: the
layer's tokens are the perception, the output (the "current understanding" ``U^t``, eq. 12) goes through the
layer's residual, norm and feed-forward as the attention output would, and the memory state is carried from
one layer to the next (``PMIMemory.step``). The memory operations and which source each follows are in
``attnjax.memory.pmi``; the composition here follows the official code (github.com/zengxyyu/PMI-TR,
``transformer_utilities/sw_ltm.py``, ``SW_LTM.forward_step``).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import masks
from attnjax.api import attention
from attnjax.checks import check_positive, check_scalar
from attnjax.memory.pmi import (PMIState, competitive_attention, integrate, long_term_association,
                                long_term_summary, working_memory_gate)
from attnjax.nn.checks import check_input, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module


class PMIMemory(nnx.Module):
    """The PMI memory and inference modules as a layer ``[B, T, d_model] -> [B, T, d_model]``.

    One step ``t`` (one layer call) with memory ``(M_w [N, d], M_l [C, N, d])``, tokens ``x [T, d]``,
    ``X = x W_x + b_x`` and projections ``Q, K, V`` shared by every attention below (``H`` heads):

    1. Competitive write (``competitive_attention``, queries the slots, keys/values the tokens, top-k over
       the tokens): ``A = Attn_k(Q(M_w), K(X), V(X))``, ``M' = LN_1(M_w + A)``,
       ``M̃ = LN_2(M' + MLP(M'))`` with ``MLP = (relu ∘ W_m)^depth`` (one linear map applied ``mlp_depth``
       times, as the official ``nn.ModuleList([nn.Linear(...)] * 4)`` shares it).
    2. Long-term association: ``M_l ← LN_3(M_l + long_term_association(M_l, M̃))``.
    3. Gates: ``[i; f] = mean_T(relu(w ⊙ X)) W_g + tanh(M_w)·G_n + b_n`` (a per-slot map ``G_n``), then
       ``M_w ← sigmoid(i + b_i) ⊙ tanh(M̃) + sigmoid(f + b_f) ⊙ M_w``.
    4. Inference: ``U_w = Attn(Q(X), K(M_w), V(M_w))`` ("MHC"), ``U_l = Attn_k(Q(X), K(M̄_l), V(M̄_l))`` over
       the segment mean ``M̄_l`` ("MHSC", top-k over the slots), the correction (eq. 11)
       ``U_wl = Attn(Q(U_l), K(U_w), V(U_w))``, and ``U = α U_w + (1 - α) U_wl`` (eq. 12).

    Attention outputs concatenate the heads (``H · head_dim = d_model``, no output projection, as in the
    official code). The whole step runs in float32; the output takes ``x``'s dtype.

    Not causal: every token writes into the memory that every token reads, and the gate averages the tokens;
    ``mask`` must be ``None``. No decoding (the step is a layer, not a recurrence over tokens).

    Differences from the official code: it draws the initial long-term memory fresh from ``U[0, 1)`` at every
    forward pass and does not learn it; here it is a parameter ``long_term_init`` (initialized from
    ``U[0, 1)``, shared by the batch) so the layer is a deterministic function (``step`` takes any state, e.g.
    a freshly drawn one). The official scores are unscaled (``scale=1.0`` here); the default here is the
    usual ``1/sqrt(key_dim)``. The official key projection has a bias, which cancels in every softmax (a
    constant per query), so it is left out. The official key/query width is 32 per head (``key_dim=32``).

    A property of the official update kept here: a row of ``LN_3``'s output sums to ``Σ_d (γ_d z_d + β_d)``,
    which is 0 at the norm's initialization (``γ = 1``, ``β = 0``, ``z`` centred), so from the second step on
    the association adds nothing to ``M_l`` until training moves ``γ`` or ``β`` away from it.

    Example::

      layer = PMIMemory(256, 8, mem_slots=8, ltm_segments=5, topk=5, rngs=nnx.Rngs(0))
      y = layer(x)                                   # x, y: [B, T, 256]; memory starts from initial_state
      state = layer.initial_state(B)
      for _ in range(depth):                         # PMI-TR: one shared layer, the memory carried along
          h, state = layer.step(x, state); x = norm(x + h); x = norm(x + ffn(x))

    Parameters (``K = H·key_dim``): ``(d² + d)`` input, ``(d·K + K) + d·K + (d² + d)`` query/key/value,
    ``d² + d`` MLP, ``6d`` layer norms, ``d + (2d² + 2d) + N·(2d² + 2d) + 2`` gates, ``C·N·d`` initial
    long-term memory.

    Args:
      d_model: features ``d`` of ``x``, of the memory slots and of the output.
      num_heads: heads ``H``; ``d_model`` must be a multiple (the value width is ``d_model // H``).
      mem_slots: working-memory slots ``N`` (official 8).
      ltm_segments: long-term memory segments ``C`` (official 5).
      topk: ``k`` of the competitive write and of the long-term read (official 5).
      alpha: ``α`` of eq. 12 (official 0.7).
      key_dim: query/key width per head (default ``d_model // H``; official 32).
      mlp_depth: applications of the write MLP's shared linear map (official 4).
      scale: attention logit scale (default ``1/sqrt(key_dim)``; official ``1.0``).
      epsilon: of the three layer norms (official ``1e-5``, PyTorch's default).
      implementation: of the dense reads through ``attnjax.attention``.
      rngs: ``params`` initializes the parameters.
    """

    def __init__(self, d_model: int, num_heads: int, *, mem_slots: int = 8, ltm_segments: int = 5, topk: int = 5,
                 alpha: float = 0.7, key_dim: Optional[int] = None, mlp_depth: int = 4,
                 scale: Optional[float] = None, epsilon: float = 1e-5, implementation: str = "auto",
                 rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, None)
        key_dim = head_dim if key_dim is None else key_dim
        check_positive(mem_slots=mem_slots, ltm_segments=ltm_segments, topk=topk, key_dim=key_dim,
                       mlp_depth=mlp_depth)
        check_scalar("alpha", alpha)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if scale is not None:
            check_scalar("scale", scale)
            if not float(scale) > 0:
                raise ValueError(f"scale must be positive, got {scale}")
        self.d_model, self.num_heads, self.head_dim, self.key_dim = d_model, num_heads, head_dim, key_dim
        self.mem_slots, self.ltm_segments, self.topk, self.alpha = mem_slots, ltm_segments, topk, float(alpha)
        self.mlp_depth, self.implementation = mlp_depth, implementation
        self.scale = key_dim ** -0.5 if scale is None else float(scale)
        d, N = d_model, mem_slots

        def norm():
            return nnx.LayerNorm(d, epsilon=epsilon, rngs=rngs)

        self.input_proj = nnx.Linear(d, d, rngs=rngs)
        self.query = nnx.LinearGeneral(d, (num_heads, key_dim), rngs=rngs)
        self.key = nnx.LinearGeneral(d, (num_heads, key_dim), use_bias=False, rngs=rngs)
        self.value = nnx.LinearGeneral(d, (num_heads, head_dim), rngs=rngs)
        self.write_norm, self.mlp_norm, self.long_term_norm = norm(), norm(), norm()
        self.mlp = nnx.Linear(d, d, rngs=rngs)
        self.gate_input_scale = nnx.Param(jax.random.normal(rngs.params(), (d,), jnp.float32))
        self.gate_input = nnx.Linear(d, 2 * d, rngs=rngs)
        bound = 1.0 / math.sqrt(2 * d)
        self.gate_memory_kernel = nnx.Param(jax.random.uniform(rngs.params(), (N, d, 2 * d), jnp.float32,
                                                               -bound, bound))
        self.gate_memory_bias = nnx.Param(jax.random.uniform(rngs.params(), (N, 2 * d), jnp.float32, -bound, bound))
        self.input_bias = nnx.Param(jnp.zeros((), jnp.float32))
        self.forget_bias = nnx.Param(jnp.ones((), jnp.float32))
        self.long_term_init = nnx.Param(jax.random.uniform(rngs.params(), (ltm_segments, N, d), jnp.float32))

    def initial_state(self, batch: int) -> PMIState:
        """The memory before the first step: ``M_w`` the ``[N, d]`` identity (zero-padded or truncated, as the
        official ``initial_state``) and ``M_l`` the parameter ``long_term_init``, for each of ``batch`` rows
        (float32)."""
        check_positive(batch=batch)
        working = jnp.broadcast_to(jnp.eye(self.mem_slots, self.d_model, dtype=jnp.float32),
                                   (batch, self.mem_slots, self.d_model))
        long_term = jnp.broadcast_to(self.long_term_init[...].astype(jnp.float32),
                                     (batch, *self.long_term_init.shape))
        return PMIState(working, long_term)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``U`` for ``x [B, T, d_model]`` from ``initial_state``: one ``step``; returns ``[B, T, d_model]``.

        ``mask`` must be ``None`` (``NotImplementedError`` otherwise: the memory mixes every token).
        """
        check_input("x", x, self.d_model)
        if mask is not None:
            raise NotImplementedError(f"PMIMemory takes mask=None only (every token writes into the memory that "
                                      f"every token reads), got {type(mask).__name__}")
        return self.step(x, self.initial_state(x.shape[0]))[0]

    def step(self, x: jax.Array, state: PMIState) -> tuple[jax.Array, PMIState]:
        """One PMI step: write ``x [B, T, d_model]`` into ``state``, read it back.

        Args:
          x: ``[B, T, d_model]`` floating point, the perceived tokens.
          state: a ``PMIState`` with ``working [B, N, d_model]`` and ``long_term [B, C, N, d_model]``.
        Returns:
          ``(U [B, T, d_model] in x's dtype, the new PMIState in float32)``.
        """
        check_input("x", x, self.d_model)
        self._check_state(state, x.shape[0])
        B, T, d = x.shape
        memory = state.working.astype(jnp.float32)
        xp = self.input_proj(x.astype(jnp.float32))

        def heads(a):
            return a.reshape(*a.shape[:2], d)

        written = heads(competitive_attention(self.query(memory), self.key(xp), self.value(xp), topk=self.topk,
                                              scale=self.scale))
        written = self.write_norm(memory + written)
        hidden = written
        for _ in range(self.mlp_depth):
            hidden = jax.nn.relu(self.mlp(hidden))
        candidate = self.mlp_norm(written + hidden)
        long_term = state.long_term.astype(jnp.float32)
        long_term = self.long_term_norm(long_term + long_term_association(long_term, candidate))

        gates = (self.gate_input(jnp.mean(jax.nn.relu(self.gate_input_scale[...] * xp), axis=1))[:, None]
                 + jnp.einsum("bnd,nde->bne", jnp.tanh(memory), self.gate_memory_kernel[...])
                 + self.gate_memory_bias[...])
        input_gate = jax.nn.sigmoid(gates[..., :d] + self.input_bias[...])
        forget_gate = jax.nn.sigmoid(gates[..., d:] + self.forget_bias[...])
        memory = working_memory_gate(candidate, memory, input_gate, forget_gate)

        q = self.query(xp)
        u_working = attention(q, self.key(memory), self.value(memory), scale=self.scale,
                              implementation=self.implementation)
        summary = long_term_summary(long_term)
        u_long = heads(competitive_attention(q, self.key(summary), self.value(summary), topk=self.topk,
                                             scale=self.scale))
        u_corrected = attention(self.query(u_long), self.key(heads(u_working)), self.value(heads(u_working)),
                                scale=self.scale, implementation=self.implementation)
        u = integrate(heads(u_working), heads(u_corrected), self.alpha)
        return u.astype(x.dtype), PMIState(memory, long_term)

    def _check_state(self, state: PMIState, batch: int) -> None:
        expected = {"working": (batch, self.mem_slots, self.d_model),
                    "long_term": (batch, self.ltm_segments, self.mem_slots, self.d_model)}
        if not isinstance(state, PMIState):
            raise TypeError(f"state must be a PMIState (from initial_state or step), got {type(state).__name__}")
        for name, shape in expected.items():
            a = getattr(state, name)
            if getattr(a, "shape", None) != shape or not jnp.issubdtype(a.dtype, jnp.floating):
                raise ValueError(f"state.{name} must be a floating-point array of shape {list(shape)} for x with "
                                 f"batch {batch}, got {getattr(a, 'dtype', None)}{list(getattr(a, 'shape', ()))}")


register_module(ModuleSpec("pmi", PMIMemory, dict(d_model=8, num_heads=2, mem_slots=4, ltm_segments=3, topk=2,
                                                  mlp_depth=2, implementation="reference"), (2, 9, 8), kind="layer",
                           causal=False,
                           decodes=False,
                           paper="Zeng et al. 2023 (Understanding AI Cognition: A Neural Module for Inference "
                                 "Inspired by Human Memory Mechanisms; PMI)"))
