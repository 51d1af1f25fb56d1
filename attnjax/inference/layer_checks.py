"""Which ``attnjax.nn`` layers the inference caches can drive step by step with their own projections."""

from __future__ import annotations

from attnjax.nn.attention import MultiHeadAttention


def check_decoding_layer(layer: MultiHeadAttention, caller: str) -> None:
    """Refuse a layer whose decoding step ``caller`` (a cache's decode function) can't reproduce.

    The caches of ``attnjax.inference`` run ``MultiHeadAttention``'s step themselves: its ``query``/``key``/
    ``value`` projections, ``scale_qv``, ``rope``, softmax attention and ``out``. So the layer must be a
    ``MultiHeadAttention`` (``TypeError``) with the "softmax" mechanism, no ``position_bias`` rule (its
    bias reads key positions that a compacted or rolling cache no longer has) and without a subclass's
    own ``__call__``/``decode`` (e.g. ``SlidingWindowAttention``'s window), whose changes the step would
    silently drop (``NotImplementedError`` for each).
    """
    if not isinstance(layer, MultiHeadAttention):
        raise TypeError(f"{caller} takes an attnjax.nn.MultiHeadAttention layer, got {type(layer).__name__}")
    if layer.mechanism.name != "softmax":
        raise NotImplementedError(f"{caller} decodes softmax attention only; the layer's mechanism is "
                                  f"{layer.mechanism.name!r}")
    if layer.position_bias is not None:
        raise NotImplementedError(
            f"{caller} supports RoPE or no positional scheme; the layer has a position_bias rule "
            f"({type(layer.position_bias).__name__}), whose bias depends on key positions that this cache "
            "does not keep")
    for method in ("__call__", "decode"):
        if getattr(type(layer), method) is not getattr(MultiHeadAttention, method):
            raise NotImplementedError(
                f"{caller} runs MultiHeadAttention's decoding step, but {type(layer).__name__} overrides "
                f"{method} (e.g. a windowed or otherwise changed attention), which it would not apply")


__all__ = ["check_decoding_layer"]
