"""VHD and VHR: score heads by how much a context span moves their output, and amplify the sensitive ones.

He, Zhu, Guo, Fang, Hua, Jia, Tang, Chua, Wang, "Cracking the Code of Hallucination in LVLMs with Vision-aware
Head Divergence", ACL 2025 (arXiv:2412.13949). The span is the image in the paper; any span works here.

- VHD (eq. 4): head ``i`` of layer ``l`` at generation step ``t``, its output before ``W_O`` with and without the
  span, ``VHD_{l,i} = ‖A_{l,i}(y_t | y_<t, x_V, x_T) − A_{l,i}(y_t | y_<t, x_T)‖₂``.
- T-VHD (eq. 5): ``Σ_l Σ topk_i(VHD_{l,i}, k)``, the step's reliance on the span.
- VHR (eqs. 6-7): zero the surges, ``VHD_{l,i} := 0`` when ``VHD_{l,i} > μ + σ`` and ``TA_{l,i} > μ + σ`` (mean and
  standard deviation over the layer's heads, ``TA_{l,i} = ‖A_{l,i}(y_t | y_<t, x_T)‖²``); keep
  ``H_l = {i : VHD_{l,i} > median_i VHD_{l,i}}`` (the upper half) and scale their outputs, ``Ã_{l,i} = α·A_{l,i}``,
  ``α = 2`` (sec. 4.4).

Algorithm 1 runs layer by layer at the first generation step (layer ``l``'s heads are chosen with the layers
before it already reinforced) and keeps the heads for the rest of the generation, so the KV cache stays
consistent; the paper reinforces the second and the last 14 layers of LLaVA-1.5/NeXT-7B (the last 18 of
InstructBLIP). Here ``head_outputs`` reads a ``MultiHeadAttention``'s head outputs, ``select_heads`` is eqs. 6-7,
and ``reinforce_heads`` scales ``W_O``'s rows of the chosen heads by ``α``, which is ``α·A_{l,i}`` before ``W_O``
for every later call, decoding included::

    for l, block in enumerate(blocks):                     # one sample; x_with / x_without: the two inputs
        if l in reinforced_layers:
            a = head_outputs(block.attention, norm(x_with), mask=masks.Causal())[:, -1]
            b = head_outputs(block.attention, norm(x_without), mask=masks.Causal())[:, -1]
            block.attention = reinforce_heads(block.attention, select_heads(a, b)[0])
        x_with, x_without = block(x_with), block(x_without)

Paper and code: the official repository (jinghan1he/VHR) was not available here; this follows the paper's text.
``σ`` is the population standard deviation and the median that of ``jnp.median`` (the mean of the two middle
values for an even head count); the paper does not say which.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.checks import check_positive, describe
from attnjax.nn.attention import MultiHeadAttention

ALPHA = 2.0
"""VHR's scale factor ``α`` (He et al. 2025, sec. 4.4)."""


class _Identity(nnx.Module):
    """The identity, standing in for a layer's output projection in ``head_outputs``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def head_outputs(layer: MultiHeadAttention, x: jax.Array, context: Optional[jax.Array] = None,
                 **kwargs) -> jax.Array:
    """The per-head outputs ``A_{l,i}`` of a ``MultiHeadAttention`` call, before the output projection ``W_O``:
    ``[B, T, Hq, Dv]``, so that ``layer.out(head_outputs(layer, x, ...)) == layer(x, ...)``.

    The call is ``layer(x, context, **kwargs)`` with ``layer.out`` replaced by the identity for its duration.
    """
    if not isinstance(layer, MultiHeadAttention):
        raise TypeError(f"layer must be an attnjax.nn.MultiHeadAttention, got {type(layer).__name__}")
    out = layer.out
    layer.out = _Identity()
    try:
        heads = layer(x, context, **kwargs)
    finally:
        layer.out = out
    expected = (x.shape[0], x.shape[1], layer.num_heads, layer.v_head_dim)
    if heads.shape != expected:
        raise NotImplementedError(f"{type(layer).__name__} transforms its attention output after the output "
                                  f"projection (got {list(heads.shape)}, expected {list(expected)})")
    return heads


def _check_pair(with_span: jax.Array, without_span: jax.Array) -> None:
    for name, a in (("with_span", with_span), ("without_span", without_span)):
        if not hasattr(a, "ndim") or a.ndim < 2:
            raise ValueError(f"{name} must be head outputs [..., heads, head_dim], got {describe(a)}")
    if with_span.shape != without_span.shape:
        raise ValueError(f"with_span and without_span must have the same shape [..., heads, head_dim], got "
                         f"{list(with_span.shape)} and {list(without_span.shape)}")


def head_divergence(with_span: jax.Array, without_span: jax.Array) -> jax.Array:
    """VHD (He et al. 2025, eq. 4): ``‖A_i(with the span) − A_i(without it)‖₂`` per head, float32 ``[..., Hq]``.

    Args:
      with_span, without_span: head outputs ``[..., Hq, Dv]`` at the same step (e.g. ``head_outputs(...)[:, -1]``,
        the query of the token being generated), from the input with and without the span.
    """
    _check_pair(with_span, without_span)
    d = with_span.astype(jnp.float32) - without_span.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(d * d, axis=-1))


def select_heads(with_span: jax.Array, without_span: jax.Array) -> jax.Array:
    """VHR's heads ``H_l`` (He et al. 2025, eqs. 6-7), bool ``[..., Hq]``: VHD with the surges zeroed (VHD and
    ``TA = ‖A(without)‖²`` both above their mean plus standard deviation over the heads), then the heads above the
    median. Arguments as ``head_divergence``.
    """
    vhd = head_divergence(with_span, without_span)
    rest = without_span.astype(jnp.float32)
    ta = jnp.sum(rest * rest, axis=-1)

    def above(x):
        return x > jnp.mean(x, axis=-1, keepdims=True) + jnp.std(x, axis=-1, keepdims=True)

    vhd = jnp.where(above(vhd) & above(ta), 0.0, vhd)
    return vhd > jnp.median(vhd, axis=-1, keepdims=True)


def token_divergence(divergences: Union[jax.Array, Sequence[jax.Array]], k: int) -> jax.Array:
    """T-VHD (He et al. 2025, eq. 5): the sum over layers of each layer's ``k`` largest head divergences.

    Args:
      divergences: ``head_divergence`` of each layer, ``[L, ..., Hq]`` or a list of ``[..., Hq]`` (head counts may
        differ between layers in a list).
      k: heads per layer, at most the layer's head count.
    Returns:
      float32 ``[...]``.
    """
    check_positive(k=k)
    layers = list(divergences)
    if not layers:
        raise ValueError("divergences is empty: give one [..., Hq] array per layer")
    total = 0.0
    for i, d in enumerate(layers):
        if k > d.shape[-1]:
            raise ValueError(f"k={k} exceeds the {d.shape[-1]} heads of layer {i}")
        total = total + jnp.sum(jax.lax.top_k(d.astype(jnp.float32), k)[0], axis=-1)
    return total


def reinforce_heads(layer: MultiHeadAttention, heads: Union[Sequence[int], jax.Array, np.ndarray],
                    alpha: float = ALPHA) -> MultiHeadAttention:
    """VHR's reinforcement (He et al. 2025, eq. 7): a copy of ``layer`` whose heads ``heads`` have their outputs
    scaled by ``alpha``, ``Ã_i = α·A_i``, through ``W_O``'s rows of those heads (``A W_O = Σ_i A_i W_O^i``); the
    output bias, the attention and the KV cache layout are unchanged, so ``decode`` reinforces too.

    Args:
      layer: a ``MultiHeadAttention`` (left as it is).
      heads: query-head indices, or a concrete bool ``[Hq]`` mask (``select_heads`` of one sample).
      alpha: the scale factor (``ALPHA = 2``).
    """
    if not isinstance(layer, MultiHeadAttention):
        raise TypeError(f"layer must be an attnjax.nn.MultiHeadAttention, got {type(layer).__name__}")
    Hq = layer.num_heads
    chosen = np.asarray(heads)
    if chosen.dtype == np.bool_:
        if chosen.shape != (Hq,):
            raise ValueError(f"heads as a bool mask must have shape [Hq] = [{Hq}] (one sample), got "
                             f"{list(chosen.shape)}")
        chosen = np.flatnonzero(chosen)
    elif chosen.ndim != 1 or (chosen.size and not np.issubdtype(chosen.dtype, np.integer)):
        raise ValueError(f"heads must be query-head indices or a bool [Hq] mask, got {describe(heads)}")
    if chosen.size and (chosen.min() < 0 or chosen.max() >= Hq):
        raise ValueError(f"heads {chosen.tolist()} must index the layer's {Hq} query heads")
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    gain = np.ones((Hq, 1, 1), np.float32)
    gain[chosen.astype(int)] = alpha
    new = nnx.clone(layer)
    kernel = new.out.kernel
    kernel[...] = (kernel[...] * jnp.asarray(gain)).astype(kernel[...].dtype)
    return new


__all__ = ["ALPHA", "head_outputs", "head_divergence", "select_heads", "token_divergence", "reinforce_heads"]
