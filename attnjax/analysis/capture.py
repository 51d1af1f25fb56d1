"""Whole-model capture: the q and k of every attention layer of an ``attnjax.nn`` model, in one call.

``capture_attention(model, x, mask=masks.Causal())`` runs the model once and returns its outputs
and one ``AttentionInputs`` per attention call (layer path, ``q [B, T, Hq, D]``, ``k [B, S, Hkv,
D]``, mask, bias, scale), in call order, without editing the model; ``apply_to_layers`` runs any
blockwise tool of ``attnjax.analysis`` (``attention_entropy``, ``sink_scores``, ...) on each, and
``attention_maps`` gives the dense maps at small T.

One mechanism records every layer: a layer calls ``attnjax.nn.capture.sow_attention_inputs`` right before its
softmax attention call. Layers that record: ``MultiHeadAttention`` and every layer that runs its ``__call__``
(``SelectiveAttention``: q after the temperatures; ``SlidingWindowAttention``: the window mask combined with
the call's mask; a position-bias rule such as T5's as the entry's ``bias``; the sliding-window half of
``BasedBlock``; ``MultiHeadAttention`` mixers inside other blocks such as ``MetaFormerBlock``), ``Aaren`` (its
learned query per head broadcast to every position, mask ``Causal``: the prefix softmax it computes), ``MOATBlock``
and Swin's ``WindowAttention`` (``SwinBlock``, ``MaxViTBlock``). Window and grid layers record the windows (or
groups) as the batch axis, ``q, k [B·nW, wh·ww, heads, D]``, with the shifted windows' region mask and the
relative position bias, exactly the call ``attnjax.vision.window`` makes.

Refused, clearly: a registered ``attnjax.nn`` layer, block or image module (``attnjax.nn.registry``) that ran
no recording call, nor has one below it or above it, makes ``capture_attention`` raise ``NotImplementedError``
naming its path and class (pass ``uncaptured="ignore"`` to capture the others). These are the linear family
(``FlowAttention``, ``TransNormerAttention``, ``BasedLinearAttention``, ``KernelizedRPEAttention``, the linear
vision modules: their maps are ``φ(q)·φ(k)`` ratios, not a softmax of ``q·kᵀ``, so the tools do not apply),
layers whose map is not one ``q·kᵀ`` softmax (2-simplicial attention, mixtures and routed heads such as BAM,
MoH, union-of-experts, GIN, echo stacks, the conv attention modules), and softmax layers not wired to the hook
yet (e.g. DaViT, L2ViT's windows, HaLo, CrossFormer, URPE, ComplexFormer). ``RelativeAttention`` (Music
Transformer) and sequence-parallel layers refuse by themselves while capturing; decoding steps (``decode``)
record nothing. Stacks of layers run by ``nnx.scan``/``nnx.vmap`` are not supported (untested).

Under jit, capture inside an ``nnx.jit`` function that takes the model as an argument (the capture
flag is read while tracing; a ``jax.jit`` function that closes over the model cannot record into it
and raises flax's ``TraceContextError``)::

    @nnx.jit
    def entropies(model, x):
        _, captured = capture_attention(model, x, mask=masks.Causal())
        return apply_to_layers(attention_entropy, captured)

``AttentionInputs`` is a pytree (arrays, masks and biases as leaves, path and scale static), so the captured
list itself can also be returned from ``nnx.jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.analysis.blockwise import dense_log_probabilities
from attnjax.nn.capture import AttentionInputs, capture_attention_state
from attnjax.nn.registry import modules

RECORDING_KINDS = ("layer", "block", "image")
"""Registry kinds whose modules must record (or sit under one that does) for a capture to be complete."""

UNCAPTURED = ("raise", "ignore")
"""What ``capture_attention`` does about registered attention modules that recorded nothing."""


def _root(model: nnx.Module | Callable) -> nnx.Module:
    return model.__self__ if hasattr(model, "__self__") and isinstance(model.__self__, nnx.Module) else model


def uncaptured_modules(model: nnx.Module | Callable, recorded: Sequence[tuple]) -> list[tuple[tuple, str]]:
    """``(path, class name)`` of every module of ``model`` whose class is registered in ``attnjax.nn`` with a
    kind in ``RECORDING_KINDS`` and that recorded nothing: no module at, below or above its path is in
    ``recorded`` (the paths of the modules that sowed). Only the outermost of nested ones is listed."""
    recording = {spec.module for spec in modules() if spec.kind in RECORDING_KINDS}
    recorded = {tuple(p) for p in recorded}

    def related(path: tuple, other: tuple) -> bool:
        n = min(len(path), len(other))
        return path[:n] == other[:n]

    silent = [(tuple(path), type(m).__name__) for path, m in nnx.iter_modules(_root(model))
              if type(m) in recording and not any(related(tuple(path), r) for r in recorded)]
    return [(path, name) for path, name in silent
            if not any(other != path and path[:len(other)] == other for other, _ in silent)]


def capture_attention(model: nnx.Module | Callable, *args: Any, uncaptured: str = "raise",
                      **kwargs: Any) -> tuple[Any, list[AttentionInputs]]:
    """Run ``model(*args, **kwargs)`` and capture what each of its attention layers attended with.

    Args:
      model: an ``nnx.Module`` (called) or a bound method of one (e.g. ``model.encode``).
      *args, **kwargs: the call's arguments.
      uncaptured: "raise" (default): ``NotImplementedError`` naming the registered attention modules of the
        model that recorded nothing (``uncaptured_modules``); "ignore": capture the others.

    Returns:
      ``(outputs, captured)``: the call's outputs, and one ``AttentionInputs`` per attention call in call
      order (a layer called twice appears twice, with the same ``path``). The model's state is unchanged.
    """
    if uncaptured not in UNCAPTURED:
        raise ValueError(f"uncaptured must be one of {UNCAPTURED}, got {uncaptured!r}")
    outputs, state = capture_attention_state(model, *args, **kwargs)
    entries = [(tuple(path[:-1]), c) for path, variable in nnx.to_flat_state(state) for c in variable.get_value()]
    if uncaptured == "raise":
        silent = uncaptured_modules(model, [path for path, _ in entries])
        if silent:
            names = ", ".join(f"{'/'.join(map(str, path)) or '<model>'} ({name})" for path, name in silent)
            raise NotImplementedError(
                f"capture_attention records softmax attention through q·kᵀ; these attention modules recorded "
                f"nothing (linear-family or other non-softmax maps, or layers not wired to "
                f"attnjax.nn.capture.sow_attention_inputs): {names}. Pass uncaptured='ignore' to capture the others")
    captured = [dataclasses.replace(c, path=path) for path, c in entries]
    return outputs, sorted(captured, key=lambda c: c.index)


def apply_to_layers(tool: Callable[..., Any], captured: Sequence[AttentionInputs], **kwargs: Any) -> list[Any]:
    """``[tool(c.q, c.k, mask=c.mask, scale=c.scale, bias=c.bias, **kwargs) for c in captured]`` (``bias`` only
    where the layer had one).

    ``tool`` is any blockwise tool with ``attnjax.attention``'s ``mask``/``scale``/``bias`` arguments
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
    return [tool(c.q, c.k, mask=c.mask, scale=c.scale, **({} if c.bias is None else {"bias": c.bias}), **kwargs)
            for c in captured]


def attention_maps(captured: Sequence[AttentionInputs]) -> list[jax.Array]:
    """The dense softmax map ``[B, Hq, T, S]`` (float32, 0 where masked) of each captured layer: small T only."""
    return [jnp.exp(log_p) for log_p in apply_to_layers(dense_log_probabilities, captured)]


__all__ = ["AttentionInputs", "RECORDING_KINDS", "UNCAPTURED", "capture_attention", "uncaptured_modules",
           "apply_to_layers", "attention_maps"]
