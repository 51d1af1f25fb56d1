"""Capture of the q and k that the attention layers of ``attnjax.nn`` hand to ``attnjax.attention``.

A layer calls ``sow_attention_inputs`` once, right before its softmax attention call, with the q, k, mask, bias
and scale of that call. Outside ``capture_attention_state`` that call does nothing (one context-variable read
at trace time: no extra outputs, no new state); a layer whose captured inputs cost something to form (a
broadcast, a window layout) asks ``is_capturing()`` first. Inside it, the layer sows an ``AttentionInputs`` as
a ``CapturedAttention`` variable through flax's ``nnx.capture``, which hands the values back as a ``State`` and
leaves the model's attributes as they were. ``attnjax.analysis.capture`` turns that ``State`` into a list in call
order.

Layers that record: ``MultiHeadAttention`` and its subclasses (``SelectiveAttention``,
``SlidingWindowAttention``; the position bias rule included), ``Aaren`` (its learned query per head broadcast
to every position, with the causal mask of its prefix softmax), ``MOATBlock`` (global attention, or its windows)
and Swin's ``WindowAttention`` (windows or MaxViT's grid; ``SwinBlock``, ``MaxViTBlock``). Window and grid layers
record what ``attnjax.vision.window`` hands to ``attnjax.attention``: the windows (or groups) as the batch axis,
``q, k [B·nW, wh·ww, heads, D]``, with the shifted windows' region mask and the relative position bias
``[heads, wh·ww, wh·ww]`` (``window_attention_inputs``, ``grid_attention_inputs``).
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
from typing import Any, Callable, Optional

import jax
from flax import nnx

from attnjax.bias import Bias
from attnjax.masks import Mask

SOW_NAME = "attention_inputs"
"""The name under which a layer sows its ``AttentionInputs`` (one tuple entry per call)."""

_CALL_COUNTER: contextvars.ContextVar[Optional[itertools.count]] = contextvars.ContextVar(
    "attnjax_attention_capture", default=None)


class CapturedAttention(nnx.Intermediate):
    """The ``nnx.Intermediate`` type that holds sown ``AttentionInputs`` (only during a capture)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class AttentionInputs:
    """What one attention call saw: enough to recompute its softmax map blockwise.

    The map is ``softmax(scale·q·kᵀ + bias)`` over the keys ``mask`` allows, GQA query head ``h`` reading key
    head ``h // (Hq // Hkv)``: the arguments of ``attnjax.analysis`` tools (``tool(q, k, mask=mask,
    scale=scale, bias=bias)``).

    Attributes:
      q: ``[B, T, Hq, D]`` queries as passed to ``attnjax.attention`` (after RoPE and any rescaling; for a window
        layer, ``B`` counts windows).
      k: ``[B, S, Hkv, D]`` keys (after RoPE).
      mask: the ``attnjax.masks`` value of the call, or ``None``.
      bias: the call's logit bias (an ``attnjax.bias.Bias`` rule or an array broadcastable to
        ``[B, Hq, T, S]``), or ``None``.
      scale: the logit scale (the layer's, or ``attnjax.attention``'s default ``1/sqrt(D)``).
      mechanism: the registry name of the layer's mechanism ("softmax" for a softmax map).
      index: the call's position in the capture, 0 first (call order).
      path: the layer's attribute path in the model, e.g. ``("blocks", 0, "attention")``; ``()`` until
        ``attnjax.analysis.capture_attention`` fills it in.
    """

    q: jax.Array
    k: jax.Array
    mask: Optional[Mask]
    bias: Optional[Bias | jax.Array]
    scale: float = dataclasses.field(metadata=dict(static=True))
    mechanism: str = dataclasses.field(metadata=dict(static=True))
    index: int = dataclasses.field(metadata=dict(static=True))
    path: tuple = dataclasses.field(default=(), metadata=dict(static=True))


def is_capturing() -> bool:
    """Whether a ``capture_attention_state`` call is tracing or running the model now."""
    return _CALL_COUNTER.get() is not None


def sow_attention_inputs(module: nnx.Module, q: jax.Array, k: jax.Array, *, mask: Optional[Mask],
                         scale: Optional[float], mechanism: str, bias: Optional[Bias | jax.Array] = None) -> None:
    """Record ``q [B, T, Hq, D]``, ``k [B, S, Hkv, D]``, ``mask``, ``bias`` and ``scale`` (``None``: ``1/sqrt(D)``)
    of ``module``'s attention call while capturing; do nothing otherwise."""
    counter = _CALL_COUNTER.get()
    if counter is None:
        return
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    module.sow(CapturedAttention, SOW_NAME, AttentionInputs(q, k, mask, bias, scale, mechanism, next(counter)))


def refuse_capture(what: str) -> None:
    """``NotImplementedError`` while capturing: for a layer whose attention inputs ``what`` cannot be
    captured as one ``AttentionInputs`` (e.g. sequence-parallel shards in a permuted token order)."""
    if is_capturing():
        raise NotImplementedError(f"capturing attention inputs is not supported for {what}")


def capture_attention_state(model: nnx.Module | Callable, *args: Any, **kwargs: Any) -> tuple[Any, nnx.State]:
    """Call ``model(*args, **kwargs)`` with capture on: ``(outputs, state)``, ``state`` holding every sown
    ``CapturedAttention`` variable by layer path.

    ``model`` is an ``nnx.Module`` or a bound method of one (``nnx.capture``'s rule). The model's
    attributes are unchanged afterwards; the capture flag is read while tracing, so call this inside a
    jitted function, not a jitted model under it.
    """
    token = _CALL_COUNTER.set(itertools.count())
    try:
        return nnx.capture(model, CapturedAttention)(*args, **kwargs)
    finally:
        _CALL_COUNTER.reset(token)


__all__ = ["SOW_NAME", "CapturedAttention", "AttentionInputs", "is_capturing", "sow_attention_inputs",
           "refuse_capture", "capture_attention_state"]
