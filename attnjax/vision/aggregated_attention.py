"""TransNeXt's aggregated attention and convolutional GLU.

Shi, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers", CVPR 2024 (arXiv 2311.17132);
official code DaiShiResearch/TransNeXt (``classification/attention_native.py``, ``AggregatedAttention``;
``classification/transnext.py``, ``ConvolutionalGLU``).

In the paper's terms, cited by name (masking, scales, biases and initial values
follow the official code):

* Pixel-focused attention: the query at pixel ``i`` attends, through ONE softmax, to the keys of its ``k×k``
  sliding window at full resolution (foveal vision; zero padding, positions outside the map masked) and to
  keys pooled to a small grid (peripheral vision):
  ``A_i = softmax([s_i·K̂_{ρ(i)} + B_local, s_i·K̂_pool + B_pool(i)])``,
  ``y_i = A_i^local V_{ρ(i)} + A_i^pool V_pool``.
  The pooled keys and values come from ``LayerNorm(AdaptiveAvgPool(GELU(x W_sr + b_sr)))`` through the same
  key-value projection as the window's.
* Aggregated attention adds a learnable query embedding ``QE`` (added to every query) and learnable tokens
  ``T`` whose affinity with the normalized query joins the local attention weights after the softmax:
  ``A_i^local ← A_i^local + q̂_i T + b_T`` (the official ``learnable_tokens``, ``learnable_bias``).
* Length-scaled cosine attention: queries and keys are L2-normalized and the logits scaled by ``τ·log N_i``,
  a learnable per-head temperature ``τ = softplus(t)`` (initialized to ``1/0.24``) times the log of the
  number of keys the query sees, ``N_i = |ρ(i)| + P`` (fewer window keys at the border):
  ``s_i = (q̂_i + QE)·τ·log N_i``.
* Position biases: a learnable bias per window offset, ``B_local [heads, k²]``, and for the pooled keys a
  continuous relative position bias from an MLP on log-spaced relative coordinates
  (``pooled_relative_coordinates``; Swin-v2's log-CPB, as the official code).
* Convolutional GLU: ``y = W₂ (GELU(DWConv₃ₓ₃(x W₁ᵍ + b₁ᵍ)) ⊙ (x W₁ᵘ + b₁ᵘ)) + b₂``, a GLU whose
  gating branch (the one that gets the activation: the first half of ``fc1``'s output in the official
  code) passes through a 3×3 depthwise convolution first.

The window part gathers each pixel's ``k×k`` neighbourhood with padding and shifted slices, never a dense
``[HW, HW]`` map: cost ``O(B·H·W·heads·D·(k² + P))``. Layout: ``[B, H, W, heads, head_dim]``.

``attnjax.local.neighborhood`` is not used: its windows follow NATTEN (shifted to stay inside the map, always
``k²`` keys), TransNeXt's are zero-padded and centred (fewer keys at the border), and the softmax here is
shared with the pooled keys.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.vision.metamixer import depthwise_conv, gelu

INITIAL_TEMPERATURE = 1 / 0.24
"""``softplus(t)`` at initialization (the official code's ``temperature`` init)."""

CPB_SCALE = 8.0
"""Relative coordinates are normalized to ``[-8, 8]`` and log-spaced with base 8 (Swin-v2 / official code)."""


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(‖x‖₂, eps)`` along ``axis`` (``torch.nn.functional.normalize``)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def window_offsets(window: int) -> list[tuple[int, int]]:
    """The ``k²`` offsets ``(dy, dx)`` of a ``k×k`` window, row-major (``torch.nn.Unfold``'s order)."""
    r = window // 2
    return [(dy - r, dx - r) for dy in range(window) for dx in range(window)]


def gather_windows(x: jax.Array, window: int) -> jax.Array:
    """Each pixel's ``k×k`` neighbourhood, zero outside the map: ``[B, H, W, ...] -> [B, H, W, k², ...]``.

    Element ``[b, y, x, j]`` is ``x[b, y + dy_j, x + dx_j]`` for the ``j``-th offset of ``window_offsets``.
    Padding plus ``k²`` shifted slices; no dense map.
    """
    r = window // 2
    H, W = x.shape[1], x.shape[2]
    padded = jnp.pad(x, [(0, 0), (r, r), (r, r)] + [(0, 0)] * (x.ndim - 3))
    return jnp.stack([padded[:, r + dy:r + dy + H, r + dx:r + dx + W] for dy, dx in window_offsets(window)], axis=3)


def window_mask(height: int, width: int, window: int) -> np.ndarray:
    """``[H, W, k²]`` bool: the ``j``-th window position of pixel ``(y, x)`` lies inside the map."""
    ys, xs = np.arange(height)[:, None, None], np.arange(width)[None, :, None]
    dy, dx = (np.array(d)[None, None, :] for d in zip(*window_offsets(window)))
    return (ys + dy >= 0) & (ys + dy < height) & (xs + dx >= 0) & (xs + dx < width)


def length_scale(height: int, width: int, window: int, pool_len: int) -> np.ndarray:
    """``log N_i`` per pixel, ``[H, W]``: ``N_i`` = the window keys inside the map plus the ``P`` pooled keys
    (length-scaled cosine attention, Shi 2024)."""
    return np.log(window_mask(height, width, window).sum(-1) + pool_len).astype(np.float32)


def adaptive_pool_bins(size: int, out: int) -> list[tuple[int, int]]:
    """The ``out`` bins ``[start, end)`` of adaptive average pooling over ``size`` positions
    (``torch.nn.AdaptiveAvgPool``): bin ``i`` is ``[⌊i·size/out⌋, ⌈(i+1)·size/out⌉)``."""
    if out < 1:
        raise ValueError(f"the pooled size must be at least 1, got {out} (from an input of {size})")
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    """``[out, size]`` averaging weights of adaptive average pooling (``adaptive_pool_bins``)."""
    weights = np.zeros((out, size), np.float32)
    for i, (start, end) in enumerate(adaptive_pool_bins(size, out)):
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool(x: jax.Array, out: tuple[int, int]) -> jax.Array:
    """Adaptive average pooling of ``x [B, H, W, C]`` to ``[B, ph, pw, C]`` (``torch.nn.AdaptiveAvgPool2d``)."""
    ph, pw = (jnp.asarray(adaptive_pool_matrix(n, m), x.dtype) for n, m in zip(x.shape[1:3], out))
    return jnp.einsum("ph,bhwc,qw->bpqc", ph, x, pw)


def pooled_relative_coordinates(query_size: tuple[int, int], key_size: tuple[int, int],
                                pretrain_size: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, np.ndarray]:
    """The inputs of the continuous position bias between the ``H×W`` queries and the ``ph×pw`` pooled keys.

    A pooled key sits at the mean coordinate of its pooling bin (exactly: a centre off by rounding would move
    the MLP's input off zero). The offset ``Δ = (y_q − y_k, x_q − x_k)`` is
    normalized, ``Δ / (L_pretrain − 1) · 8`` per axis, then log-spaced, ``sign(Δ)·log₂(|Δ| + 1) / log₂ 8``
    (official code ``get_relative_position_cpb``; ``L_pretrain − 1`` is taken as at least 1).

    Args:
      query_size: ``(H, W)``; key_size: ``(ph, pw)``.
      pretrain_size: the feature map size of pre-training, ``(H, W)`` if ``None``.

    Returns:
      ``(index [H·W, ph·pw] int32, table [U, 2] float32)``: the distinct coordinates and, per (query, key)
      pair, the row of its coordinate; the bias is ``mlp(table)[index]``.
    """
    pretrain_size = query_size if pretrain_size is None else pretrain_size
    axes = []
    for n, m, p in zip(query_size, key_size, pretrain_size):
        q_axis = np.arange(n, dtype=np.float64)
        k_axis = np.array([(start + end - 1) / 2 for start, end in adaptive_pool_bins(n, m)])
        axes.append((q_axis[:, None] - k_axis[None, :]) / max(p - 1, 1) * CPB_SCALE)
    (H, ph), (W, pw) = axes[0].shape, axes[1].shape
    rel_h = np.broadcast_to(axes[0][:, None, :, None], (H, W, ph, pw))
    rel_w = np.broadcast_to(axes[1][None, :, None, :], (H, W, ph, pw))
    coords = np.stack([rel_h, rel_w], axis=-1).reshape(-1, 2).astype(np.float32)
    table, index = np.unique(coords, axis=0, return_inverse=True)
    table = np.sign(table) * np.log2(np.abs(table) + 1.0) / math.log2(CPB_SCALE)
    return index.reshape(H * W, ph * pw).astype(np.int32), table.astype(np.float32)


def aggregated_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_pool: jax.Array, v_pool: jax.Array, *,
                         query_embedding: jax.Array, temperature: jax.Array, local_bias: jax.Array,
                         pool_bias: jax.Array, learnable_tokens: jax.Array, learnable_bias: jax.Array,
                         window: int = 3) -> jax.Array:
    """Aggregated attention (Shi 2024; official ``AggregatedAttention.forward``): pixel-focused attention over
    a ``k×k`` window and ``P`` pooled keys with one softmax, query embedding, learnable tokens and
    length-scaled cosine attention.

    With ``q̂, k̂`` the L2-normalized queries and keys and ``s_i = (q̂_i + QE)·softplus(t)·log N_i``::

      A_i = softmax([s_i·k̂_j + B_local[j] for j in window(i), masked outside the map] ++
                    [s_i·k̂ᵖ_p + B_pool[i, p] for p < P])
      y_i = Σ_j (A_i[j] + q̂_i·T[:, j] + b_T[j]) v_j + Σ_p A_i[k² + p] vᵖ_p

    Args:
      q, k: ``[B, H, W, heads, D]``; v: ``[B, H, W, heads, Dv]`` (the full-resolution projections).
      k_pool, v_pool: ``[B, P, heads, D]``, ``[B, P, heads, Dv]`` (the pooled keys and values).
      query_embedding: ``QE [heads, D]``.
      temperature: ``t [heads]``, before the softplus.
      local_bias: ``B_local [heads, k²]``, one bias per window offset (``window_offsets`` order).
      pool_bias: ``B_pool [H, W, heads, P]``.
      learnable_tokens: ``T [heads, D, k²]``; learnable_bias: ``b_T [heads, k²]``.
      window: ``k``, odd.

    Returns:
      ``[B, H, W, heads, Dv]`` in ``q``'s dtype (logits, softmax and sums in float32).
    """
    check_aggregated(q, k, v, k_pool, v_pool, query_embedding=query_embedding, temperature=temperature,
                     local_bias=local_bias, pool_bias=pool_bias, learnable_tokens=learnable_tokens,
                     learnable_bias=learnable_bias, window=window)
    f32 = jnp.float32
    H, W, P = q.shape[1], q.shape[2], k_pool.shape[1]
    q_hat = l2_normalize(q.astype(f32))
    scale = jax.nn.softplus(temperature.astype(f32))[:, None] * jnp.asarray(length_scale(H, W, window, P))[..., None,
                                                                                                            None]
    s = (q_hat + query_embedding.astype(f32)) * scale
    k_win = gather_windows(l2_normalize(k.astype(f32)), window)
    v_win = gather_windows(v.astype(f32), window)
    local = jnp.einsum("bxyhd,bxyjhd->bxyhj", s, k_win) + local_bias.astype(f32)
    local = jnp.where(jnp.asarray(window_mask(H, W, window))[:, :, None, :], local, -jnp.inf)
    pooled = jnp.einsum("bxyhd,bphd->bxyhp", s, l2_normalize(k_pool.astype(f32))) + pool_bias.astype(f32)
    weights = jax.nn.softmax(jnp.concatenate([local, pooled], axis=-1), axis=-1)
    a_local, a_pool = weights[..., :window * window], weights[..., window * window:]
    a_local = a_local + jnp.einsum("bxyhd,hdj->bxyhj", q_hat, learnable_tokens.astype(f32)) + learnable_bias.astype(f32)
    out = jnp.einsum("bxyhj,bxyjhd->bxyhd", a_local, v_win) + jnp.einsum("bxyhp,bphd->bxyhd", a_pool,
                                                                          v_pool.astype(f32))
    return out.astype(q.dtype)


def check_aggregated(q: jax.Array, k: jax.Array, v: jax.Array, k_pool: jax.Array, v_pool: jax.Array, *,
                     query_embedding: jax.Array, temperature: jax.Array, local_bias: jax.Array, pool_bias: jax.Array,
                     learnable_tokens: jax.Array, learnable_bias: jax.Array, window: int) -> None:
    """``ValueError`` naming the argument unless the shapes of ``aggregated_attention``'s inputs agree."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int, got {window!r}")
    if q.ndim != 5:
        raise ValueError(f"q must have shape [batch, height, width, heads, head_dim], got {list(q.shape)}")
    B, H, W, heads, D = q.shape
    P, Dv, j = k_pool.shape[1] if k_pool.ndim == 4 else -1, v.shape[-1], window * window
    expected = {"k": (q.shape, k), "v": ((B, H, W, heads, Dv), v), "k_pool": ((B, P, heads, D), k_pool),
                "v_pool": ((B, P, heads, Dv), v_pool), "query_embedding": ((heads, D), query_embedding),
                "temperature": ((heads,), temperature), "local_bias": ((heads, j), local_bias),
                "pool_bias": ((H, W, heads, P), pool_bias), "learnable_tokens": ((heads, D, j), learnable_tokens),
                "learnable_bias": ((heads, j), learnable_bias)}
    for name, (shape, value) in expected.items():
        if tuple(jnp.shape(value)) != tuple(shape):
            raise ValueError(f"{name} must have shape {list(shape)} for q {list(q.shape)} and window {window}, "
                             f"got {list(jnp.shape(value))}")


def conv_glu(x: jax.Array, w1: jax.Array, b1: Optional[jax.Array], kernel: jax.Array, bias: Optional[jax.Array],
             w2: jax.Array, b2: Optional[jax.Array]) -> jax.Array:
    """Convolutional GLU (Shi 2024; official ``ConvolutionalGLU``): ``[g, u] = x W₁ + b₁``,
    ``y = (GELU(DWConv(g)) ⊙ u) W₂ + b₂``.

    Args:
      x: ``[B, H, W, C]``.
      w1, b1: ``[C, 2E]``, ``[2E]`` or ``None``; the first ``E`` outputs are the gating branch ``g``, the last
        ``E`` the value branch ``u`` (``fc1(x).chunk(2)`` in the official code).
      kernel, bias: ``[3, 3, 1, E]``, ``[E]`` or ``None``: the depthwise convolution of the gating branch.
      w2, b2: ``[E, C_out]``, ``[C_out]`` or ``None``.

    Returns:
      ``[B, H, W, C_out]``.
    """
    h = x @ w1.astype(x.dtype)
    h = h if b1 is None else h + b1.astype(x.dtype)
    gate, value = jnp.split(h, 2, axis=-1)
    y = (gelu(depthwise_conv(gate, kernel, bias)) * value) @ w2.astype(x.dtype)
    return y if b2 is None else y + b2.astype(x.dtype)


__all__ = ["INITIAL_TEMPERATURE", "CPB_SCALE", "l2_normalize", "window_offsets", "gather_windows", "window_mask",
           "length_scale", "adaptive_pool_bins", "adaptive_pool_matrix", "adaptive_avg_pool",
           "pooled_relative_coordinates", "aggregated_attention", "check_aggregated", "conv_glu"]
