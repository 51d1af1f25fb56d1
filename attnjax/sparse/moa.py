"""MoA: per-head elastic sliding windows, and the profiling search that picks them.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression",
2024 (https://github.com/thu-nics/MoA). Each head ``h`` attends, for a key length ``N``, to

    span_h(N) = clip(⌊α_h + β_h·N⌋, 0, N) tokens:  the first min(sink, span) tokens (the attention
    sink) plus a local band of the remaining ``span − sink`` most recent tokens,

so some heads keep a fixed local context (β = 0) while others grow with the input (β > 0). As in
MoA's block-sparse prefill kernel, the pattern is laid out in key blocks: query block ``i`` visits
the first ``⌈sink/block_kv⌉`` key blocks and the ``⌈(span − sink)/block_kv⌉`` key blocks (at least
one) that end at its own (diagonal) block. The band looks back, so the pattern is causal by
construction (MoA targets decoder LLMs); it is AND-ed with the request's mask.

``moa_profile`` chooses ``(α_h, β_h)`` per head from calibration inputs: each candidate rule's loss
is the attention influence it drops (MoA's first-order estimate of the loss increase from masking
an attention entry, or plain attention mass without output gradients), and one rule per head is
chosen to minimise the total loss under a density budget (MoA's MILP, solved here exactly as a
multiple-choice knapsack by dynamic programming over tile counts).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import registry
from attnjax.checks import describe
from attnjax.masks import Causal, Mask, query_positions
from attnjax.blocked.scores import allowed, dense_operands, raw_logits, score_spec, to_groups
from attnjax.sparse.engine import BlockSelector, covers_allowed
from attnjax.blocked.lists import BlockSparse, allowed_blocks, from_block_mask
from attnjax.tiling import num_tiles

PAPER = "Fu et al., MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression, 2024"


def moa_spans(alphas, betas, N: int) -> np.ndarray:
    """Tokens each head attends at key length ``N``: ``clip(⌊α + β·N⌋, 0, N)`` (sink included)."""
    alphas, betas = np.broadcast_arrays(np.asarray(alphas, np.float64), np.asarray(betas, np.float64))
    return np.clip(np.floor(alphas + betas * N), 0, N).astype(np.int64)


def moa_block_mask(alphas, betas, sink: int, T: int, S: int, block_q: int, block_kv: int) -> np.ndarray:
    """MoA's block pattern per rule, bool ``[R, nq, nk]`` for ``R`` (α, β) rules and ``N = S``.

    Query block ``i`` (positions ``p_first..p_last``, bottom-right aligned) lists key blocks
    ``c < ⌈min(sink, span)/block_kv⌉`` and ``⌊p_first/block_kv⌋ − n_local < c ≤ ⌊p_last/block_kv⌋``
    with ``n_local = max(1, ⌈(span − min(sink, span))/block_kv⌉)``.
    """
    spans = moa_spans(alphas, betas, S).reshape(-1)
    sink_tokens = np.minimum(sink, spans)
    sink_blocks = -(-sink_tokens // block_kv)
    local_blocks = np.maximum(1, -(-(spans - sink_tokens) // block_kv))
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    starts = np.arange(nq) * block_q
    first = np.asarray(query_positions(starts, T, S)) // block_kv
    last = np.asarray(query_positions(np.minimum(starts + block_q, T) - 1, T, S)) // block_kv
    c = np.arange(nk)[None, None, :]
    band = (c > first[None, :, None] - local_blocks[:, None, None]) & (c <= last[None, :, None])
    return band | (c < sink_blocks[:, None, None])


@registry.register
@dataclasses.dataclass(frozen=True)
class MoA(BlockSelector):
    """Mixture of Sparse Attention (Fu et al., 2024): per-head elastic windows plus a sink.

    Args:
      block_q, block_kv: block sizes.
      alphas, betas: per-head rule ``span_h(N) = α_h + β_h·N`` tokens (``N`` = key length). Each
        tuple has length 1 (all heads share it) or ``Hq``; use one config per layer.
      sink: initial tokens every head keeps (MoA's static cache part, 64 in the paper's code).
    The default, α = 1024 and β = 1/8, gives each query 2048 keys (a quarter) at N = 8k and 5120
    at N = 32k. Lists are static (NumPy, from the shapes), ``[1, 1 or Hq, nq, K]``.
    """

    block_q: int = 64
    block_kv: int = 64
    alphas: tuple = (1024.0,)
    betas: tuple = (0.125,)
    sink: int = 64

    name: ClassVar[str] = "moa"
    paper: ClassVar[str] = PAPER

    @property
    def decodes(self) -> bool:
        """A KV cache decodes with fixed spans (``betas`` all 0) and query tiles inside key blocks
        (``block_q`` divides ``block_kv``); spans that grow with the key length change with the cache."""
        return self.block_kv % self.block_q == 0 and not any(self.betas)

    def __post_init__(self):
        for field in ("block_q", "block_kv"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MoA.{field} must be a positive int, got {describe(value)}")
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"MoA.sink must be a non-negative int, got {describe(self.sink)}")
        object.__setattr__(self, "alphas", tuple(float(a) for a in np.atleast_1d(self.alphas)))
        object.__setattr__(self, "betas", tuple(float(b) for b in np.atleast_1d(self.betas)))
        la, lb = len(self.alphas), len(self.betas)
        if 0 in (la, lb) or (la != lb and 1 not in (la, lb)):
            raise ValueError(f"MoA.alphas (length {la}) and betas (length {lb}) must have equal lengths or "
                             "length 1")
        if any(b < 0 for b in self.betas):
            raise ValueError(f"MoA.betas must be non-negative, got {self.betas}")

    @property
    def num_rules(self) -> int:
        """1 (shared by all heads) or the number of query heads the config is for."""
        return max(len(self.alphas), len(self.betas))

    def spans(self, N: int) -> np.ndarray:
        """Tokens each head attends at key length ``N``, ``[num_rules]``."""
        return moa_spans(self.alphas, self.betas, N)

    def block_mask(self, T: int, S: int) -> np.ndarray:
        """The pattern as a bool block mask ``[1, num_rules, nq, nk]`` (before any mask)."""
        return moa_block_mask(self.alphas, self.betas, self.sink, T, S, self.block_q, self.block_kv)[None]

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> BlockSparse:
        """Static lists (dynamic only when ``mask`` is a data mask), ``K`` = the pattern's largest count."""
        T, Hq, S = q.shape[1], q.shape[2], k.shape[1]
        if self.num_rules not in (1, Hq):
            raise ValueError(f"MoA has {self.num_rules} per-head rules but q has {Hq} heads; give 1 or {Hq}")
        pattern = self.block_mask(T, S)
        ok = allowed_blocks(mask, T, S, self.block_q, self.block_kv)
        if isinstance(ok, np.ndarray):
            return from_block_mask(pattern & ok, self.block_q, self.block_kv)
        max_blocks = max(1, int(pattern.sum(-1).max()))
        return from_block_mask(jnp.logical_and(pattern, ok), self.block_q, self.block_kv, max_blocks=max_blocks)

    def selects_every_block(self, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> bool:
        """True when every head's span covers every block the mask allows (``covers_allowed``)."""
        return covers_allowed(self.block_mask(T, S), mask, T, S, self.block_q, self.block_kv)


def attention_influence(
    q: jax.Array, k: jax.Array, v: jax.Array, grad_out: Optional[jax.Array] = None, *,
    mask: Optional[Mask] = None, scale: Optional[float] = None,
) -> jax.Array:
    """MoA's attention influence ``|ΔL_ij|`` per head, summed over the batch: ``[Hq, T, S]`` float32.

    With output gradients ``G = dL/dO``, ``g_ij = G_i·v_j = ∂L/∂A_ij`` and masking entry ``(i, j)``
    (then renormalising the row) changes the loss by, to first order (Fu et al., 2024),
    ``ΔL_ij = A_ij (Σ_n A_in g_in − g_ij) / (1 − A_ij)`` (``A_ij·g_ij`` where ``A_ij = 1``).
    Without ``grad_out`` the influence is the attention weight ``A_ij`` itself (the mass dropped).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``.
      grad_out: optional ``dL/dout``, ``[B, T, Hq, Dv]``.
      mask, scale: as in ``attnjax.attention``.
    """
    return _influence(q, k, v, grad_out, mask, scale=scale)


@functools.partial(jax.jit, static_argnames="scale")
def _influence(q, k, v, grad_out, mask, *, scale):
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    spec = score_spec(q, k, scale)
    qg, kt, vt, q_idx, kv_idx = dense_operands(q, k, v)
    valid = allowed(mask, q_idx, kv_idx, spec)
    s = jnp.where(valid, raw_logits(qg, kt, q_idx, kv_idx, None, spec), -jnp.inf)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
    weights = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    if grad_out is None:
        influence = weights
    else:
        dout = to_groups(jnp.asarray(grad_out).transpose(0, 2, 1, 3), Hkv)
        g = jnp.einsum("bhgtd,bhsd->bhgts", dout, vt, preferred_element_type=jnp.float32)
        weighted = weights * g
        rest = 1.0 - weights
        eps = jnp.finfo(jnp.float32).eps
        dropped = weights * (jnp.sum(weighted, axis=-1, keepdims=True) - g) / jnp.where(rest > eps, rest, 1.0)
        influence = jnp.abs(jnp.where(rest > eps, dropped, weighted))
    return jnp.sum(influence, axis=0).reshape(Hq, T, S)


def min_loss_assignment(losses: np.ndarray, costs: np.ndarray, budget: int) -> np.ndarray:
    """One option per unit minimising the total loss with total cost ≤ ``budget`` (exact).

    A multiple-choice knapsack solved by dynamic programming over the integer cost: ``best[c]``
    is the least loss of the units so far at total cost ``c``; ``O(U·C·budget)`` time. Among
    equal losses the lower total cost wins, then the lower option index.

    Args:
      losses: float ``[U, C]``; costs: non-negative int ``[C]`` or ``[U, C]``; budget: int.
    Returns:
      int ``[U]``, the chosen option per unit. ``ValueError`` if even the cheapest choices exceed
      the budget.
    """
    losses = np.asarray(losses, np.float64)
    units, options = losses.shape
    costs = np.broadcast_to(np.asarray(costs, np.int64), (units, options))
    if costs.min() < 0:
        raise ValueError("costs must be non-negative")
    cheapest = int(costs.min(axis=1).sum())
    if cheapest > budget:
        raise ValueError(f"the budget {budget} is below the cheapest assignment's cost {cheapest}")
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((units, budget + 1), np.int32)
    for u in range(units):
        candidates = np.full((options, budget + 1), np.inf)
        for o in range(options):
            c = costs[u, o]
            if c <= budget:
                candidates[o, c:] = best[:budget + 1 - c] + losses[u, o]
        choice[u] = np.argmin(candidates, axis=0)
        best = candidates[choice[u], np.arange(budget + 1)]
    tolerance = 1e-12 * max(1.0, float(np.min(best)))
    cost = int(np.flatnonzero(best <= np.min(best) + tolerance)[0])
    picked = np.zeros(units, np.int64)
    for u in reversed(range(units)):
        picked[u] = choice[u, cost]
        cost -= costs[u, picked[u]]
    return picked


def _block_sums(x: np.ndarray, block_q: int, block_kv: int) -> np.ndarray:
    """``[H, T, S]`` -> per-tile sums ``[H, nq, nk]`` (zero padding)."""
    H, T, S = x.shape
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    padded = np.zeros((H, nq * block_q, nk * block_kv), np.float64)
    padded[:, :T, :S] = x
    return padded.reshape(H, nq, block_q, nk, block_kv).sum(axis=(2, 4))


def moa_profile(
    calibration: Sequence[tuple], *, density: float, alphas: Optional[Sequence[float]] = None,
    betas: Optional[Sequence[float]] = None, block_q: int = 64, block_kv: int = 64, sink: int = 64,
    mask: Optional[Mask] = Causal(), budget_lengths: Optional[Sequence[int]] = None,
    scale: Optional[float] = None,
) -> MoA:
    """MoA's profiling search for one layer: per-head ``(α, β)`` under a density budget (Fu et al., 2024).

    1. For each calibration input, ``attention_influence`` per head, summed over tiles and
       normalised so each input's total (over heads) is 1 (so every length counts equally).
    2. Each candidate rule (every ``(α, β)`` in ``alphas × betas`` whose span is positive at the
       shortest calibration length, as MoA filters) loses the influence outside its block pattern;
       a head's loss for a rule is the sum over the inputs.
    3. Cost = the rule's tile count under ``mask``, summed over ``N ∈ budget_lengths`` (default:
       the calibration key lengths); budget = ``density`` × heads × the mask's tile count summed
       over the same lengths. One rule per head minimising the total loss is found exactly by
       ``min_loss_assignment``. MoA solves this choice as a MILP (Gurobi) with one density bound
       per length and a Pareto sweep over per-length losses; with the lengths' tiles pooled into
       one budget and the losses summed, the MILP is a multiple-choice knapsack, which dynamic
       programming over integer tile counts solves exactly with no solver.
    Profile at two or more lengths to tell α (fixed) from β (elastic) apart; among rules with
    equal loss and cost, the one with the smaller span at the longest budget length, then the
    smaller β, wins.

    Args:
      calibration: ``(q, k, v)`` or ``(q, k, v, grad_out)`` tuples (one layer's inputs), shapes as in
        ``attention_influence``; lengths may differ between tuples.
      density: mean fraction of the mask's tiles that the heads may visit (pooled over
        ``budget_lengths``).
      alphas, betas: candidate grids (tokens, fractions). Defaults: α ∈ block_kv·{−16, −4, 0, 1,
        2, 4, 8, 16, 32, 64}, β ∈ {0, 1/8, …, 1}.
      block_q, block_kv, sink: as in ``MoA``.
      mask: the attention mask profiled and budgeted (structural; default causal).
      budget_lengths: key lengths ``N`` (with ``T = N``) at which tiles are counted.
      scale: logit scale for the influence, default ``1/sqrt(D)``.
    Returns:
      ``MoA`` with one ``(α, β)`` per query head.
    """
    if not calibration:
        raise ValueError("moa_profile needs at least one calibration input")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    alphas = block_kv * np.array([-16, -4, 0, 1, 2, 4, 8, 16, 32, 64], float) if alphas is None else alphas
    betas = np.linspace(0.0, 1.0, 9) if betas is None else betas
    lengths = [item[1].shape[1] for item in calibration]
    budget_lengths = sorted(set(lengths if budget_lengths is None else budget_lengths))

    grid_a, grid_b = (x.reshape(-1) for x in np.meshgrid(np.asarray(alphas, float), np.asarray(betas, float)))
    valid = moa_spans(grid_a, grid_b, min(lengths)) > 0
    order = np.lexsort((grid_b[valid], moa_spans(grid_a, grid_b, budget_lengths[-1])[valid]))
    cand_a, cand_b = grid_a[valid][order], grid_b[valid][order]
    if cand_a.size == 0:
        raise ValueError("no candidate rule has a positive span at the shortest calibration length")

    heads = calibration[0][0].shape[2]
    losses = np.zeros((heads, cand_a.size))
    for item in calibration:
        q, k, v = item[:3]
        grad_out = item[3] if len(item) > 3 else None
        T, S = q.shape[1], k.shape[1]
        influence = _block_sums(np.asarray(attention_influence(q, k, v, grad_out, mask=mask, scale=scale)),
                                block_q, block_kv)
        influence /= max(influence.sum(), np.finfo(np.float64).tiny)
        kept = np.einsum("hqk,cqk->hc", influence, moa_block_mask(cand_a, cand_b, sink, T, S, block_q, block_kv))
        losses += influence.sum(axis=(1, 2))[:, None] - kept

    costs, tiles = np.zeros(cand_a.size, np.int64), 0
    for N in budget_lengths:
        ok = allowed_blocks(mask, N, N, block_q, block_kv)
        if not isinstance(ok, np.ndarray):
            raise ValueError("moa_profile budgets with a structural mask (Causal, SlidingWindow, ...), not a data mask")
        ok = ok.reshape(-1, *ok.shape[-2:])[0]
        costs += (moa_block_mask(cand_a, cand_b, sink, N, N, block_q, block_kv) & ok).sum(axis=(1, 2))
        tiles += int(ok.sum())
    picked = min_loss_assignment(losses, costs, int(np.floor(density * heads * tiles)))
    return MoA(block_q=block_q, block_kv=block_kv, alphas=tuple(cand_a[picked]), betas=tuple(cand_b[picked]),
               sink=sink)


__all__ = ["MoA", "moa_spans", "moa_block_mask", "attention_influence", "min_loss_assignment", "moa_profile"]
