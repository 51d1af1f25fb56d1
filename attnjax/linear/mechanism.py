"""The shared registry contract of the linear-attention family (``attnjax.attention(mechanism=...)``).

Masks map onto ``linear_attention``: ``None`` is non-causal, ``masks.Causal()`` causal,
``masks.Segments(ids)`` (alone or ``& Causal()``) packed sequences with the state reset at each id
change. Decay needs a causal mask. Causal with ``T != S`` follows the library's bottom-right
alignment (query ``i`` at key position ``i + S − T``): the first ``S − T`` keys become the initial
state, or the first ``T − S`` queries see no key and get 0. Other masks, bias, sinks, soft cap,
dropout and ``return_lse`` are refused by the registry's ``supports`` gate (``attnjax.api``).
Each mechanism (``linear``, ``lightning``, ``performer``, ``based_linear``) is a subclass in its own file.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional, Union

import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.linear.feature_maps import FeatureMap
from attnjax.linear.linear_attention import linear_attention

SUPPORTS = frozenset({"mask", "gqa", "cross"})
"""Options of ``attnjax.attention`` the linear family serves."""


def parse_mask(mask: Optional[masks.Mask], batch: int):
    """``(causal, segment_ids or None)`` from the masks linear attention can serve."""
    parts = [mask.a, mask.b] if isinstance(mask, masks.And) else [mask]
    causal = any(isinstance(m, masks.Causal) for m in parts)
    segments = [m for m in parts if isinstance(m, masks.Segments)]
    if mask is not None and len(parts) != causal + len(segments) or len(segments) > 1:
        raise NotImplementedError(f"linear attention serves no mask, Causal(), Segments(ids) or Causal() & "
                                  f"Segments(ids); got {mask!r}")
    if not segments:
        return causal, None
    seg = segments[0]
    if seg.kv_segment_ids is not None and seg.kv_segment_ids is not seg.q_segment_ids:
        raise NotImplementedError("linear attention needs kv_segment_ids equal to q_segment_ids (self-attention)")
    ids = seg.q_segment_ids
    return causal, jnp.broadcast_to(ids, (batch, ids.shape[1]))


@dataclasses.dataclass(frozen=True)
class LinearMechanism:
    """Shared fields; see ``linear_attention`` for their meaning."""

    feature_map: Union[str, FeatureMap] = "identity"
    normalize: bool = False
    decay: Union[None, str, tuple] = None
    chunk_size: int = 64

    family: ClassVar[str] = "linear"
    supports: ClassVar[frozenset] = SUPPORTS
    decodes: ClassVar[bool] = True
    sequence_parallel: ClassVar[tuple] = ("lasp2",)

    def implementations(self):
        return {name: self._bind(name) for name in ("reference", "recurrent", "xla", "pallas")}

    def _bind(self, implementation: str):
        def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask=None, scale=None):
            causal, segment_ids = parse_mask(mask, q.shape[0])
            if self.decay is not None and not causal:
                raise NotImplementedError(f"{self.name} has a decay, which needs a causal mask (masks.Causal())")
            decay = jnp.asarray(self.decay, jnp.float32) if isinstance(self.decay, tuple) else self.decay
            call = functools.partial(linear_attention, feature_map=self.feature_map, causal=causal,
                                     normalize=self.normalize, decay=decay, scale=scale, chunk_size=self.chunk_size,
                                     segment_ids=segment_ids, implementation=implementation)
            return bottom_right(call, q, k, v) if causal and q.shape[1] != k.shape[1] else call(q, k, v)
        return attend


def bottom_right(call, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal attention with ``T != S``, query ``i`` at key position ``i + S − T``."""
    B, T = q.shape[:2]
    S = k.shape[1]
    if T > S:
        out = call(q[:, T - S:], k, v)
        return jnp.concatenate([jnp.zeros((B, T - S, *out.shape[2:]), out.dtype), out], axis=1)
    _, state = call(jnp.zeros((B, S - T, *q.shape[2:]), q.dtype), k[:, :S - T], v[:, :S - T], return_state=True)
    return call(q, k[:, S - T:], v[:, S - T:], initial_state=state)
