"""VAR: visual attention redistribution from visual sink tokens (Kang et al., ICLR 2025).

Kang, Kim, Kim, Hwang, "See What You Are Told: Visual Attention Sink in Large Multimodal Models", ICLR 2025
(arXiv:2503.03321); official code MICV-yonsei/VisAttnSink (``src/logic/logic.py``: ``DimProspector``,
``HeadFork``, ``VARProcessor.attn_redist``).

1. Sink tokens (sec. 4, eq. 2): a token whose hidden state ``x`` (the input of layer ``l``) is massive in the
   base LLM's sink dimensions ``D_sink``, ``φ(x) = max_{d ∈ D_sink} |x_d / RMS(x)| ≥ τ`` (``τ = 20``); the
   visual sinks are the sink tokens among the image tokens ``I_vis``.
2. Image-centric heads (sec. 5.1, eq. 3): for text query ``i`` in head ``h``, the visual non-sink ratio
   ``r_i = Σ_{j ∈ I_vis \\ Î_vis} α_ij / Σ_{j ∈ I_vis} α_ij``; the (row, head) is image-centric when
   ``r_i ≥ ρ`` and its image attention ``Σ_{j ∈ I_vis} α_ij ≥ 0.2``.
3. Redistribution (sec. 5.2, eq. 4), in image-centric rows only::

       α'_ij = p·α_ij                                   j ∈ Î (every sink token, text sinks such as BOS too)
       Ω     = (1 − p)·Σ_{j ∈ Î} α_ij
       α'_ij = α_ij + Ω·α_ij / Σ_{k ∈ I_vis \\ Î_vis} α_ik      j ∈ I_vis \\ Î_vis
       α'_ij = α_ij                                     other keys

   so rows keep summing to 1 and the budget goes to the non-sink image tokens in proportion to their attention.

Paper and official code: ``p`` is the fraction of sink attention kept, ``p = 0.6``, and the text sinks (outside
the image) give their ``(1 − p)`` share to the image too, as in ``attn_redist`` (``weight_budget_vis +
weight_budget_text``); ``ρ = 0.5`` and ``0.2`` are ``LogicEngine.activate``'s defaults (the paper reports
``ρ`` 0.8 / 0.5 / 0.9 for general / hallucination / vision-centric tasks). The code compares ``φ > τ`` and the
sink share ``≤ ρ`` (equal to ``r ≥ 1 − ρ``); this follows the paper's ``φ ≥ τ`` and ``r ≥ ρ``. The model leaves
its last layer unchanged (``except_last_layer``): a model-level choice (use ``VAR`` in the other layers).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import masks
from attnjax.blocked.flash_xla import flash_attention_xla
from attnjax.blocked.scores import allowed, dense_operands, raw_logits, score_spec
from attnjax.checks import check_positive, describe
from attnjax.masks import Mask

TAU = 20.0
"""``τ`` of the sink test ``φ(x) ≥ τ`` (paper, sec. 4; ``activate(tau=20)``)."""

P = 0.6
"""``p``, the fraction of sink attention kept (``activate(p=0.6)``)."""

RHO = 0.5
"""``ρ``, the least visual non-sink ratio of an image-centric row (``activate(rho=0.5)``)."""

MIN_IMAGE_MASS = 0.2
"""The least attention on the image of an image-centric row (paper, sec. 5.1; ``activate(summ=0.2)``)."""

RMS_EPS = 1e-6
"""``ε`` of ``RMS(x) = sqrt(mean(x²) + ε)`` in ``φ`` (``DimProspector.rmsnorm``)."""


def sink_dimension_values(hidden: jax.Array, sink_dims: Sequence[int]) -> jax.Array:
    """``φ(x) = max_{d ∈ D_sink} |x_d| / RMS(x)`` per token (Kang et al. 2025, eq. 2), float32 ``[B, S]``.

    Args:
      hidden: ``[B, S, d_model]`` hidden states, the input of the layer (the residual stream before its norm).
      sink_dims: the base LLM's sink dimensions ``D_sink`` (e.g. (1415, 2533) for LLaMA-2-7B in LLaVA-1.5-7B).
    """
    if not hasattr(hidden, "ndim") or hidden.ndim != 3:
        raise ValueError(f"hidden must be [batch, seq, d_model], got {describe(hidden)}")
    dims = tuple(sink_dims)
    if not dims or any(not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < hidden.shape[-1]
                       for d in dims):
        raise ValueError(f"sink_dims must be a non-empty sequence of ints in [0, {hidden.shape[-1]}) (the "
                         f"d_model of hidden {list(hidden.shape)}), got {sink_dims!r}")
    x = hidden.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(x * x, axis=-1) + RMS_EPS)
    return jnp.max(jnp.abs(x[..., jnp.asarray(dims)]), axis=-1) / rms


def sink_tokens(hidden: jax.Array, sink_dims: Sequence[int], tau: float = TAU) -> jax.Array:
    """The sink tokens ``Î = {j : φ(x_j) ≥ τ}`` of a layer (Kang et al. 2025, sec. 4), bool ``[B, S]``;
    ``sink_tokens(...) & image`` are the visual sinks."""
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau!r}")
    return sink_dimension_values(hidden, sink_dims) >= tau


@functools.partial(jax.tree_util.register_dataclass, data_fields=["image", "sinks", "within"], meta_fields=[])
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class VisualTokens(Mask):
    """The mask ``within`` (all keys when ``None``) carrying the token roles that ``VAR`` reads.

    As a mask it allows exactly what ``within`` allows, so any mechanism can take it; ``VAR`` requires it at the
    top level of ``mask`` (combine other masks inside ``within``). In a model, pass it as the layer's ``mask``,
    recomputing ``sinks`` from each layer's input hidden state (``sink_tokens``), e.g.
    ``layer(x, mask=VisualTokens(image, sink_tokens(h, dims), masks.Causal()))``.

    Attributes:
      image: bool ``[B, S]``, the image tokens ``I_vis`` among the keys.
      sinks: bool ``[B, S]``, the sink tokens ``Î`` (text and image) among the keys.
      within: the attention mask, or ``None``.
    """

    image: jax.Array
    sinks: jax.Array
    within: Optional[Mask] = None

    def __repr__(self) -> str:
        return f"VisualTokens(image={describe(self.image)}, sinks={describe(self.sinks)}, within={self.within!r})"

    @property
    def base(self) -> Mask:
        """``within``, or ``masks.Full()`` when ``None``."""
        return masks.Full() if self.within is None else self.within

    def check(self, batch, num_heads, T, S):
        for name in ("image", "sinks"):
            x = getattr(self, name)
            if not hasattr(x, "dtype") or x.dtype != jnp.bool_:
                raise TypeError(f"VisualTokens.{name} must be a bool [B, S] array, got {describe(x)}")
            if x.shape != (batch, S):
                raise ValueError(f"VisualTokens.{name} must have shape [B, S] = [{batch}, {S}], got {list(x.shape)}")
        self.base.check(batch, num_heads, T, S)

    def tile(self, q_idx, kv_idx, T, S):
        return self.base.tile(q_idx, kv_idx, T, S)

    def block_summary(self, T, S, block_q, block_kv):
        return self.base.block_summary(T, S, block_q, block_kv)


def _check_var(p: float, rho: float, min_image_mass: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p (the fraction of sink attention kept) must be in [0, 1], got {p!r}")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho (the least visual non-sink ratio) must be in (0, 1], got {rho!r}")
    if not 0.0 < min_image_mass <= 1.0:
        raise ValueError(f"min_image_mass must be in (0, 1], got {min_image_mass!r}")


def _roles(image: jax.Array, sinks: jax.Array, q: jax.Array, k: jax.Array) -> None:
    VisualTokens(image, sinks).check(q.shape[0], q.shape[2], q.shape[1], k.shape[1])


def _text_queries(image: jax.Array, T: int) -> jax.Array:
    """Query rows that are not image tokens, bool ``[B, T]``; query ``i`` sits at key position ``i + S − T``."""
    return ~image[:, image.shape[1] - T:]


def var_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, image: jax.Array, sinks: jax.Array,
                            p: float = P, rho: float = RHO, min_image_mass: float = MIN_IMAGE_MASS,
                            mask: Optional[Mask] = None, scale: Optional[float] = None) -> jax.Array:
    """VAR attention, naive: the whole ``[B, Hq, T, S]`` softmax map in float32 with eqs. 3-4 of Kang et al. 2025
    applied to it as written (module docstring).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` with ``Hq % Hkv == 0``.
      image: bool ``[B, S]``, the image tokens; sinks: bool ``[B, S]``, the sink tokens (``sink_tokens``).
      p: fraction of sink attention kept; rho: least visual non-sink ratio; min_image_mass: least image attention
        of a redistributed row. Only rows of text queries (not image tokens; query ``i`` at position
        ``i + S − T``) are redistributed.
      mask, scale: as ``attnjax.attention``.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    _check_var(p, rho, min_image_mass)
    _roles(image, sinks, q, k)
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    spec = score_spec(q, k, scale)
    qg, kt, vt, q_idx, kv_idx = dense_operands(q, k, v)
    s = raw_logits(qg, kt, q_idx, kv_idx, None, spec).reshape(B, Hq, T, S)
    ok = jnp.broadcast_to(allowed(mask, q_idx, kv_idx, spec), (B, Hkv, Hq // Hkv, T, S)).reshape(B, Hq, T, S)
    a = jnp.where(ok, jax.nn.softmax(jnp.where(ok, s, -jnp.inf), axis=-1), 0.0)
    img, snk = image[:, None, None, :], sinks[:, None, None, :]
    vis = jnp.where(img, a, 0.0).sum(-1, keepdims=True)
    vis_rest = jnp.where(img & ~snk, a, 0.0).sum(-1, keepdims=True)
    held = lax.stop_gradient
    centric = (_text_queries(image, T)[:, None, :, None] & (held(vis) >= min_image_mass)
               & (held(vis_rest) >= rho * held(vis)))
    budget = (1.0 - p) * jnp.where(snk, a, 0.0).sum(-1, keepdims=True)
    moved = jnp.where(snk, p * a, jnp.where(img, a + budget * a / jnp.where(centric, vis_rest, 1.0), a))
    a = jnp.where(centric, moved, a)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", a.reshape(B, Hkv, Hq // Hkv, T, S), vt.astype(jnp.float32))
    return out.reshape(B, Hq, T, -1).transpose(0, 2, 1, 3).astype(q.dtype)


def var_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, image: jax.Array, sinks: jax.Array,
                      p: float = P, rho: float = RHO, min_image_mass: float = MIN_IMAGE_MASS,
                      mask: Optional[Mask] = None, scale: Optional[float] = None, block_q: int = 512,
                      block_kv: int = 512) -> jax.Array:
    """VAR attention without a ``[T, S]`` map: same arguments and result as ``var_attention_reference``.

    The keys split into four sets: visual sinks ``SV``, text sinks ``ST``, non-sink image tokens ``V``, the rest
    ``R``. One ``flash_attention_xla`` call per set (``mask`` & the set's columns) gives its normalized output
    ``out_X`` and log-sum-exp; ``m_X = exp(lse_X − lse)`` is the row's mass on the set. Eq. 3 is ``m_V ≥ ρ·(m_SV +
    m_V)`` with ``m_SV + m_V ≥ min_image_mass``, and eq. 4's row is ``p·(m_SV·out_SV + m_ST·out_ST) + (m_V + (1 −
    p)·(m_SV + m_ST))·out_V + m_R·out_R`` (every non-sink image token gains in proportion to its weight, so
    their normalized average ``out_V`` is unchanged). Cost: four flash forwards over disjoint key sets (about
    four forwards' work, with the mask tiles of each), memory ``O(T)``; gradients flow to q, k, v.
    """
    _check_var(p, rho, min_image_mass)
    _roles(image, sinks, q, k)
    T = q.shape[1]
    flash = functools.partial(flash_attention_xla, scale=scale, return_lse=True, block_q=block_q, block_kv=block_kv)
    parts = {}
    for name, columns in (("SV", sinks & image), ("ST", sinks & ~image), ("V", image & ~sinks),
                          ("R", ~image & ~sinks)):
        keys = masks.Explicit(columns[:, None, None, :])
        out, lse = flash(q, k, v, mask=keys if mask is None else mask & keys)
        parts[name] = (out.astype(jnp.float32), lse)
    total = functools.reduce(jnp.logaddexp, [lse for _, lse in parts.values()])
    some = jnp.isfinite(total)
    mass = {}
    for name, (_, lse) in parts.items():
        live = jnp.isfinite(lse) & some
        mass[name] = jnp.where(live, jnp.exp(jnp.where(live, lse, 0.0) - jnp.where(live, total, 0.0)), 0.0)[..., None]
    held = {name: lax.stop_gradient(m) for name, m in mass.items()}
    vis = held["SV"] + held["V"]
    centric = _text_queries(image, T)[:, :, None, None] & (vis >= min_image_mass) & (held["V"] >= rho * vis)
    out = {name: o for name, (o, _) in parts.items()}
    plain = sum(mass[n] * out[n] for n in parts)
    moved = (p * (mass["SV"] * out["SV"] + mass["ST"] * out["ST"])
             + (mass["V"] + (1.0 - p) * (mass["SV"] + mass["ST"])) * out["V"] + mass["R"] * out["R"])
    return jnp.where(centric, moved, plain).astype(q.dtype)


def _roles_of(mask: Optional[Mask]) -> VisualTokens:
    if not isinstance(mask, VisualTokens):
        raise ValueError(f"mechanism 'var' needs mask=VisualTokens(image, sinks, within) (the token roles), got "
                         f"mask={mask!r}")
    return mask


def _var_path(fn, options: dict, q, k, v, *, mask=None, scale=None):
    roles = _roles_of(mask)
    return fn(q, k, v, image=roles.image, sinks=roles.sinks, mask=roles.within, scale=scale, **options)


@dataclasses.dataclass(frozen=True)
class VAR:
    """Visual attention redistribution as a mechanism config (Kang et al., ICLR 2025; module docstring).

    The token roles come with the mask: ``attnjax.attention(q, k, v, mechanism=VAR(), mask=VisualTokens(image,
    sinks, masks.Causal()))``, and in a model ``MultiHeadAttention(..., mechanism=VAR())`` called with that mask.
    Not in ``attnjax.registry`` (it needs the roles, which a registry request does not carry). A row depends on
    its own query and the keys only, so a one-token query against a KV cache gives the row of the full call
    (``decodes``; ``MultiHeadAttention.decode`` itself runs softmax only).

    Attributes:
      p, rho, min_image_mass: see ``var_attention_reference``.
      block_q, block_kv: tiles of the xla path.
    """

    p: float = P
    rho: float = RHO
    min_image_mass: float = MIN_IMAGE_MASS
    block_q: int = 512
    block_kv: int = 512

    name: ClassVar[str] = "var"
    family: ClassVar[str] = "inference"
    paper: ClassVar[str] = "Kang et al. 2025 (See What You Are Told: Visual Attention Sink in LMMs, ICLR; VAR)"
    supports: ClassVar[frozenset] = frozenset({"mask", "gqa", "cross"})
    decodes: ClassVar[bool] = True
    sequence_parallel: ClassVar[tuple] = ()

    def __post_init__(self):
        _check_var(self.p, self.rho, self.min_image_mass)
        check_positive(block_q=self.block_q, block_kv=self.block_kv)

    def implementations(self):
        options = dict(p=self.p, rho=self.rho, min_image_mass=self.min_image_mass)
        return {"reference": functools.partial(_var_path, var_attention_reference, options),
                "xla": functools.partial(_var_path, var_attention_xla,
                                         dict(options, block_q=self.block_q, block_kv=self.block_kv))}


__all__ = ["TAU", "P", "RHO", "MIN_IMAGE_MASS", "RMS_EPS", "sink_dimension_values", "sink_tokens", "VisualTokens",
           "var_attention_reference", "var_attention_xla", "VAR"]
