"""Whole-model capture: the q and k of every attention layer of an ``attnjax.nn`` model, in one call.

``capture_attention(model, x, mask=masks.Causal())`` runs the model once and returns its outputs
and one ``AttentionInputs`` per attention call (layer path, ``q [B, T, Hq, D]``, ``k [B, S, Hkv,
D]``, mask, scale), in call order, without editing the model; ``apply_to_layers`` runs any
blockwise tool of ``attnjax.analysis`` (``attention_entropy``, ``sink_scores``, ...) on each, and
``attention_maps`` gives the dense maps at small T.

Layers that capture (they call ``attnjax.nn.capture.sow_attention_inputs`` before attention):
``MultiHeadAttention`` and every layer that runs its ``__call__``: ``SelectiveAttention`` (q after
the temperatures), ``SlidingWindowAttention`` (the window mask combined with the call's mask), the
sliding-window half of ``BasedBlock``, and ``MultiHeadAttention`` mixers inside other blocks
(``MetaFormerBlock``). Not captured: decoding steps (``decode``), layers that do not call the hook
(linear attention, Aaren, 2-simplicial attention, and the image modules of ``attnjax.nn.conv``,
MOAT's attention included), and sequence-parallel layers, which raise ``NotImplementedError``
while capturing. Stacks of layers run by ``nnx.scan``/``nnx.vmap`` are not supported (untested).

Under jit, capture inside an ``nnx.jit`` function that takes the model as an argument (the capture
flag is read while tracing; a ``jax.jit`` function that closes over the model cannot record into it
and raises flax's ``TraceContextError``)::

    @nnx.jit
    def entropies(model, x):
        _, captured = capture_attention(model, x, mask=masks.Causal())
        return apply_to_layers(attention_entropy, captured)

``AttentionInputs`` is a pytree (arrays and masks as leaves, path and scale static), so the captured
list itself can also be returned from ``nnx.jit``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.analysis.blockwise import dense_log_probabilities
from attnjax.nn.capture import AttentionInputs, capture_attention_state


def capture_attention(model: nnx.Module | Callable, *args: Any, **kwargs: Any) -> tuple[Any, list[AttentionInputs]]:
    """Run ``model(*args, **kwargs)`` and capture what each of its attention layers attended with.

    Args:
      model: an ``nnx.Module`` (called) or a bound method of one (e.g. ``model.encode``).
      *args, **kwargs: the call's arguments.

    Returns:
      ``(outputs, captured)``: the call's outputs, and one ``AttentionInputs`` per attention call in call
      order (a layer called twice appears twice, with the same ``path``). The model's state is unchanged.
    """
    outputs, state = capture_attention_state(model, *args, **kwargs)
    captured = [AttentionInputs(c.q, c.k, c.mask, c.scale, c.mechanism, c.index, tuple(path[:-1]))
                for path, variable in nnx.to_flat_state(state) for c in variable.get_value()]
    return outputs, sorted(captured, key=lambda c: c.index)


def apply_to_layers(tool: Callable[..., Any], captured: Sequence[AttentionInputs], **kwargs: Any) -> list[Any]:
    """``[tool(c.q, c.k, mask=c.mask, scale=c.scale, **kwargs) for c in captured]``.

    ``tool`` is any blockwise tool with ``attnjax.attention``'s ``mask``/``scale`` arguments
    (``attention_entropy``, ``sink_scores``, ``attention_received``, ``windowed_attention_distance``, ...);
    ``kwargs`` go to every call (e.g. ``block_q=512``). Results keep each layer's head count, so they
    come as a list in the order of ``captured``.

    Raises:
      ValueError: a layer's mechanism is not "softmax" (the tools compute softmax maps); filter the list,
        e.g. ``[c for c in captured if c.mechanism == "softmax"]``.
    """
    for c in captured:
        if not isinstance(c, AttentionInputs):
            raise TypeError(f"captured must hold AttentionInputs (from capture_attention), got {type(c).__name__}")
        if c.mechanism != "softmax":
            raise ValueError(f"layer {c.path} (call {c.index}) uses mechanism {c.mechanism!r}; the analysis tools "
                             "compute softmax maps: filter captured to mechanism == 'softmax'")
    return [tool(c.q, c.k, mask=c.mask, scale=c.scale, **kwargs) for c in captured]


def attention_maps(captured: Sequence[AttentionInputs]) -> list[jax.Array]:
    """The dense softmax map ``[B, Hq, T, S]`` (float32, 0 where masked) of each captured layer: small T only."""
    return [jnp.exp(log_p) for log_p in apply_to_layers(dense_log_probabilities, captured)]


__all__ = ["AttentionInputs", "capture_attention", "apply_to_layers", "attention_maps"]
