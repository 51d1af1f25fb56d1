"""Pointer attention (Ptr-Net): additive attention whose softmax over the input positions is the output.

Vinyals, Fortunato & Jaitly, "Pointer Networks", NeurIPS 2015, §2.3, eq. 3: with encoder states
``e_1 … e_n`` and decoder states ``d_1 … d_m``,

    u_j^i = vᵀ tanh(W1 e_j + W2 d_i),    j ∈ (1, …, n)
    p(C_i | C_1, …, C_{i−1}, P) = softmax(u^i)

so each decoder step points at one input position instead of blending the encoder states into a context
vector (the content-based attention of eq. 2, which uses the same ``u``). The paper has no biases in
``W1``, ``W2`` or ``v``, and neither has this module. A mask of allowed positions (e.g. not yet chosen, as
decoders for permutations use) removes positions from the softmax.

Paths: ``pointer_scores_reference`` (eq. 3 as written, one ``[B, m, n, h]`` tensor) and ``pointer_scores``
(``W1 e`` and ``W2 d`` projected once, then decoder steps in chunks with a rematerialized backward, so the
``[·, n, h]`` activations live for ``chunk_size`` steps at a time). ``pointer_log_probs`` is the masked
log-softmax; ``PointerAttention`` is the NNX module holding ``W1``, ``W2`` and ``v``.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive, describe
from attnjax.dispatch import check_implementation, dispatch
from attnjax.nn.checks import check_features
from attnjax.nn.registry import ModuleSpec, register_module

PAPER = "Vinyals, Fortunato & Jaitly 2015 (Pointer Networks)"


def check_pointer_inputs(encoded: jax.Array, decoded: jax.Array, w1: jax.Array, w2: jax.Array, v: jax.Array) -> None:
    """``TypeError`` unless ``encoded``/``decoded`` are floating point; ``ValueError`` naming the argument and the
    shapes unless ``encoded [B, n, d_e]``, ``decoded [B, m, d_d]``, ``w1 [d_e, h]``, ``w2 [d_d, h]``, ``v [h]``."""
    check_features("encoded", encoded)
    check_features("decoded", decoded)
    if encoded.ndim != 3 or decoded.ndim != 3 or encoded.shape[0] != decoded.shape[0]:
        raise ValueError(f"encoded must be [B, n, d_e] and decoded [B, m, d_d] with the same B, got "
                         f"{list(encoded.shape)} and {list(decoded.shape)}")
    if encoded.shape[1] == 0:
        raise ValueError(f"encoded must have at least one input position, got {list(encoded.shape)}")
    h = v.shape[0] if v.ndim == 1 else None
    if h is None or w1.shape != (encoded.shape[2], h) or w2.shape != (decoded.shape[2], h):
        raise ValueError(f"expected w1 [d_e, h] = {[encoded.shape[2], 'h']}, w2 [d_d, h] = {[decoded.shape[2], 'h']} "
                         f"and v [h]; got w1 {list(w1.shape)}, w2 {list(w2.shape)}, v {list(v.shape)}")


def check_pointer_mask(mask: Optional[jax.Array], batch: int, steps: int, positions: int) -> Optional[jax.Array]:
    """``mask`` as ``[B, m, n]`` bool (``[B, n]`` is broadcast over the ``m`` steps), or ``None``.

    ``TypeError`` unless boolean, ``ValueError`` naming the shapes otherwise.
    """
    if mask is None:
        return None
    if getattr(mask, "dtype", None) != jnp.bool_:
        raise TypeError(f"mask must be a boolean array of allowed positions, got {describe(mask)}")
    if mask.shape == (batch, positions):
        mask = mask[:, None, :]
    if mask.ndim != 3 or mask.shape[0] != batch or mask.shape[2] != positions or mask.shape[1] not in (1, steps):
        raise ValueError(f"mask must be [B, m, n] = {[batch, steps, positions]} or [B, n] = {[batch, positions]}, "
                         f"got {list(mask.shape)}")
    return jnp.broadcast_to(mask, (batch, steps, positions))


def pointer_scores_reference(encoded: jax.Array, decoded: jax.Array, w1: jax.Array, w2: jax.Array,
                             v: jax.Array) -> jax.Array:
    """Pointer scores ``u [B, m, n]`` float32, ``u_j^i = vᵀ tanh(W1 e_j + W2 d_i)`` (Vinyals et al. 2015, eq. 3).

    Naive: forms the whole ``[B, m, n, h]`` tanh tensor. ``encoded [B, n, d_e]``, ``decoded [B, m, d_d]``,
    ``w1 [d_e, h]``, ``w2 [d_d, h]``, ``v [h]``; computed in float32.
    """
    check_pointer_inputs(encoded, decoded, w1, w2, v)
    f32 = jnp.float32
    e, d = encoded.astype(f32), decoded.astype(f32)
    w1, w2, v = w1.astype(f32), w2.astype(f32), v.astype(f32)
    hidden = jnp.tanh(jnp.einsum("bjc,ch->bjh", e, w1)[:, None, :, :] + jnp.einsum("bic,ch->bih", d, w2)[:, :, None, :])
    return jnp.einsum("bijh,h->bij", hidden, v)


def pointer_scores(encoded: jax.Array, decoded: jax.Array, w1: jax.Array, w2: jax.Array, v: jax.Array, *,
                   chunk_size: int = 64) -> jax.Array:
    """Pointer scores ``u [B, m, n]`` float32 of eq. 3 (as ``pointer_scores_reference``), in chunks of decoder steps.

    ``W1 e`` (``[B, n, h]``) and ``W2 d`` (``[B, m, h]``) are projected once; the decoder steps then run in chunks
    of ``chunk_size`` (``m`` need not be a multiple: the last chunk is padded), each chunk forming its
    ``[B, chunk, n, h]`` tanh tensor, and the backward recomputes each chunk's tensor instead of storing it
    (``m <= chunk_size``: one chunk, no loop).
    Cost: ``O(B·(n·d_e + m·d_d)·h)`` for the projections plus ``O(B·m·n·h)`` for the scores (the backward
    recomputes the latter once); memory ``O(B·chunk·n·h + B·(n + m)·h)`` in forward and backward, against the
    reference's ``O(B·m·n·h)``.
    """
    check_pointer_inputs(encoded, decoded, w1, w2, v)
    check_positive(chunk_size=chunk_size)
    f32 = jnp.float32
    keys = jnp.einsum("bjc,ch->bjh", encoded.astype(f32), w1.astype(f32))
    queries = jnp.einsum("bic,ch->bih", decoded.astype(f32), w2.astype(f32))
    v = v.astype(f32)
    B, m, h = queries.shape
    chunk = min(chunk_size, m)
    pad = -m % chunk
    queries = jnp.pad(queries, ((0, 0), (0, pad), (0, 0))).reshape(B, (m + pad) // chunk, chunk, h)

    @jax.checkpoint
    def chunk_scores(q: jax.Array) -> jax.Array:
        return jnp.einsum("bijh,h->bij", jnp.tanh(q[:, :, None, :] + keys[:, None, :, :]), v)

    if chunk == m:  # one chunk: no loop
        return chunk_scores(queries[:, 0])
    scores = jax.lax.map(chunk_scores, jnp.moveaxis(queries, 1, 0))  # [chunks, B, chunk, n]
    return jnp.moveaxis(scores, 0, 1).reshape(B, m + pad, -1)[:, :m]


def pointer_log_probs(scores: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """``log softmax(u^i)`` over the allowed input positions (eq. 3's ``p(C_i | …)`` in log space), float32.

    ``scores [B, m, n]``; ``mask [B, m, n]`` (or ``[B, n]``) bool, ``True`` where position ``j`` may be pointed
    at from step ``i``. A masked position gets ``-inf`` (probability 0) and no gradient. A fully masked row (no
    position allowed) is defined as all ``-inf`` with zero gradient, never NaN.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be [B, m, n], got {list(scores.shape)}")
    scores = scores.astype(jnp.float32)
    if mask is None:
        return jax.nn.log_softmax(scores, axis=-1)
    mask = check_pointer_mask(mask, *scores.shape)
    any_allowed = jnp.any(mask, axis=-1, keepdims=True)
    top = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(any_allowed, top, 0.0))
    total = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, scores, top) - top), 0.0), axis=-1, keepdims=True)
    log_z = top + jnp.log(jnp.where(any_allowed, total, 1.0))
    return jnp.where(mask, scores - log_z, -jnp.inf)


class PointerAttention(nnx.Module):
    """Pointer attention (Ptr-Net, Vinyals et al. 2015, eq. 3): log-probabilities over the input positions.

    ``log p[b, i, j] = log softmax_j(vᵀ tanh(W1 e_j + W2 d_i))`` over the positions ``mask`` allows. One head,
    no biases (as the paper). Parameters: ``(d_e + d_d + 1)·h``.

    Example::

      pointer = PointerAttention(64, 64, rngs=nnx.Rngs(0))
      log_p = pointer(encoded, decoded, allowed)     # [B, n, 64], [B, m, 64], [B, m, n] bool -> [B, m, n]
      choice = log_p.argmax(-1)                      # greedy pointers

    Args:
      encoder_features: ``d_e``, features of ``encoded``.
      decoder_features: ``d_d``, features of ``decoded``.
      hidden_dim: ``h``, rows of ``W1``/``W2`` and size of ``v`` (default ``decoder_features``).
      chunk_size: decoder steps per chunk of the "xla" path (``pointer_scores``).
      implementation: "reference" (``pointer_scores_reference``), "xla" (``pointer_scores``) or "auto" ("xla").
      param_dtype: dtype of the parameters.
      rngs: ``params`` initializes ``W1``, ``W2`` (LeCun normal) and ``v`` (normal, std ``1/√h``).
    """

    def __init__(self, encoder_features: int, decoder_features: int, hidden_dim: Optional[int] = None, *,
                 chunk_size: int = 64, implementation: str = "auto", param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        hidden_dim = decoder_features if hidden_dim is None else hidden_dim
        check_positive(encoder_features=encoder_features, decoder_features=decoder_features, hidden_dim=hidden_dim,
                       chunk_size=chunk_size)
        check_implementation(implementation)
        if implementation not in ("reference", "xla", "auto"):
            raise NotImplementedError(f"PointerAttention has 'reference' and 'xla' paths, got {implementation!r}")
        self.chunk_size, self.implementation = chunk_size, implementation
        init = nnx.initializers.lecun_normal()
        self.w1 = nnx.Param(init(rngs.params(), (encoder_features, hidden_dim), param_dtype))
        self.w2 = nnx.Param(init(rngs.params(), (decoder_features, hidden_dim), param_dtype))
        self.v = nnx.Param(jax.random.normal(rngs.params(), (hidden_dim,), param_dtype) / hidden_dim ** 0.5)

    def __call__(self, encoded: jax.Array, decoded: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """Log-probabilities ``[B, m, n]`` (in ``decoded``'s dtype) that decoder step ``i`` points at input ``j``.

        Args:
          encoded: ``[B, n, d_e]``, the encoder states ``e_j``.
          decoded: ``[B, m, d_d]``, the decoder states ``d_i``.
          mask: ``[B, m, n]`` or ``[B, n]`` bool, ``True`` where a position may be pointed at (default: all);
            masked positions get ``-inf`` (``pointer_log_probs``).
        """
        paths = {"reference": pointer_scores_reference,
                 "xla": functools.partial(pointer_scores, chunk_size=self.chunk_size)}
        scores = dispatch(paths, self.implementation, encoded, decoded, self.w1[...], self.w2[...], self.v[...],
                          what="PointerAttention")
        return pointer_log_probs(scores, mask).astype(decoded.dtype)


def _example(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (2, 9, 8)), jax.random.normal(k2, (2, 5, 6))


register_module(ModuleSpec("pointer", PointerAttention, dict(encoder_features=8, decoder_features=6, hidden_dim=4,
                                                             chunk_size=2),
                           _example, kind="other", paper=PAPER))

__all__ = ["PointerAttention", "pointer_scores_reference", "pointer_scores", "pointer_log_probs",
           "check_pointer_inputs", "check_pointer_mask"]
