"""ACT: training-free calibration of hidden attention sinks (Yu et al., ICML 2024).

Yu, Wang, Fu, Shi, Shaikh, Lin, "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models
without Training through Attention Calibration", ICML 2024 (arXiv:2406.15765); official code GATECH-EIC/ACT
(``models/llama_modelling_aug.py``, ``atten_process_eval``; ``scripts/calibration.sh``).

In a calibrated head, with softmax map ``A [T, S]``::

    s_j   = (1 / n_j) Σ_i A_ij              mean attention key j receives (n_j: queries allowed to see j)
    Ŝ     = {j > 0 : s_j > α / N}           the sinks (N = S keys; key 0, the usual sink, is kept)
    m_i   = Σ_{j∈Ŝ} A_ij                    row i's sink mass
    A'_ij = β A_ij                          j ∈ Ŝ
    A'_ij = A_ij + (1 − β) m_i A_ij / (1 − m_i)      j ∉ Ŝ   (the removed mass, in proportion to A_ij)
    out_i = Σ_j A'_ij v_j

Rows keep summing to 1; a row with no mass outside ``Ŝ`` is left as it is. Heads are chosen offline
(``search_act_heads``): each head is calibrated alone on a small calibration set, and the heads whose
calibration raises the task metric are kept (the paper's head filtering; ``scripts/calibration.sh`` loops over
(layer, head)).

Paper and official code: the paper thresholds ``s_j`` at ``α/N``; the official scripts compare the same
statistic (column sum over ``arange(T, 0, -1)``, the causal ``n_j``) with a fixed ``THRES=0.1``, which is
``α = 0.1·N`` at length ``N``. The code drops the first detected sink (the initial token); here key 0 is never a
sink. ``β = 0.4`` (``BETA``) is the official scripts' kept fraction. The redistribution follows
``atten_process_eval`` (``ratios``: the non-sink weights of the row, renormalized).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from attnjax import masks
from attnjax.blocked.flash_xla import flash_attention_xla
from attnjax.blocked import tiles
from attnjax.blocked.scores import allowed, dense_operands, raw_logits, score_spec
from attnjax.checks import check_positive, describe
from attnjax.masks import Mask
from attnjax.nn.attention import MultiHeadAttention
from attnjax.tiling import num_tiles

BETA = 0.4
"""``β`` of the official scripts (``scripts/calibration.sh``: ``BETA=0.4``): the fraction of a sink's attention
that stays on it."""


def check_heads(heads: object) -> tuple[int, ...]:
    """``heads`` as a tuple of distinct non-negative ints, else ``ValueError``/``TypeError`` naming ``heads``."""
    try:
        values = tuple(heads)
    except TypeError:
        raise TypeError(f"heads must be a sequence of query-head indices, got {describe(heads)}") from None
    for h in values:
        if not isinstance(h, int) or isinstance(h, bool):
            raise TypeError(f"heads must hold ints (query-head indices), got {describe(h)} in {values!r}")
        if h < 0:
            raise ValueError(f"heads must be non-negative query-head indices, got {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"heads must be distinct, got {values!r}")
    return values


def _check_act(q: jax.Array, heads: tuple[int, ...], alpha: float, beta: float) -> None:
    if heads and max(heads) >= q.shape[2]:
        raise ValueError(f"heads {heads!r} must index the {q.shape[2]} query heads of q {list(q.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive (the sink threshold is alpha / N), got {alpha!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta (the fraction of sink attention kept) must be in [0, 1], got {beta!r}")


def _head_mask(heads: tuple[int, ...], num_heads: int) -> jax.Array:
    return jnp.asarray(np.isin(np.arange(num_heads), heads))


def act_sinks_of_scores(scores: jax.Array, heads: Sequence[int], alpha: float) -> jax.Array:
    """The sink set ``Ŝ`` of each head from mean received attention ``scores [B, Hq, S]``: bool ``[B, Hq, S]``,
    ``s_j > α/S`` at ``j > 0`` in the query heads ``heads`` (False in the others)."""
    S = scores.shape[-1]
    heads = check_heads(heads)
    selected = _head_mask(heads, scores.shape[1])[None, :, None]
    return (scores > alpha / S) & (jnp.arange(S) > 0) & selected


def mean_received_attention(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
                            scale: Optional[float] = None, block_q: int = 128, block_kv: int = 128) -> jax.Array:
    """``s_j = (1/n_j) Σ_i A_ij``: the mean softmax attention key ``j`` receives from the ``n_j`` queries allowed to
    see it (0 when none), float32 ``[B, Hq, S]``. Not differentiated (a selection statistic).

    No ``[T, S]`` map: the row log-sum-exp ``lse_i`` comes from a ``flash_attention_xla`` forward (values of width
    1), then each ``block_q × block_kv`` tile adds ``Σ_i exp(s_ij − lse_i)`` and its count of allowed queries to
    its key columns. Memory ``O(B·Hq·(block_q·block_kv + T + S))``; time two score passes over every tile.

    ``q [B, T, Hq, D]``, ``k [B, S, Hkv, D]``, ``mask`` and ``scale`` as ``attnjax.attention``.
    (``attnjax.analysis.sinks.sink_scores`` computes the same statistic on the analysis floor.)
    """
    check_positive(block_q=block_q, block_kv=block_kv)
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    bq, bk = min(block_q, T), min(block_kv, S)
    _, lse = flash_attention_xla(q, k, jnp.zeros((B, S, Hkv, 1), q.dtype), mask=mask, scale=scale,
                                 return_lse=True, block_q=bq, block_kv=bk)
    spec = score_spec(q, k, scale)
    q_tiles_, lse_tiles = tiles.q_tiles(q, bq, Hkv), tiles.row_tiles(lse, bq, Hkv)  # [nq, B, Hkv, G, bq, ...]
    kt = tiles.kv_tiles(k, bk)
    starts = jnp.arange(num_tiles(T, bq)) * bq

    def key_tile(start_k):
        kv_idx = start_k + jnp.arange(bk)
        kj = lax.dynamic_slice_in_dim(kt, start_k, bk, axis=2)

        def query_tile(carry, xs):
            start_q, qi, li = xs
            q_idx = start_q + jnp.arange(bq)
            s = raw_logits(qi, kj, q_idx, kv_idx, None, spec)
            ok = jnp.broadcast_to(allowed(mask, q_idx, kv_idx, spec) & (q_idx < T)[:, None], s.shape)
            p = jnp.where(ok, jnp.exp(jnp.where(ok, s - li[..., None], -jnp.inf)), 0.0)
            return (carry[0] + p.sum(-2), carry[1] + ok.sum(-2, dtype=jnp.float32)), None

        zeros = jnp.zeros((B, Hkv, Hq // Hkv, bk), jnp.float32)
        return lax.scan(query_tile, (zeros, zeros), (starts, q_tiles_, lse_tiles))[0]

    mass, seen = lax.map(key_tile, jnp.arange(num_tiles(S, bk)) * bk)  # [nk, B, Hkv, G, bk]
    mass, seen = (jnp.moveaxis(x, 0, 3).reshape(B, Hq, -1)[..., :S] for x in (mass, seen))
    return jnp.where(seen > 0, mass / jnp.maximum(seen, 1.0), 0.0)


def act_sinks(q: jax.Array, k: jax.Array, *, heads: Sequence[int], alpha: float, mask: Optional[Mask] = None,
              scale: Optional[float] = None, block_q: int = 128, block_kv: int = 128) -> jax.Array:
    """ACT's sink tokens ``Ŝ`` (bool ``[B, Hq, S]``) of the heads ``heads``: ``mean_received_attention > α/S`` at
    keys ``j > 0`` (Yu et al. 2024; see the module docstring)."""
    heads = check_heads(heads)
    _check_act(q, heads, alpha, BETA)
    scores = mean_received_attention(q, k, mask=mask, scale=scale, block_q=block_q, block_kv=block_kv)
    return act_sinks_of_scores(scores, heads, alpha)


def act_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, heads: Sequence[int], alpha: float,
                            beta: float = BETA, mask: Optional[Mask] = None,
                            scale: Optional[float] = None) -> jax.Array:
    """ACT-calibrated softmax attention, naive: the whole ``[B, Hq, T, S]`` map in float32, the module docstring's
    equations applied to it as written (Yu et al. 2024, sec. 4; official ``atten_process_eval``).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` with ``Hq % Hkv == 0``.
      heads: query heads to calibrate (the others are plain softmax).
      alpha: sink threshold ``α``: key ``j > 0`` is a sink when its mean received attention exceeds ``α/S``.
      beta: fraction of each sink's attention kept (``BETA``); the rest goes to the row's other keys in
        proportion to their attention.
      mask, scale: as ``attnjax.attention``.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype (0 on rows with no allowed key).
    """
    heads = check_heads(heads)
    _check_act(q, heads, alpha, beta)
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    spec = score_spec(q, k, scale)
    qg, kt, vt, q_idx, kv_idx = dense_operands(q, k, v)
    s = raw_logits(qg, kt, q_idx, kv_idx, None, spec).reshape(B, Hq, T, S)
    ok = jnp.broadcast_to(allowed(mask, q_idx, kv_idx, spec), (B, Hkv, Hq // Hkv, T, S)).reshape(B, Hq, T, S)
    p = jnp.where(ok, jax.nn.softmax(jnp.where(ok, s, -jnp.inf), axis=-1), 0.0)
    seen = ok.sum(axis=2)
    scores = jnp.where(seen > 0, lax.stop_gradient(p).sum(axis=2) / jnp.maximum(seen, 1), 0.0)
    sinks = act_sinks_of_scores(scores, heads, alpha)[:, :, None, :]
    sink_mass = jnp.where(sinks, p, 0.0).sum(-1, keepdims=True)
    rest_mass = jnp.where(sinks, 0.0, p).sum(-1, keepdims=True)
    gain = 1.0 + (1.0 - beta) * sink_mass / jnp.where(rest_mass > 0, rest_mass, 1.0)
    calibrated = jnp.where(sinks, beta * p, p * gain)
    calibrated = jnp.where(rest_mass > 0, calibrated, p)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", calibrated.reshape(B, Hkv, Hq // Hkv, T, S), vt.astype(jnp.float32))
    return out.reshape(B, Hq, T, -1).transpose(0, 2, 1, 3).astype(q.dtype)


def act_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, heads: Sequence[int], alpha: float,
                      beta: float = BETA, mask: Optional[Mask] = None, scale: Optional[float] = None,
                      block_q: int = 512, block_kv: int = 512) -> jax.Array:
    """ACT-calibrated attention without a ``[T, S]`` map: same arguments and result as ``act_attention_reference``.

    The sinks come from ``mean_received_attention`` (a column statistic, tile by tile). With them, the calibrated
    row mixes two softmax attentions, over the sink keys (``out_S``, ``lse_S``) and over the others (``out_N``,
    ``lse_N``): two ``flash_attention_xla`` calls under ``mask`` and the sink (non-sink) columns. ``m = σ(lse_S −
    lse_N)`` is the row's sink mass and ``out = β·m·out_S + (1 − β·m)·out_N`` (``β·m`` stays on the sinks; the
    non-sink keys, whose normalized weights ``out_N`` averages over, get the rest). Cost: the column statistic (a
    flash forward without values and one score pass) plus two flash forwards; memory ``O(B·Hq·(block_q·block_kv
    + T + S))``, no ``[T, S]`` map.
    Gradients flow to q, k, v through both flash calls (the sink set is a constant of the input).
    """
    heads = check_heads(heads)
    _check_act(q, heads, alpha, beta)
    scores = mean_received_attention(q, k, mask=mask, scale=scale, block_q=block_q, block_kv=block_kv)
    sinks = act_sinks_of_scores(scores, heads, alpha)
    columns = sinks[:, :, None, :]
    on_sinks = masks.Explicit(columns) if mask is None else mask & masks.Explicit(columns)
    off_sinks = masks.Explicit(~columns) if mask is None else mask & masks.Explicit(~columns)
    flash = functools.partial(flash_attention_xla, scale=scale, return_lse=True, block_q=block_q, block_kv=block_kv)
    out_s, lse_s = flash(q, k, v, mask=on_sinks)
    out_n, lse_n = flash(q, k, v, mask=off_sinks)
    both = jnp.isfinite(lse_s) & jnp.isfinite(lse_n)
    m = jnp.where(both, jax.nn.sigmoid(jnp.where(both, lse_s - lse_n, 0.0)), 0.0)[..., None]
    mixed = beta * m * out_s.astype(jnp.float32) + (1.0 - beta * m) * out_n.astype(jnp.float32)
    out = jnp.where(jnp.isfinite(lse_n)[..., None], mixed, out_s.astype(jnp.float32))
    return out.astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class ACT:
    """ACT-calibrated softmax attention as a mechanism config (Yu et al., ICML 2024; module docstring).

    ``attnjax.attention(q, k, v, mechanism=ACT(heads=(3, 7), alpha=...), mask=masks.Causal())``, or one layer of a
    model: ``MultiHeadAttention(..., mechanism=ACT(...))``, or ``act_layers`` on a built (trained) model. It is not
    in ``attnjax.registry`` (its heads are per layer, and ``alpha`` has no model-independent default), so the
    registry's conformance suites do not list it; ``tests/inference/test_calibration.py`` runs the same
    conformance check on it. Not decodable from a KV cache: the sinks are a statistic over all queries of the call.

    Attributes:
      heads: query heads to calibrate in this layer (``search_act_heads`` finds them).
      alpha: sink threshold ``α`` (key ``j > 0`` is a sink when its mean received attention exceeds ``α/S``).
      beta: fraction of a sink's attention kept (official ``BETA = 0.4``).
      block_q, block_kv: tiles of the xla path.
    """

    heads: tuple
    alpha: float
    beta: float = BETA
    block_q: int = 512
    block_kv: int = 512

    name: ClassVar[str] = "act"
    family: ClassVar[str] = "inference"
    paper: ClassVar[str] = "Yu et al. 2024 (Unveiling and Harnessing Hidden Attention Sinks, ICML; ACT)"
    supports: ClassVar[frozenset] = frozenset({"mask", "gqa", "cross"})
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ()

    def __post_init__(self):
        object.__setattr__(self, "heads", check_heads(self.heads))
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive (the sink threshold is alpha / N), got {self.alpha!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta (the fraction of sink attention kept) must be in [0, 1], got {self.beta!r}")
        check_positive(block_q=self.block_q, block_kv=self.block_kv)

    def implementations(self):
        options = dict(heads=self.heads, alpha=self.alpha, beta=self.beta)
        return {"reference": functools.partial(act_attention_reference, **options),
                "xla": functools.partial(act_attention_xla, block_q=self.block_q, block_kv=self.block_kv, **options)}


def attention_layers(model: nnx.Module) -> list[MultiHeadAttention]:
    """The ``MultiHeadAttention`` layers of ``model`` (subclasses included) in graph order (``nnx.iter_graph``)."""
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, MultiHeadAttention)]


def act_layers(model: nnx.Module, heads: Sequence[Sequence[int]], *, alpha: float,
               beta: float = BETA) -> list[MultiHeadAttention]:
    """Calibrate a built model in place: the ``l``-th softmax ``MultiHeadAttention`` layer (``attention_layers``
    order) gets ``mechanism=ACT(heads=heads[l], alpha=alpha, beta=beta)``; layers with no heads stay softmax.
    No weights change. Returns the layers.

    Raises:
      ValueError: ``len(heads)`` differs from the number of attention layers.
      NotImplementedError: a layer to calibrate has a mechanism other than softmax, or a configuration ACT does
        not serve (``ACT.supports``: no position bias, attention dropout or separate K/V head counts).
    """
    layers = attention_layers(model)
    if len(heads) != len(layers):
        raise ValueError(f"heads has {len(heads)} entries but the model has {len(layers)} MultiHeadAttention layers")
    configs = [ACT(heads=tuple(h), alpha=alpha, beta=beta) if len(h) else None for h in heads]
    for i, (layer, config) in enumerate(zip(layers, configs)):
        if config is None:
            continue
        if layer.mechanism.name != "softmax":
            raise NotImplementedError(f"attention layer {i} has mechanism {layer.mechanism.name!r}; ACT calibrates "
                                      "softmax attention")
        unsupported = {"bias": layer.position_bias is not None, "dropout": layer.dropout_rate > 0,
                       "kv_heads": layer.num_v_heads != layer.num_kv_heads}
        missing = sorted(o for o, used in unsupported.items() if used and o not in ACT.supports)
        if missing or layer.sequence_parallel is not None:
            raise NotImplementedError(f"attention layer {i} needs {missing or ['sequence_parallel']}, which ACT "
                                      f"does not support (it supports {sorted(ACT.supports)})")
    for layer, config in zip(layers, configs):
        if config is not None:
            layer.mechanism = config
    return layers


def search_act_heads(evaluate: Callable[[tuple[tuple[int, ...], ...]], float], num_layers: int, num_heads: int,
                     *, layers: Optional[Sequence[int]] = None) -> tuple[tuple[int, ...], ...]:
    """ACT's head filtering (Yu et al. 2024, sec. 4; official ``scripts/calibration.sh``): calibrate one head at a
    time on a small calibration set and keep the heads whose calibration raises the metric.

    Args:
      evaluate: ``heads_per_layer -> metric`` (higher is better, e.g. accuracy on the calibration set), with
        ``heads_per_layer`` one tuple of query heads per layer (e.g. ``act_layers(model, heads_per_layer, ...)``
        on a fresh copy of the model, then the task).
      num_layers, num_heads: the model's attention layers and query heads per layer.
      layers: the layers to search (default all; the official script searches layers 2 to 30 of 32).
    Returns:
      One tuple per layer of the heads whose calibration alone scores above the uncalibrated model; called
      ``1 + len(layers)·num_heads`` times.
    """
    check_positive(num_layers=num_layers, num_heads=num_heads)
    layers = tuple(range(num_layers)) if layers is None else tuple(layers)
    if any(not isinstance(l, int) or not 0 <= l < num_layers for l in layers):
        raise ValueError(f"layers must be layer indices in [0, {num_layers}), got {layers!r}")
    none = ((),) * num_layers
    baseline = float(evaluate(none))
    keep: list[list[int]] = [[] for _ in range(num_layers)]
    for layer in layers:
        for head in range(num_heads):
            trial = list(none)
            trial[layer] = (head,)
            if float(evaluate(tuple(trial))) > baseline:
                keep[layer].append(head)
    return tuple(tuple(h) for h in keep)


__all__ = ["BETA", "ACT", "act_attention_reference", "act_attention_xla", "act_sinks", "act_sinks_of_scores",
           "mean_received_attention", "attention_layers", "act_layers", "search_act_heads", "check_heads"]
