"""Capture of the q and k that the attention layers of ``attnjax.nn`` hand to ``attnjax.attention``.

A layer calls ``sow_attention_inputs`` once, right before its attention call. Outside
``capture_attention_state`` that call does nothing (one context-variable read at trace time: no
extra outputs, no new state). Inside it, the layer sows an ``AttentionInputs`` (q after RoPE and
any rescaling, k, the mask, the scale) as a ``CapturedAttention`` variable through flax's
``nnx.capture``, which hands the values back as a ``State`` and leaves the model's attributes as
they were. ``attnjax.analysis.capture`` turns that ``State`` into a list in call order.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
from typing import Any, Callable, Optional

import jax
from flax import nnx

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

    The map is ``softmax(scale·q·kᵀ)`` over the keys ``mask`` allows, GQA query head ``h`` reading key
    head ``h // (Hq // Hkv)``: the arguments of ``attnjax.analysis`` tools (``tool(q, k, mask=mask,
    scale=scale)``).

    Attributes:
      q: ``[B, T, Hq, D]`` queries as passed to ``attnjax.attention`` (after RoPE and any rescaling).
      k: ``[B, S, Hkv, D]`` keys (after RoPE).
      mask: the ``attnjax.masks`` value of the call, or ``None``.
      scale: the logit scale (the layer's, or ``attnjax.attention``'s default ``1/sqrt(D)``).
      mechanism: the registry name of the layer's mechanism ("softmax" for a softmax map).
      index: the call's position in the capture, 0 first (call order).
      path: the layer's attribute path in the model, e.g. ``("blocks", 0, "attention")``; ``()`` until
        ``attnjax.analysis.capture_attention`` fills it in.
    """

    q: jax.Array
    k: jax.Array
    mask: Optional[Mask]
    scale: float = dataclasses.field(metadata=dict(static=True))
    mechanism: str = dataclasses.field(metadata=dict(static=True))
    index: int = dataclasses.field(metadata=dict(static=True))
    path: tuple = dataclasses.field(default=(), metadata=dict(static=True))


def is_capturing() -> bool:
    """Whether a ``capture_attention_state`` call is tracing or running the model now."""
    return _CALL_COUNTER.get() is not None


def sow_attention_inputs(module: nnx.Module, q: jax.Array, k: jax.Array, *, mask: Optional[Mask],
                         scale: Optional[float], mechanism: str) -> None:
    """Record ``q [B, T, Hq, D]``, ``k [B, S, Hkv, D]``, ``mask`` and ``scale`` (``None``: ``1/sqrt(D)``) of
    ``module``'s attention call while capturing; do nothing otherwise."""
    counter = _CALL_COUNTER.get()
    if counter is None:
        return
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    module.sow(CapturedAttention, SOW_NAME, AttentionInputs(q, k, mask, scale, mechanism, next(counter)))


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
