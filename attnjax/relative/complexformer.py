"""ComplexFormer's Complex Multi-Head Attention (CMHA): Euler transform plus adaptive differential rotation.

Shao et al., "ComplexFormer: Disruptively Advancing Transformer Inference Ability via Head-Specific
Complex Vector Attention", arXiv:2505.10222 (2025). The paper was withdrawn (v2 is a one-line
withdrawal notice) and its method section, with its equation numbers, could not be read; what is
implemented here is the abstract's form, ``exp[i(Adapt(AS_mn,i) + Δ(P_mn),i)]``, made exact by the
authors' released code (github.com/shaojintian/complexFormer, ``attention/cmha_with_kv_cache.py``,
``ComplexMultiHeadAttentionV2``). Per head, a query/key vector ``x ∈ R^D`` is read as ``D/2`` complex
numbers ``x[r] + i·x[r + D/2]`` (the rotate-half layout of ``attnjax.positional.RoPE``) and

- Euler transform: ``ρ_r = sqrt(x[r]² + x[r + D/2]² + ε)``, ``φ_r = atan2(x[r + D/2], x[r])``;
- semantic angle difference ``AS_mn,r = φ^q_m,r − φ^k_n,r`` and its per-head adaptation
  ``Adapt(AS) = δ_h,r·AS + β_h,r`` (learned ``δ``, ``β``);
- relative position delta ``Δ(P_mn)_r = (m − n)·ω_r`` with ``ω_r = base^(−2r/D)``;
- score ``s_mn = scale · Re Σ_r ρ^q_m,r ρ^k_n,r exp(i(Adapt(AS_mn,r) + Δ(P_mn)_r))``, then
  ``softmax_n(s_mn + mask) V``.

Choices where the paper could not be read (all from the released code): ``ε = 1e-9``, ``base = 10000``,
no ``1/√D`` on the scores (``scale = 1``), and ``δ``, ``β`` of shape ``[heads, D/2]`` (one per head and
frequency). With ``δ = 1``, ``β = 0`` (and ``ε = 0``) the score is RoPE attention's ``q_mᵀ R_(m−n) k_n``.

The score is a real inner product of per-token transforms (see ``cmha_transform``): since
``δ(φ^q − φ^k) + β + (m − n)ω = (δφ^q + β + mω) − (δφ^k + nω)``,
``s_mn = scale · q̃_m · k̃_n`` with ``q̃ = ρ^q[cos a_q, sin a_q]``, ``a_q = δφ^q + β + mω`` and
``k̃ = ρ^k[cos a_k, sin a_k]``, ``a_k = δφ^k + nω``. So the fast path transforms each token once
(O((T + S)·H·D)) and runs ``attnjax.attention`` (blocked / flash, O(T·tile) memory, any mask, KV cache
of transformed keys), and the score depends on positions only through ``m − n``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.api import attention
from attnjax.checks import check_qkv, check_scalar, describe
from attnjax.masks import Mask, query_positions

DEFAULT_BASE = 10000.0
"""``ω_r = base^(−2r/D)``: the released code's frequencies (RoPE's)."""

DEFAULT_EPS = 1e-9
"""``ε`` under the modulus' square root, as in the released code; keeps ``∂ρ`` finite at ``x = 0``."""

DEFAULT_SCALE = 1.0
"""The released code softmaxes the scores unscaled (no ``1/√D``)."""


def cmha_frequencies(head_dim: int, base: float = DEFAULT_BASE) -> jax.Array:
    """``ω_r = base^(−2r/D)`` for ``r < D/2``, float32 ``[D/2]``: the per-frequency rate of ``Δ(P_mn)``."""
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"CMHA needs an even head_dim (D/2 complex components per head), got {head_dim!r}")
    if not base > 0:
        raise ValueError(f"base must be positive, got {base!r}")
    return jnp.asarray(base, jnp.float32) ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def euler_transform(x: jax.Array, eps: float = DEFAULT_EPS) -> tuple[jax.Array, jax.Array]:
    """Polar form of ``x [..., D]`` read as ``D/2`` complex numbers ``x[r] + i·x[r + D/2]``.

    Returns float32 ``(ρ, φ)``, each ``[..., D/2]``: ``ρ = sqrt(re² + im² + ε)``,
    ``φ = atan2(im, re) ∈ (−π, π]`` (ComplexFormer's per-head Euler transform). At ``re = im = 0`` the
    phase is 0 with zero gradient (``atan2``'s own gradient is 0/0 there).
    """
    half = x.shape[-1] // 2
    x = x.astype(jnp.float32)
    re, im = x[..., :half], x[..., half:]
    r2 = re * re + im * im
    origin = r2 == 0
    phase = jnp.arctan2(jnp.where(origin, 0.0, im), jnp.where(origin, 1.0, re))
    return jnp.sqrt(r2 + eps), phase


def cmha_transform(x: jax.Array, positions: jax.Array, delta: jax.Array, bias: Optional[jax.Array] = None, *,
                   base: float = DEFAULT_BASE, eps: float = DEFAULT_EPS) -> jax.Array:
    """The per-token half of CMHA's rotation: ``x̃ = ρ·[cos a, sin a]``, ``a = δ_h·φ + β_h + p·ω``.

    Args:
      x: ``[B, L, H, D]`` queries or keys (``D`` even).
      positions: ``[L]`` or ``[B, L]`` positions ``p`` of the tokens.
      delta: ``[H, D/2]`` adaptive scale ``δ`` of the semantic angle.
      bias: ``[H, D/2]`` adaptive offset ``β`` (queries), or ``None`` (keys: the offset is added once).
      base, eps: as in ``cmha_frequencies`` and ``euler_transform``.
    Returns:
      ``[B, L, H, D]`` in x's dtype, laid out ``[ρ cos a, ρ sin a]`` so that
      ``q̃_m · k̃_n = Σ_r ρ^q ρ^k cos(δ(φ^q − φ^k) + β + (m − n)ω)``. Cost O(B·L·H·D).
    """
    B, L, H, D = x.shape
    omega = cmha_frequencies(D, base)
    rho, phi = euler_transform(x, eps)
    p = jnp.broadcast_to(jnp.asarray(positions, jnp.float32), (B, L))
    angle = delta.astype(jnp.float32) * phi + p[:, :, None, None] * omega
    if bias is not None:
        angle = angle + bias.astype(jnp.float32)
    return jnp.concatenate([rho * jnp.cos(angle), rho * jnp.sin(angle)], axis=-1).astype(x.dtype)


def cmha_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, delta: jax.Array, bias: jax.Array, *,
    q_positions: Optional[jax.Array] = None, kv_positions: Optional[jax.Array] = None, mask: Optional[Mask] = None,
    scale: float = DEFAULT_SCALE, base: float = DEFAULT_BASE, eps: float = DEFAULT_EPS,
) -> jax.Array:
    """CMHA's dense equation: every ``[T, S, D/2]`` rotation of every head, in float32.

    ``s_mn = scale · Σ_r ρ^q_m,r ρ^k_n,r cos(δ_h,r(φ^q_m,r − φ^k_n,r) + β_h,r + (p_m − p_n)·ω_r)``,
    ``out_m = Σ_n softmax_n(s_mn | mask) v_n`` (Shao et al. 2025, abstract's
    ``exp[i(Adapt(AS_mn,i) + Δ(P_mn),i)]``; exact form from the released code, see the module docstring).

    Args:
      q: ``[B, T, Hq, D]``, ``D`` even; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``,
        query head ``h`` reads K/V head ``h // (Hq // Hkv)``.
      delta: ``[Hkv, D/2]``: ``δ`` of K/V head ``g`` serves its whole query group (it multiplies both
        phases, so query heads sharing a key must share it; with ``Hq == Hkv`` it is per head, as in
        the paper).
      bias: ``[Hq, D/2]`` adaptive offsets ``β``, per query head.
      q_positions: ``[T]`` or ``[B, T]`` (default ``arange(T) + S − T``, bottom-right aligned like
        ``attnjax.masks``); kv_positions: ``[S]`` or ``[B, S]`` (default ``arange(S)``).
      mask: an ``attnjax.masks`` value; a row with no allowed key outputs 0.
      scale: logit scale (default 1, the released code's).
      base, eps: ``ω_r = base^(−2r/D)`` and the modulus' ``ε``.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    q_positions, kv_positions = check_cmha(q, k, v, delta, bias, q_positions, kv_positions, mask, scale=scale,
                                           base=base, eps=eps)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    omega = cmha_frequencies(D, base)
    rho_q, phi_q = euler_transform(q, eps)                                   # [B, T, Hq, R]
    rho_k, phi_k = (jnp.repeat(a, group, axis=2) for a in euler_transform(k, eps))
    delta_q = jnp.repeat(delta.astype(jnp.float32), group, axis=0)           # [Hq, R]
    semantic = phi_q[:, :, None] - phi_k[:, None]                            # AS_mn: [B, T, S, Hq, R]
    adapted = delta_q * semantic + bias.astype(jnp.float32)                  # Adapt(AS_mn)
    offset = (q_positions.astype(jnp.float32)[:, :, None] - kv_positions.astype(jnp.float32)[:, None, :])
    relative = offset[..., None, None] * omega                               # Δ(P_mn): [B, T, S, 1, R]
    magnitude = rho_q[:, :, None] * rho_k[:, None]
    s = scale * jnp.sum(magnitude * jnp.cos(adapted + relative), axis=-1)    # [B, T, S, Hq]
    s = jnp.moveaxis(s, 3, 1)                                                # [B, Hq, T, S]
    if mask is not None:
        s = jnp.where(mask.dense(T, S), s, -jnp.inf)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    e = jnp.exp(s - row_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhts,bshd->bthd", p, jnp.repeat(v.astype(jnp.float32), group, axis=2))
    return out.astype(q.dtype)


def cmha_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, delta: jax.Array, bias: jax.Array, *,
    q_positions: Optional[jax.Array] = None, kv_positions: Optional[jax.Array] = None, mask: Optional[Mask] = None,
    scale: float = DEFAULT_SCALE, base: float = DEFAULT_BASE, eps: float = DEFAULT_EPS, implementation: str = "auto",
) -> jax.Array:
    """CMHA as per-token transforms plus softmax attention: ``attention(q̃, k̃, v, scale=scale)``.

    Equal to ``cmha_attention_reference`` (same arguments and shapes) because the rotation
    ``δ(φ^q_m − φ^k_n) + β + (m − n)ω`` splits into a query angle and a key angle (module docstring),
    so ``q̃_m · k̃_n`` is the CMHA score. Cost: O((T + S)·H·D) for ``cmha_transform`` plus the softmax
    path's (``implementation`` of ``attnjax.attention``: "xla" is blocked, O(T·tile) memory, "pallas"
    the flash kernels); no ``[T, S]`` array. Gradients reach q, k, v, ``delta`` and ``bias`` by autodiff
    through the transforms and the path's own backward.
    """
    q_positions, kv_positions = check_cmha(q, k, v, delta, bias, q_positions, kv_positions, mask, scale=scale,
                                           base=base, eps=eps)
    q_rot = cmha_transform(q, q_positions, jnp.repeat(delta, q.shape[2] // k.shape[2], axis=0), bias,
                           base=base, eps=eps)
    k_rot = cmha_transform(k, kv_positions, delta, base=base, eps=eps)
    return attention(q_rot, k_rot, v, mask=mask, scale=scale, implementation=implementation)


def check_cmha_options(*, scale: float, base: float, eps: float) -> None:
    """``ValueError``/``TypeError`` naming the option unless ``scale`` and ``base`` are positive numbers
    and ``eps`` a non-negative one."""
    for name, value in (("scale", scale), ("base", base), ("eps", eps)):
        check_scalar(name, value)
        if not (value >= 0 if name == "eps" else value > 0):
            raise ValueError(f"{name} must be {'non-negative' if name == 'eps' else 'positive'}, got {value!r}")


def check_cmha(q: jax.Array, k: jax.Array, v: jax.Array, delta: jax.Array, bias: jax.Array,
               q_positions: Optional[jax.Array], kv_positions: Optional[jax.Array], mask: Optional[Mask], *,
               scale: float, base: float, eps: float) -> tuple[jax.Array, jax.Array]:
    """Check CMHA's arguments (shapes as in ``cmha_attention_reference``, options as in
    ``check_cmha_options``); return the positions as ``[B, T]`` and ``[B, S]`` arrays, defaults filled in."""
    check_qkv(q, k, v)
    check_cmha_options(scale=scale, base=base, eps=eps)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if D % 2:
        raise ValueError(f"CMHA needs an even head_dim (D/2 complex components per head), got q {q.shape}")
    for name, x, heads in (("delta", delta, Hkv), ("bias", bias, Hq)):
        shape = getattr(x, "shape", None)
        if shape != (heads, D // 2):
            raise ValueError(f"{name} must have shape [{'Hkv' if name == 'delta' else 'Hq'}, D/2] = "
                             f"{[heads, D // 2]} for q {q.shape}, k {k.shape}, got {describe(x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if q_positions is None:
        q_positions = query_positions(jnp.arange(T), T, S)
    if kv_positions is None:
        kv_positions = jnp.arange(S)
    out = []
    for name, p, length in (("q_positions", q_positions, T), ("kv_positions", kv_positions, S)):
        p = jnp.asarray(p)
        if p.ndim not in (1, 2) or p.shape[-1] != length or (p.ndim == 2 and p.shape[0] not in (1, B)):
            raise ValueError(f"{name} must have shape [{length}] or [{B}, {length}], got {tuple(p.shape)}")
        out.append(jnp.broadcast_to(p.reshape((-1, length)), (B, length)))
    if mask is not None:
        if not isinstance(mask, Mask):
            raise TypeError(f"mask must be an attnjax.masks value, got {type(mask).__name__}")
        mask.check(B, Hq, T, S)
    return out[0], out[1]


__all__ = ["DEFAULT_BASE", "DEFAULT_EPS", "DEFAULT_SCALE", "cmha_frequencies", "euler_transform", "cmha_transform",
           "cmha_attention_reference", "cmha_attention", "check_cmha_options", "check_cmha"]
