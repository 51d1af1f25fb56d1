"""HyperAttention: sortLSH for the large entries plus uniform key sampling for the rest.

Han, Jayaram, Karbasi, Mirrokni, Woodruff, Zandieh 2024, "HyperAttention: Long-context Attention in Near-Linear
Time", ICLR 2024; official code ``insuhan/hyper-attn`` (``models/attention/hyper_attn.py``, ``angular_lsh.py``,
``utils.py``).

The target is exact attention ``Att = D⁻¹AV``, ``A = exp(s·QKᵀ)``, ``D = diag(A1)`` (Eq. 1), approximated in the
spectral sense ``‖Att − D̃⁻¹ÃV‖_op ≤ ε‖D⁻¹A‖_op‖V‖_op`` (Eq. 2). Two parts:

1. **sortLSH** (Algorithm 1). Each query and key is hashed by ``r = num_projs`` random hyperplanes shared by
   every head (official ``AngularLSH``, ``proj_dir [D, r]``): the sign bits ``b`` make an ``r``-bit code, and
   its bucket is the code's rank in the Gray-code order, so that adjacent buckets differ in one bit (the
   paper's Hamming-sorted LSH, Definition 1). Queries and keys are sorted by bucket (stable: ties by position)
   and the sorted orders are cut into blocks of ``b = block_size`` (queries of ``⌈T·b/S⌉`` for ``T ≠ S``, the
   last block taking the rest); query block ``i`` attends exactly to key block ``i``:
   ``M^H_ij = 1{⌊P_Q(i)/b⌋ = ⌊P_K(j)/b⌋}``. In the token engine these sorted-order blocks are ``Buckets``.
2. **Uniform sampling** (Algorithms 2-3 as the official code runs them). ``m = sample_size`` keys are drawn
   uniformly with replacement per (batch, head); the pairs already in ``M^H`` are excluded, and the rest
   stands in for all light entries with weight ``S/m``: its log-sum-exp gets ``+ log(S/m)``.

The two are merged through their log-sum-exps (official ``add_self_attentions``)::

    out_i = (e^{lse_i^H} out_i^H + e^{lse_i^R} out_i^R) / (e^{lse_i^H} + e^{lse_i^R}),   lse_i^R += log(S/m)

**Causal** (Algorithm 4, Sec. 4): with ``T ≤ min_seq_len`` exact causal attention; otherwise the halves'
diagonal blocks recurse (causal), and the lower-left block (second-half queries, first-half keys) is the
non-causal approximation, merged by log-sum-exps; an odd length gets one zero row (removed after). The
non-causal approximation is exact for ``T < min_seq_len`` (official ``forward_no_causal_mask``).

Paths: ``reference`` is the estimator written naively, each non-causal part one dense softmax with the pair
weights ``W = M^H + (S/m)·N∘(1 − M^H)`` (``N``: draws per key; ``estimator_weights``), the same recursion and
the same random draws; ``xla`` runs the sortLSH blocks on the token engine (``attnjax.sparse.tokens``, sorted
buckets, custom VJP) and the samples as a gather. The exact attention that both approximate is
``attnjax.attention(q, k, v)`` (the default ``min_seq_len`` makes every length below 4096 exact).

Differences from the official code (each deliberate): the bucket is the Gray *rank* of the sign code (the
paper's definition; the official ``perm[bin_ids]`` maps a code to its Gray *code*, so for ``r ≥ 3`` some
adjacent buckets differ in two bits); a length that is not a multiple of ``b`` leaves the last block short
(the official code pads the sorted keys with zero vectors that then take part in the softmax); causal
attention with ``T < S`` (bottom-right aligned) adds the keys every query sees, ``[0, S − T)``, as one more
non-causal part. Randomness comes from the config's ``seed``, so a call is deterministic.

The hardness parameters of Theorem 1, ``α = n·max_j ‖D⁻¹Ae_j‖²`` and ``κ`` (the ratio of the largest to the
smallest light row sum once ``M^H`` is removed), are measured by ``attnjax.analysis.hyperattention_alpha`` and
``attnjax.analysis.hyperattention_kappa(q, k, heavy=Hyper(...).heavy_mask(q, k))`` (the analysis floor).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from attnjax import masks, registry
from attnjax.checks import check_positive, check_qk, check_qkv
from attnjax.masks import Mask
from attnjax.softmax import flash_attention_xla, softmax_attention_reference
from attnjax.sparse.tokens import Buckets, token_sparse_attention

PAPER = ("Han et al. 2024, HyperAttention: Long-context Attention in Near-Linear Time (ICLR); "
         "official insuhan/hyper-attn")


def lsh_projections(seed: int, head_dim: int, num_projs: int) -> jax.Array:
    """The ``r`` random hyperplanes ``[D, r]`` float32 (standard normal, from ``seed``; shared by all heads)."""
    return jax.random.normal(jax.random.PRNGKey(seed), (head_dim, num_projs), jnp.float32)


def gray_rank(code: jax.Array, num_bits: int) -> jax.Array:
    """The position of ``code`` in the ``num_bits``-bit Gray sequence: the inverse Gray code ``⊕_i code >> i``."""
    rank = code
    for i in range(1, num_bits):
        rank = rank ^ (code >> i)
    return rank


def sortlsh_hash(x: jax.Array, projections: jax.Array) -> jax.Array:
    """Hamming-sorted LSH buckets ``[B, H, L]`` int32 of ``x [B, L, H, D]`` (Definition 1): the Gray rank of the
    sign bits ``1{x·p_r > 0}`` (bit ``r`` has weight ``2^r``)."""
    r = projections.shape[-1]
    bits = jnp.einsum("blhd,dr->bhlr", x.astype(jnp.float32), projections) > 0
    code = jnp.sum(bits.astype(jnp.int32) << jnp.arange(r, dtype=jnp.int32), axis=-1)
    return gray_rank(code, r).astype(jnp.int32)


def _ranks(hashes: jax.Array) -> jax.Array:
    return jnp.argsort(jnp.argsort(hashes, axis=-1, stable=True), axis=-1, stable=True).astype(jnp.int32)


def sortlsh_buckets(q: jax.Array, k: jax.Array, *, num_projs: int, block_size: int, seed: int) -> Buckets:
    """Algorithm 1's mask ``M^H`` as ``Buckets``: each query and key's block in the LSH-sorted order.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``.
      num_projs: hyperplanes ``r``; block_size: key block ``b`` (queries ``⌈T·b/S⌉``); seed: the hyperplanes' seed.
    Returns:
      ``Buckets`` with ``⌈S/b⌉`` buckets: key ``j`` is in ``rank_K(j) // b``, query ``i`` in
      ``min(rank_Q(i) // ⌈T·b/S⌉, ⌈S/b⌉ − 1)``.
    """
    check_qk(q, k)
    T, S = q.shape[1], k.shape[1]
    proj = lsh_projections(seed, q.shape[-1], num_projs)
    num_blocks = -(-S // block_size)
    block_q = -(-T * block_size // S)
    q_ids = jnp.minimum(_ranks(sortlsh_hash(q, proj)) // block_q, num_blocks - 1)
    k_ids = _ranks(sortlsh_hash(k, proj)) // block_size
    return Buckets(q_ids, k_ids, num_blocks)


def sample_keys(key: jax.Array, batch: int, heads: int, num_keys: int, sample_size: int) -> jax.Array:
    """``sample_size`` key positions per (batch, head), uniform with replacement: ``[B, Hq, m]`` int32
    (official ``torch.randint(n_key, (b, h, m))``)."""
    return jax.random.randint(key, (batch, heads, sample_size), 0, num_keys, jnp.int32)


def merge_lse(out1: jax.Array, lse1: jax.Array, out2: jax.Array, lse2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax over the union of two disjoint key sets from each one's ``(out [B, T, H, Dv], lse [B, T, H])``
    (official ``add_self_attentions``); rows empty in both stay 0 with lse ``−inf``."""
    top = jnp.maximum(lse1, lse2)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w1, w2 = jnp.exp(lse1 - top), jnp.exp(lse2 - top)
    total = w1 + w2
    safe = jnp.where(total > 0, total, 1.0)
    out = (w1[..., None] * out1.astype(jnp.float32) + w2[..., None] * out2.astype(jnp.float32)) / safe[..., None]
    return out, jnp.where(total > 0, top + jnp.log(safe), -jnp.inf)


def _sampled_part(q, k, v, buckets: Buckets, idx, scale):
    """Attention to the sampled keys outside each query's LSH block, lse shifted by ``log(S/m)`` (float32)."""
    B, T, Hq, _ = q.shape
    S, G = k.shape[1], Hq // k.shape[2]
    kv_head = jnp.arange(Hq) // G
    bi, hi = jnp.arange(B)[:, None, None], kv_head[None, :, None]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    ks, vs = kh[bi, hi, idx].astype(jnp.float32), vh[bi, hi, idx].astype(jnp.float32)   # [B, Hq, m, ·]
    in_block = buckets.q_ids[..., :, None] == buckets.kv_ids[bi, hi, idx][..., None, :]  # [B, Hq, T, m]
    s = jnp.einsum("bthd,bhmd->bhtm", q.astype(jnp.float32), ks) * scale
    s = jnp.where(in_block, -jnp.inf, s)
    m = s.max(-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = p.sum(-1)
    out = jnp.einsum("bhtm,bhme->bthe", p / jnp.where(l > 0, l, 1.0)[..., None], vs)
    lse = jnp.where(l > 0, m[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf) + math.log(S / idx.shape[-1])
    return out, lse.transpose(0, 2, 1)


def _exact(q, k, v, causal, scale, dense):
    mask = masks.Causal() if causal else None
    if dense:
        out, lse = softmax_attention_reference(q, k, v, mask=mask, scale=scale, return_lse=True)
    else:
        out, lse = flash_attention_xla(q, k, v, mask=mask, scale=scale, return_lse=True,
                                       block_q=min(512, q.shape[1]), block_kv=min(512, k.shape[1]))
    return out.astype(jnp.float32), lse


def estimator_weights(q: jax.Array, k: jax.Array, config: "Hyper", key: jax.Array) -> jax.Array:
    """The non-causal estimate's weight on every pair, ``[B, Hq, T, S]`` float32: ``W = M^H + (S/m)·N∘(1 − M^H)``
    with ``N_ij`` the number of draws of key ``j`` (``sample_keys(key, ...)``); the estimate is the softmax with
    weights, ``(W∘A)V / (W∘A)1`` (dense: small sizes, the reference)."""
    B, T, Hq, _ = q.shape
    S = k.shape[1]
    heavy = config.buckets(q, k).dense(T, S)
    weights = heavy.astype(jnp.float32)
    if config.sample_size and S > config.block_size:
        draws = jax.nn.one_hot(sample_keys(key, B, Hq, S, config.sample_size), S, dtype=jnp.float32).sum(-2)
        weights = weights + (S / config.sample_size) * draws[:, :, None, :] * ~heavy
    return weights


def _non_causal(q, k, v, cfg: "Hyper", key, scale, dense):
    """Official ``forward_no_causal_mask``: exact below ``min_seq_len`` queries, else sortLSH + sampling (``dense``:
    one weighted softmax over all pairs; else the token engine plus the gathered samples)."""
    B, T, Hq, _ = q.shape
    S = k.shape[1]
    if T < cfg.min_seq_len:
        return _exact(q, k, v, False, scale, dense)
    if dense:
        w = estimator_weights(q, k, cfg, key)
        out, lse = softmax_attention_reference(q, k, v, mask=masks.Explicit(w > 0), bias=jnp.log(jnp.maximum(w, 1e-30)),
                                               scale=scale, return_lse=True)
        return out.astype(jnp.float32), lse
    buckets = cfg.buckets(q, k)
    out, lse = token_sparse_attention(q, k, v, buckets, scale=scale, return_lse=True, block_q=cfg.block_q,
                                      block_kv=cfg.block_kv, implementation="xla")
    if cfg.sample_size == 0 or S <= cfg.block_size:
        return out.astype(jnp.float32), lse
    idx = sample_keys(key, B, Hq, S, cfg.sample_size)
    return merge_lse(out, lse, *_sampled_part(q, k, v, buckets, idx, scale))


def _causal(q, k, v, cfg: "Hyper", key, scale, dense):
    """Algorithm 4: exact up to ``min_seq_len``; else recurse on the diagonal halves, lower-left non-causal."""
    B, T = q.shape[:2]
    if T <= cfg.min_seq_len:
        return _exact(q, k, v, True, scale, dense)
    if T % 2:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
    half = q.shape[1] // 2

    def stack(x):
        return jnp.concatenate([x[:, :half], x[:, half:]], axis=0)

    diag_key, off_key = jax.random.split(key)
    out_d, lse_d = _causal(stack(q), stack(k), stack(v), cfg, diag_key, scale, dense)
    out_o, lse_o = _non_causal(q[:, half:], k[:, :half], v[:, :half], cfg, off_key, scale, dense)
    out_lo, lse_lo = merge_lse(out_d[B:], lse_d[B:], out_o, lse_o)
    out = jnp.concatenate([out_d[:B], out_lo], axis=1)
    lse = jnp.concatenate([lse_d[:B], lse_lo], axis=1)
    return out[:, :T], lse[:, :T]


def _hyper(q, k, v, config: "Hyper", mask, scale, return_lse, dense):
    check_qkv(q, k, v)
    T, S = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mask is not None and not isinstance(mask, masks.Causal):
        raise NotImplementedError(f"HyperAttention supports mask=None or masks.Causal(), got {mask!r}")
    key = jax.random.PRNGKey(config.seed)
    if mask is None:
        out, lse = _non_causal(q, k, v, config, key, scale, dense)
    elif T > S:
        raise NotImplementedError(f"causal HyperAttention needs T <= S (bottom-right aligned), got T={T}, S={S}")
    else:
        prefix_key, key = jax.random.split(key)
        out, lse = _causal(q, k[:, S - T:], v[:, S - T:], config, key, scale, dense)
        if S > T:
            prefix = _non_causal(q, k[:, :S - T], v[:, :S - T], config, prefix_key, scale, dense)
            out, lse = merge_lse(out, lse, *prefix)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def hyper_attention_reference(q, k, v, *, config: "Hyper", mask: Optional[Mask] = None, scale=None,
                              return_lse: bool = False, **_):
    """HyperAttention naively: every non-causal part is one dense softmax with the estimator's pair weights
    ``W = M^H + (S/m)·N∘(1 − M^H)`` (``estimator_weights``: Algorithms 1-3), the causal recursion (Algorithm 4)
    over dense exact diagonal blocks; O(T·S) memory. Exact attention (Eq. 1) is ``attnjax.attention(q, k, v)``."""
    return _hyper(q, k, v, config, mask, scale, return_lse, dense=True)


def hyper_attention_xla(q, k, v, *, config: "Hyper", mask: Optional[Mask] = None, scale=None,
                        return_lse: bool = False, **_):
    """HyperAttention (Algorithms 1-4): sortLSH blocks on the token engine plus ``m`` gathered sampled keys.

    Cost, non-causal: two sorts, ``O(T·b·D)`` for the blocks and ``O(T·m·D)`` for the samples; causal:
    ``O(T·(b + m)·D·log(T/min_seq_len) + T·min_seq_len·D)``. ``NotImplementedError`` for masks other than
    ``None``/``Causal()`` and for causal attention with ``T > S`` (the reference raises the same).
    """
    return _hyper(q, k, v, config, mask, scale, return_lse, dense=False)


@registry.register
@dataclasses.dataclass(frozen=True)
class Hyper:
    """HyperAttention (Han et al. 2024) as a registered mechanism (``reference``: the dense estimator; the exact
    attention it approximates is ``softmax``).

    Attributes (official defaults):
      num_projs: LSH hyperplanes ``r`` (``2^r`` buckets before sorting), 7.
      block_size: sortLSH block ``b``, 256.
      sample_size: uniformly sampled keys ``m`` per (batch, head), 256; 0 keeps the sortLSH part only.
      min_seq_len: exact attention below it (non-causal: ``T < min_seq_len``; causal recursion: ``T ≤``), 4096.
      seed: seed of the hyperplanes and of the samples (a call is deterministic).
      block_q, block_kv: the token engine's tiles for the sortLSH blocks.
    """

    num_projs: int = 7
    block_size: int = 256
    sample_size: int = 256
    min_seq_len: int = 4096
    seed: int = 0
    block_q: int = 64
    block_kv: int = 64
    name: ClassVar[str] = "hyper"
    family: ClassVar[str] = "sparse"
    paper: ClassVar[str] = PAPER
    supports: ClassVar[frozenset] = frozenset({"mask", "return_lse", "gqa", "cross"})
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ()

    def __post_init__(self):
        check_positive(num_projs=self.num_projs, block_size=self.block_size, block_q=self.block_q,
                       block_kv=self.block_kv)
        for name in ("sample_size", "min_seq_len", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.num_projs > 30:
            raise ValueError(f"num_projs must be at most 30 (int32 codes), got {self.num_projs}")

    def buckets(self, q: jax.Array, k: jax.Array) -> Buckets:
        """This config's sortLSH blocks ``M^H`` for ``q``, ``k`` (``sortlsh_buckets``)."""
        return sortlsh_buckets(q, k, num_projs=self.num_projs, block_size=self.block_size, seed=self.seed)

    def heavy_mask(self, q: jax.Array, k: jax.Array) -> masks.Explicit:
        """``M^H`` of the non-causal approximation as a dense ``masks.Explicit`` ``[B, Hq, T, S]`` (small sizes:
        for ``attnjax.analysis.hyperattention_kappa(q, k, heavy=...)``)."""
        return masks.Explicit(self.buckets(q, k).dense(q.shape[1], k.shape[1]))

    def implementations(self):
        return {"reference": functools.partial(hyper_attention_reference, config=self),
                "xla": functools.partial(hyper_attention_xla, config=self)}


__all__ = ["PAPER", "Hyper", "estimator_weights", "gray_rank", "hyper_attention_reference", "hyper_attention_xla",
           "lsh_projections", "merge_lse", "sample_keys", "sortlsh_buckets", "sortlsh_hash"]
