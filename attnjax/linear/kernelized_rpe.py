"""Kernelized attention with relative positional encoding, computed with the FFT.

Luo et al., "Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding"
(NeurIPS 2021). Softmax attention with a relative bias ``b_(j−i)`` (eq. 6, the T5-style scalar per
offset) is ``exp(q_i·k_j/√d + b_(j−i))``; with a feature map ``φ(q)·φ(k) ≈ exp(q·k)`` it becomes
(§3.2, eq. 10)::

    z_i = φ(q_i) Σ_j e^(b_(j−i)) φ(k_j)ᵀ v_j  /  φ(q_i) Σ_j e^(b_(j−i)) φ(k_j)ᵀ

``D1_i = Σ_j c_(j−i) φ(k_j)ᵀ v_j`` and ``D2_i = Σ_j c_(j−i) φ(k_j)ᵀ`` (``c = e^b``) are the products of the
Toeplitz matrix ``C = {c_(j−i)}`` with the stacked ``vec(φ(k_j)ᵀ v_j)`` and ``vec(φ(k_j))`` (eqs. 11–13),
which the FFT computes in O(n log n) (Algorithm 1, ``FFTMatrixMul``). Causal attention (the paper's
footnote 3, for teacher forcing) sets ``b_(j−i) = −∞`` (``c = 0``) for ``j > i``: the same product with a
one-sided Toeplitz matrix.

§3.3 (Algorithm 1, "NPRF-Transformer with RPE") feeds ℓ2-normalized queries and keys to the PRF map
(eq. 5): bounded norms keep the random-feature variance small (Lemma 2, Theorem 3), and the unbounded
``b`` restores sharp attention. That is the default here (``qk_norm=True``, scale 1, ``φ`` =
FAVOR+ positive random features; the library's ``Performer`` draws orthogonal rows, one of the
feature types of the paper's ablation, Fig. 3b, with ``m = 64`` features, the paper's
WikiText-103 setting).

Conventions:

- ``rpe_bias [H, T + S − 1]`` (``H`` = 1 or the query heads) is the Toeplitz generator: entry ``r`` holds
  ``b_δ`` for the offset ``δ = r − (S − 1)`` = key position − query position (the paper's ``j − i``;
  query ``i`` sits at position ``i + S − T``, the library's bottom-right alignment, ``attnjax.masks``).
  For ``T = S = n`` this is the paper's ``b = (b_−(n−1), …, b_(n−1))``. ``rpe_bias_from_table`` reads it off a
  length-independent clipped table ``[H, 2k + 1]`` (Shaw et al. 2018's clipping).
- Stability: ``e^b`` may overflow, so both paths use ``c = e^(b − max b)`` per head (the max over the
  offsets the call can use; causal: ``δ <= 0``). The factor ``e^(max b)`` cancels exactly between
  numerator and denominator (eq. 10 has no ε, and none is added). A row whose normalizer is not
  positive (no key: causal with ``T > S``; or every visible ``c`` underflowed) gives 0. The
  normalizer is positive for positive maps (PRF, elu+1); with relu it can be 0, and the FFT path
  then returns rounding noise for that row instead of the reference's 0.
- Scale: with ``qk_norm`` the default scale is 1 (Algorithm 1 has none); without it ``1/√D`` (eq. 6).
  Softmax-kernel maps (``Performer``) see ``√scale·x``, plain maps (elu+1, relu) multiply the scores.
- GQA: query head ``h`` reads K/V head ``h // (Hq // Hkv)``; the FFT of ``φ(k_j)ᵀ v_j`` is taken once per
  K/V head and multiplied by each query head's ``FFT(c)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks, registry
from attnjax.bias import Bias
from attnjax.checks import check_qkv, check_scalar
from attnjax.linear.feature_maps import FeatureMap, Performer, get_feature_map, is_softmax_kernel
from attnjax.meshes import vary_like
from attnjax.positional.alibi import ALiBi
from attnjax.positional.relative import relative_embedding_index
from attnjax.positional.t5 import T5Bias

DEFAULT_FEATURE_MAP = Performer(num_features=64)
"""PRF (FAVOR+) with ``m = 64`` features: the paper's language-model setting (Luo et al. 2021, §4.2)."""

QK_NORM_EPS = 1e-12
"""Added to ``|x|²`` before the ℓ2 normalization of queries and keys (a zero vector stays zero)."""


class Prepared(NamedTuple):
    """Float32 operands grouped by K/V head (``G = Hq // Hkv``), shared by both paths."""

    fq: jax.Array      # [B, T, Hkv, G, F]: φ of the (normalized, scaled) queries
    fk: jax.Array      # [B, S, Hkv, F]
    v: jax.Array       # [B, S, Hkv, Dv + 1]: values and a ones column (the normalizer)
    log_c: jax.Array   # [Hkv, G, T + S − 1]: b − max b per head, −inf where causal forbids


def fast_fft_length(n: int) -> int:
    """The smallest ``2^a·3^b·5^c >= n``: an FFT length every backend transforms fast, at most 15.4%
    above ``n`` (checked for ``n < 200000``; the worst is 15 for 13) where the next power of two can be 2×."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    best = 1 << (n - 1).bit_length()
    five = 1
    while five < best:
        three = five
        while three < best:
            p = three
            while p < n:
                p *= 2
            best = min(best, p)
            three *= 3
        five *= 5
    return best


def toeplitz_offsets(T: int, S: int) -> np.ndarray:
    """The offset ``δ = key position − query position`` of each entry of an ``rpe_bias`` generator:
    ``arange(T + S − 1) − (S − 1)``, from ``−(S − 1)`` to ``T − 1`` (bottom-right alignment)."""
    return np.arange(T + S - 1) - (S - 1)


def rpe_bias_from_table(table: jax.Array, offsets: jax.Array, *, causal: bool = False) -> jax.Array:
    """The biases ``[H, len(offsets)]`` of a clipped table at ``offsets`` (key position − query position).

    Shaw et al. 2018, §3.2's clipping (``positional.relative_embedding_index``): a table ``[H, 2k + 1]``
    holds offsets ``−k … k`` (``[H, k + 1]``, offsets ``−k … 0``, when ``causal``; later keys read offset
    0, which the causal mask removes anyway), and farther offsets share the edge column, so ``2k + 1``
    learned scalars per head serve every length. ``offsets = toeplitz_offsets(T, S)`` gives the
    ``rpe_bias`` generator of a call. Differentiable in ``table``.
    """
    width = jnp.shape(table)[1] if jnp.ndim(table) == 2 else 0
    if width < 1 or (not causal and width % 2 == 0):
        raise ValueError(f"table must have shape [H, {'k + 1' if causal else '2k + 1 (odd)'}], got {jnp.shape(table)}")
    k = width - 1 if causal else (width - 1) // 2
    return jnp.take(table, relative_embedding_index(offsets, causal=causal, max_distance=k), axis=1)


def check_rpe_bias(rpe_bias: jax.Array, num_heads: int, T: int, S: int) -> None:
    """``ValueError``/``TypeError`` naming ``rpe_bias`` unless it is a float ``[H, T + S − 1]`` with
    ``H`` 1 or ``num_heads``."""
    shape = tuple(jnp.shape(rpe_bias))
    if len(shape) != 2 or shape[0] not in (1, num_heads) or shape[1] != T + S - 1:
        raise ValueError(f"rpe_bias has shape {shape}, expected [H, T + S - 1] = [{num_heads} or 1, {T + S - 1}] "
                         f"(one scalar per offset key - query, T={T}, S={S})")
    if not jnp.issubdtype(jnp.asarray(rpe_bias).dtype, jnp.floating):
        raise TypeError(f"rpe_bias must be a float array, got {jnp.asarray(rpe_bias).dtype}")


def prepare(q: jax.Array, k: jax.Array, v: jax.Array, rpe_bias: jax.Array, *,
            feature_map: Union[str, FeatureMap], qk_norm: bool, scale: Optional[float], causal: bool) -> Prepared:
    """Check the inputs; apply the normalization, the scale and ``φ``; shift and mask the bias."""
    check_qkv(q, k, v)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    check_rpe_bias(rpe_bias, Hq, T, S)
    phi = get_feature_map(feature_map)
    scale = (1.0 if qk_norm else D ** -0.5) if scale is None else scale
    check_scalar("scale", scale)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
    if qk_norm:
        qf = qf * jax.lax.rsqrt(jnp.sum(qf * qf, -1, keepdims=True) + QK_NORM_EPS)
        kf = kf * jax.lax.rsqrt(jnp.sum(kf * kf, -1, keepdims=True) + QK_NORM_EPS)
    if is_softmax_kernel(phi):
        fq, fk = phi(qf * math.sqrt(scale)), phi(kf * math.sqrt(scale))
    else:
        fq, fk = phi(qf) * scale, phi(kf)
    fq, fk = fq.astype(jnp.float32), fk.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    vf = jnp.concatenate([vf, jnp.ones_like(vf[..., :1])], axis=-1)
    b = jnp.broadcast_to(jnp.asarray(rpe_bias, jnp.float32), (Hq, T + S - 1))
    if causal:
        b = jnp.where(jnp.asarray(toeplitz_offsets(T, S)) <= 0, b, -jnp.inf)
    top = jnp.max(b, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return Prepared(fq.reshape(B, T, Hkv, G, -1), fk, vf, (b - top).reshape(Hkv, G, T + S - 1))


def normalized(acc: jax.Array) -> jax.Array:
    """``acc[..., :-1] / acc[..., -1]`` (numerator columns over the normalizer column), 0 where the
    normalizer is not positive; gradients stay finite there."""
    den = acc[..., -1:]
    positive = den > 0
    return jnp.where(positive, acc[..., :-1] / jnp.where(positive, den, 1.0), 0.0)


def kernelized_rpe_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, rpe_bias: jax.Array, *,
    feature_map: Union[str, FeatureMap] = DEFAULT_FEATURE_MAP, qk_norm: bool = True, scale: Optional[float] = None,
    causal: bool = False,
) -> jax.Array:
    """Quadratic kernelized attention with RPE (Luo et al. 2021, eq. 10), forming ``[T, S]``.

    ``A = (φ(Q) φ(K)ᵀ) ⊙ exp(B − max b)`` with ``B_ij = b_(j − p_i)`` gathered from ``rpe_bias``
    (``p_i = i + S − T``), ``A_ij = 0`` for ``j > p_i`` when causal; ``z = A V / A 1`` (0 where ``A 1 = 0``).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``.
      rpe_bias: ``[Hq or 1, T + S − 1]``, entry ``r`` the bias of offset ``r − (S − 1)`` (module docstring).
      feature_map: a name in ``feature_maps.FEATURE_MAPS`` or a callable ``[..., D] -> [..., F]``; default
        PRF with 64 features (the paper's).
      qk_norm: ℓ2-normalize queries and keys before ``φ`` (the paper's NPRF, Algorithm 1).
      scale: default 1 with ``qk_norm``, else ``1/√D``.
      causal: keys after the query (bottom-right aligned) get ``c = 0``.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    fq, fk, vf, log_c = prepare(q, k, v, rpe_bias, feature_map=feature_map, qk_norm=qk_norm, scale=scale,
                                causal=causal)
    B, T, Hkv, G, _ = fq.shape
    S = fk.shape[1]
    r = jnp.arange(S)[None, :] - jnp.arange(T)[:, None] + T - 1          # [T, S]: offset + (S − 1)
    weights = jnp.exp(log_c[:, :, r])                                      # [Hkv, G, T, S]
    scores = jnp.einsum("bthgf,bshf->bhgts", fq, fk, precision="highest") * weights
    out = jnp.einsum("bhgts,bshe->bthge", scores, vf, precision="highest")
    out = normalized(out)
    return out.reshape(B, T, Hkv * G, -1).astype(q.dtype)


def kernelized_rpe_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, rpe_bias: jax.Array, *,
    feature_map: Union[str, FeatureMap] = DEFAULT_FEATURE_MAP, qk_norm: bool = True, scale: Optional[float] = None,
    causal: bool = False, feature_chunk: int = 8,
) -> jax.Array:
    """Kernelized attention with RPE through the FFT (Luo et al. 2021, §3.2, eqs. 10–13, Algorithm 1).

    ``D_i = Σ_j c_(j − p_i) φ(k_j)ᵀ [v_j, 1]`` for all ``i`` at once: the Toeplitz product is a linear
    convolution of the reversed generator with ``φ(k_j)ᵀ[v_j, 1]`` along the sequence, done as a circular
    one of length ``L = fast_fft_length(T + S − 1)`` (no wrap-around reaches the ``T`` rows kept), then
    ``z_i = φ(q_i) D_i[:, :Dv] / φ(q_i) D_i[:, Dv]``. The features go through in blocks of
    ``feature_chunk`` (a ``lax.scan`` whose body is rematerialized in the backward pass), accumulating
    ``φ(q_i)·D_i`` per block.

    Cost: time O(L log L · F · (Dv + 1) · (Hkv + Hq)) per batch row, memory O(L · Hq · feature_chunk · (Dv + 1))
    plus the ``[T, Hq, F]`` features; nothing of size ``T × S``. Gradients (autodiff through
    ``rfft``/``irfft``) to q, k, v and ``rpe_bias``. Float32 FFT rounding is absolute, at the scale of the
    largest ``c`` (this is the paper's method, not a choice here): a row whose visible ``e^(b − max b)`` are
    all ``g`` nats below 1 has relative error ≈ ``1e-7·e^g``. Measured (T = 64, causal, 64 PRF features,
    a bias rising with distance so that row 0 sees only a value ``g`` below the max): max error 1e-5 at
    ``g = 0``, 2.5e-4 at 5, 3e-2 at 10, useless from 15 on. Rows that see the largest bias (e.g. a
    recency bias peaking at offset 0) are unaffected.

    Args:
      q, k, v, rpe_bias, feature_map, qk_norm, scale, causal: as in ``kernelized_rpe_attention_reference``.
      feature_chunk: features per FFT block: memory grows with it; 8 was fastest on CPU (T = 4096, H = 4,
        D = 64, 64 features: 1.47 s at 4 and 8, 1.75 s at 16, 2.65 s at 64).
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    if not isinstance(feature_chunk, int) or feature_chunk <= 0:
        raise ValueError(f"feature_chunk must be a positive int, got {feature_chunk!r}")
    fq, fk, vf, log_c = prepare(q, k, v, rpe_bias, feature_map=feature_map, qk_norm=qk_norm, scale=scale,
                                causal=causal)
    B, T, Hkv, G, F = fq.shape
    S, E = fk.shape[1], vf.shape[-1]
    L = fast_fft_length(T + S - 1)
    c_hat = jnp.fft.rfft(jnp.exp(log_c)[..., ::-1], n=L, axis=-1)          # [Hkv, G, L//2 + 1]
    c_hat = jnp.moveaxis(c_hat, -1, 0)[None, :, :, :, None, None]           # [1, L', Hkv, G, 1, 1]
    chunk = min(feature_chunk, F)
    blocks = -(-F // chunk)
    pad = blocks * chunk - F
    fq_blocks = jnp.moveaxis(jnp.pad(fq, [(0, 0)] * 4 + [(0, pad)]).reshape(B, T, Hkv, G, blocks, chunk), 4, 0)
    fk_blocks = jnp.moveaxis(jnp.pad(fk, [(0, 0)] * 3 + [(0, pad)]).reshape(B, S, Hkv, blocks, chunk), 3, 0)

    def block(acc, features):
        fq_b, fk_b = features                                              # [B,T,Hkv,G,f], [B,S,Hkv,f]
        kv_hat = jnp.fft.rfft(fk_b[..., :, None] * vf[..., None, :], n=L, axis=1)   # [B, L', Hkv, f, E]
        d = jnp.fft.irfft(kv_hat[:, :, :, None] * c_hat, n=L, axis=1)[:, S - 1:S - 1 + T]   # [B,T,Hkv,G,f,E]
        return acc + jnp.einsum("bthgf,bthgfe->bthge", fq_b, d, precision="highest"), None

    acc0 = vary_like(jnp.zeros((B, T, Hkv, G, E), jnp.float32), fq, fk, vf, log_c)    # shard_map(check_vma)
    acc, _ = jax.lax.scan(jax.checkpoint(block), acc0, (fq_blocks, fk_blocks))
    out = normalized(acc)
    if causal and T > S:
        out = jnp.where((jnp.arange(T) >= T - S)[None, :, None, None, None], out, 0.0)
    return out.reshape(B, T, Hkv * G, -1).astype(q.dtype)


def rule_rpe_bias(bias: Bias, num_heads: int, T: int, S: int) -> jax.Array:
    """The ``[H, T + S − 1]`` generator of a shift-invariant bias rule (``positional.ALiBi``,
    ``positional.T5Bias``): its last query row gives the offsets ``−(S − 1) … 0``, its last key column
    ``0 … T − 1``. Other biases are not Toeplitz: ``NotImplementedError``."""
    if not isinstance(bias, (ALiBi, T5Bias)):
        got = type(bias).__name__ if isinstance(bias, Bias) else f"an array of shape {jnp.shape(bias)}"
        raise NotImplementedError(f"kernelized_rpe needs a bias that depends on key - query only (positional.ALiBi, "
                                  f"positional.T5Bias, or rpe_bias in kernelized_rpe_attention); got {got}")
    row = bias.tile(jnp.array([T - 1]), jnp.arange(S), T, S)[:, :, 0, :]            # offsets −(S−1) … 0
    column = bias.tile(jnp.arange(T), jnp.array([S - 1]), T, S)[:, :, ::-1, 0]     # offsets 0 … T − 1
    generator = jnp.concatenate([row, column[..., 1:]], axis=-1)
    if generator.shape[0] != 1:
        raise NotImplementedError(f"kernelized_rpe needs a bias shared by the batch, got {type(bias).__name__} "
                                  f"with batch dim {generator.shape[0]}")
    return jnp.broadcast_to(generator[0], (num_heads if generator.shape[1] == 1 else generator.shape[1],
                                           T + S - 1))


def parse_causal(mask: Optional[masks.Mask]) -> bool:
    """``None`` -> non-causal, ``masks.Causal()`` -> causal; any other mask: ``NotImplementedError``."""
    if mask is None or isinstance(mask, masks.Causal):
        return mask is not None
    raise NotImplementedError(f"kernelized_rpe serves no mask or masks.Causal(), got {mask!r}")


@registry.register
@dataclasses.dataclass(frozen=True)
class KernelizedRPE:
    """``kernelized_rpe``: normalized kernelized attention whose scores are multiplied by ``e^(b_(j−i))``.

    The bias comes through ``attnjax.attention(..., bias=)`` as a shift-invariant rule,
    ``positional.T5Bias`` (learned, gradients to its table) or ``positional.ALiBi``, turned into the
    generator ``rpe_bias`` (``rule_rpe_bias``); without a bias, ``b = 0``. An array bias
    ``[B, H, T, S]`` is not Toeplitz: both paths refuse it. Masks: none or ``masks.Causal()``
    (bottom-right aligned). Paths: "reference" (``kernelized_rpe_attention_reference``) and "xla"
    (the FFT, ``kernelized_rpe_attention``).

    Args:
      feature_map: ``φ`` (default PRF, 64 features); qk_norm: the paper's NPRF normalization.
      feature_chunk: features per FFT block of the "xla" path.
    """

    feature_map: Union[str, FeatureMap] = DEFAULT_FEATURE_MAP
    qk_norm: bool = True
    feature_chunk: int = 8

    name: ClassVar[str] = "kernelized_rpe"
    family: ClassVar[str] = "linear"
    paper: ClassVar[str] = "Luo et al. 2021, Stable, Fast and Accurate: Kernelized Attention with RPE"
    supports: ClassVar[frozenset] = frozenset({"mask", "bias", "gqa", "cross"})
    decodes: ClassVar[bool] = True
    sequence_parallel: ClassVar[tuple] = ()

    def implementations(self):
        def bind(fast: bool):
            def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask=None, bias=None, scale=None):
                causal = parse_causal(mask)
                T, Hq, S = q.shape[1], q.shape[2], k.shape[1]
                b = jnp.zeros((1, T + S - 1), jnp.float32) if bias is None else rule_rpe_bias(bias, Hq, T, S)
                common = dict(feature_map=self.feature_map, qk_norm=self.qk_norm, scale=scale, causal=causal)
                if fast:
                    return kernelized_rpe_attention(q, k, v, b, feature_chunk=self.feature_chunk, **common)
                return kernelized_rpe_attention_reference(q, k, v, b, **common)
            return attend
        return {"reference": bind(False), "xla": bind(True)}

    def chunk_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, *, exchange, causal: bool = False,
                        **inputs) -> jax.Array:
        """The linear-state interface (``attnjax.linear.sequence_state``) refused: no finite state crosses a split.

        Query ``i`` reads ``Σ_j c_(j−i) φ(k_j)ᵀ v_j`` with a free Toeplitz weight per offset (``T + S − 1`` of them).
        The part from another chunk ``r`` is the ``C × C`` Toeplitz block ``C[t, r]`` times chunk ``r``'s per-token
        ``φ(k_j)ᵀ v_j``; a generic block has rank up to ``C``, so nothing smaller than the chunk's own tokens
        summarizes it (the geometric weights ``c_δ = λ^|δ|`` of ALiBi are the exception: a decayed state, which
        ``attnjax.parallel.lasp2`` serves with ``decay``). Split it with a K/V-moving scheme instead.

        Raises:
          NotImplementedError: always.
        """
        raise NotImplementedError(
            "kernelized_rpe has no finite linear state across a sequence split: its relative-position weights "
            "c_(j-i) are a free Toeplitz matrix (one value per offset), so chunk r's part of chunk t's output is a "
            "rank-up-to-C Toeplitz block times chunk r's per-token phi(k)^T v, which no state smaller than the chunk "
            "summarizes; only geometric weights (ALiBi, c = lambda^|j-i|) reduce to a decayed state: use "
            "attnjax.parallel.lasp2 with decay")


__all__ = ["DEFAULT_FEATURE_MAP", "KernelizedRPE", "fast_fft_length", "kernelized_rpe_attention",
           "kernelized_rpe_attention_reference", "rpe_bias_from_table", "rule_rpe_bias", "toeplitz_offsets"]
