"""SeerAttention's AttnGate and its distillation: the learned part of the ``seer`` selector.

Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (2024); public code
microsoft/SeerAttention (``seer_attn/attn_gate.py``). Pooled queries (mean over the query block) and
pooled keys (max ‖ min ‖ mean over the key block), a linear projection per head, then
``softmax_j(q̃_i·k̃_j / √d_gate)`` over the key blocks that the block-level mask allows. The
distillation (``gate_loss``, ``distillation_step``) is KL(G ‖ gate) against the ground truth
``attnjax.sparse.block_max_attention``, with optax; only the gate is trained. Pass a trained gate to
``attnjax.sparse.Seer(gate=...)``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from attnjax.blocked.lists import allowed_blocks
from attnjax.checks import check_positive
from attnjax.masks import Causal, Mask
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional import RoPE
from attnjax.sparse.seer import block_max_attention
from attnjax.tiling import num_tiles, pad_axis

POOLINGS = ("avg", "max", "min")


def block_pool(x: jax.Array, block: int, kinds: Sequence[str]) -> jax.Array:
    """``[B, L, H, D]`` -> ``[B, ceil(L/block), H, len(kinds)·D]`` float32, each pooling over the
    valid (unpadded) tokens of a block, concatenated in the order of ``kinds``."""
    B, L, H, D = x.shape
    n = num_tiles(L, block)
    tiles = pad_axis(x.astype(jnp.float32), 1, block).reshape(B, n, block, H, D)
    valid = (jnp.arange(n * block) < L).reshape(1, n, block, 1, 1)
    pooled = {
        "avg": lambda: jnp.where(valid, tiles, 0.0).sum(2) / valid.sum(2),
        "max": lambda: jnp.where(valid, tiles, -jnp.inf).max(2),
        "min": lambda: jnp.where(valid, tiles, jnp.inf).min(2),
    }
    return jnp.concatenate([pooled[kind]() for kind in kinds], axis=-1)


class AttnGate(nnx.Module):
    """SeerAttention's AttnGate: block-level attention scores from pooled queries and keys.

    ``q̃_i = pool_q(Q_block i) W_q^h``, ``k̃_j = pool_k(K_block j) W_k^{h_kv}`` and
    ``gate[b, h, i, :] = softmax_j(q̃_i · k̃_j / √d_gate)`` over the key blocks that the mask allows
    at block level (``attnjax.sparse.allowed_blocks``); other blocks get exactly 0. Defaults follow
    the paper: queries average-pooled, keys max ‖ min ‖ average pooled (Gao et al. 2024).

    GQA as in the public code: ``W_q`` is per query head, ``W_k`` per KV head, and the pooled key
    of KV head ``h_kv`` serves the ``Hq / Hkv`` query heads of its group, so the gate scores each
    query head. Both projections are always present (the public code drops ``W_q`` in one special
    case; here the gate is uniform).

    RoPE: in the paper's model the gate reads q and k *before* RoPE and rotates the projected
    pooled features at each block's first position (query blocks bottom-right aligned). Pass
    ``rope`` to do the same; leave it ``None`` when the inputs already carry positions (the ``Seer``
    selector receives post-RoPE q and k from ``attnjax.attention``).

    Args:
      head_dim: ``D`` of q and k.
      num_heads: query heads ``Hq``; num_kv_heads: ``Hkv`` (default ``Hq``), dividing ``Hq``.
      block_q, block_kv: pooling blocks (the engine's block sizes).
      gate_dim: projected feature size ``d_gate`` (default ``head_dim``; even when ``rope`` is given).
      q_pooling, k_pooling: poolings from ("avg", "max", "min"), concatenated in this order.
      rope: optional ``attnjax.positional.RoPE`` for pre-RoPE inputs (see above).
      param_dtype: dtype of the projections.
      rngs: ``params`` initializes the projections (normal, std ``1/sqrt(fan_in)``).
    """

    def __init__(
        self, head_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None, block_q: int = 64,
        block_kv: int = 64, gate_dim: Optional[int] = None, q_pooling: Sequence[str] = ("avg",),
        k_pooling: Sequence[str] = ("max", "min", "avg"), rope: Optional[RoPE] = None,
        param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        gate_dim = head_dim if gate_dim is None else gate_dim
        check_positive(head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, block_q=block_q,
                       block_kv=block_kv, gate_dim=gate_dim)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        for name, kinds in (("q_pooling", q_pooling), ("k_pooling", k_pooling)):
            if not kinds or any(kind not in POOLINGS for kind in kinds):
                raise ValueError(f"{name} must be a non-empty sequence from {POOLINGS}, got {kinds!r}")
        if rope is not None:
            rope.frequencies(gate_dim)  # raises ValueError if the rotary dim doesn't fit gate_dim
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        self.block_q, self.block_kv, self.gate_dim = block_q, block_kv, gate_dim
        self.q_pooling, self.k_pooling = tuple(q_pooling), tuple(k_pooling)
        self.rope = rope

        def weight(heads, fan_in):
            w = jax.random.normal(rngs.params(), (heads, fan_in, gate_dim), jnp.float32) * fan_in ** -0.5
            return nnx.Param(w.astype(param_dtype))

        self.w_q = weight(num_heads, head_dim * len(self.q_pooling))
        self.w_k = weight(num_kv_heads, head_dim * len(self.k_pooling))

    def logits(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> jax.Array:
        """Gate logits ``q̃_i·k̃_j / √d_gate``, float32 ``[B, Hq, nq, nk]``, ``-inf`` on blocks the mask
        rules out. ``q [B, T, Hq, D]``, ``k [B, S, Hkv, D]``."""
        B, T, Hq, D = q.shape
        S, Hkv = k.shape[1], k.shape[2]
        if (D, Hq, Hkv) != (self.head_dim, self.num_heads, self.num_kv_heads) or k.shape[-1] != D:
            raise ValueError(f"AttnGate built for head_dim={self.head_dim}, heads {self.num_heads}/"
                             f"{self.num_kv_heads} (q/kv), got q {q.shape}, k {k.shape}")
        w_q, w_k = self.w_q[...].astype(jnp.float32), self.w_k[...].astype(jnp.float32)
        pq = jnp.einsum("bnhi,hio->bnho", block_pool(q, self.block_q, self.q_pooling), w_q)
        pk = jnp.einsum("bnhi,hio->bnho", block_pool(k, self.block_kv, self.k_pooling), w_k)
        nq, nk = pq.shape[1], pk.shape[1]
        if self.rope is not None:
            pq = self.rope(pq, jnp.arange(nq) * self.block_q + (S - T))
            pk = self.rope(pk, jnp.arange(nk) * self.block_kv)
        pq = pq.reshape(B, nq, Hkv, Hq // Hkv, self.gate_dim)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", pq, pk).reshape(B, Hq, nq, nk) * self.gate_dim ** -0.5
        ok = jnp.asarray(allowed_blocks(mask, T, S, self.block_q, self.block_kv))
        return jnp.where(ok, s, -jnp.inf)

    def __call__(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> jax.Array:
        """Block scores: softmax over allowed key blocks, float32 ``[B, Hq, nq, nk]`` (0 elsewhere;
        a row with no allowed block is all 0)."""
        s = self.logits(q, k, mask=mask)
        ok = jnp.isfinite(s)
        p = jax.nn.softmax(jnp.where(ok, s, -1e30), axis=-1)
        return jnp.where(ok, p, 0.0)


def gate_loss(
    gate: AttnGate, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None, scale: Optional[float] = None,
    target: Optional[jax.Array] = None, skip_fraction: float = 0.25,
) -> jax.Array:
    """Distillation loss: ``KL(G ‖ gate)`` per query-block row, averaged over the rows used.

    ``G`` is ``block_max_attention(q, k, ...)`` at the gate's block sizes (or ``target`` when
    given, e.g. computed once for several steps). The public code uses ``torch.nn.KLDivLoss``
    (mean over every element), i.e. this loss divided by ``nk``; like it, the first
    ``skip_fraction`` of the query blocks (the short causal rows) are left out "for training
    stability". Rows whose ground truth is all 0 (they see no key) are left out too.

    Returns a float32 scalar; gradients flow to the gate's parameters only.
    """
    if not 0.0 <= skip_fraction < 1.0:
        raise ValueError(f"skip_fraction must be in [0, 1), got {skip_fraction}")
    if target is None:
        target = block_max_attention(q, k, block_q=gate.block_q, block_kv=gate.block_kv, mask=mask, scale=scale)
    target = lax.stop_gradient(target.astype(jnp.float32))
    s = gate.logits(lax.stop_gradient(q), lax.stop_gradient(k), mask=mask)
    log_gate = jax.nn.log_softmax(jnp.where(jnp.isfinite(s), s, -1e30), axis=-1)
    positive = target > 0
    log_target = jnp.log(jnp.where(positive, target, 1.0))
    kl_rows = jnp.sum(jnp.where(positive, target * (log_target - log_gate), 0.0), axis=-1)  # [B, Hq, nq]
    nq = kl_rows.shape[-1]
    used = positive.any(-1) & (jnp.arange(nq) >= int(skip_fraction * nq))
    return jnp.sum(jnp.where(used, kl_rows, 0.0)) / jnp.maximum(used.sum(), 1)


@nnx.jit(static_argnames=("scale", "skip_fraction"))
def distillation_step(
    gate: AttnGate, optimizer: nnx.Optimizer, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
    scale: Optional[float] = None, target: Optional[jax.Array] = None, skip_fraction: float = 0.25,
) -> jax.Array:
    """One optax step on ``gate_loss`` (jitted); returns the loss before the update.

    ``optimizer`` is ``nnx.Optimizer(gate, tx, wrt=nnx.Param)``; q and k are fixed inputs (the
    attention weights that produce them are not trained), as in SeerAttention's post-training
    distillation. Example::

        gate = AttnGate(D, Hq, num_kv_heads=Hkv, block_q=64, block_kv=64, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(gate, optax.adam(1e-3), wrt=nnx.Param)
        for q, k in batches:
            loss = distillation_step(gate, optimizer, q, k, mask=masks.Causal())
    """
    def loss_fn(g):
        return gate_loss(g, q, k, mask=mask, scale=scale, target=target, skip_fraction=skip_fraction)

    loss, grads = nnx.value_and_grad(loss_fn)(gate)
    optimizer.update(gate, grads)
    return loss


def _gate_example(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``q [2, 12, 2, 8]`` and ``k [2, 12, 1, 8]`` for the ``AttnGate`` spec."""
    kq, kk = jax.random.split(key)
    return jax.random.normal(kq, (2, 12, 2, 8), jnp.float32), jax.random.normal(kk, (2, 12, 1, 8), jnp.float32)


register_module(ModuleSpec(
    "seer_gate", AttnGate, dict(head_dim=8, num_heads=2, num_kv_heads=1, block_q=4, block_kv=4), _gate_example,
    kind="other", paper="Gao et al. 2024 (SeerAttention)", call_kwargs=dict(mask=Causal())))

__all__ = ["AttnGate", "POOLINGS", "block_pool", "distillation_step", "gate_loss"]
