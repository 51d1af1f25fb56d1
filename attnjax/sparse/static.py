"""Static block patterns (catalog B1): sliding window, dilated window, StreamingLLM sinks + window.

A static selector knows its pattern from shapes and config alone: it builds a NumPy block mask,
ANDs it with the blocks that the request's mask allows (``attnjax.sparse.allowed_blocks``) and
turns it into lists with ``from_block_mask``. The lists are NumPy (static) for structural masks
such as ``Causal``; a data mask (``Segments``, ``Explicit``) makes them jax arrays (dynamic), with
``K`` the pattern's largest row count.

Block geometry, shared by ``power.py``, ``radial.py`` and ``s2.py``. Query row ``i`` sits at
position ``i + S - T`` (bottom-right alignment, ``attnjax.masks``), so query block ``I`` spans the
positions ``a_I = I·bq + S - T`` to ``b_I = min((I+1)·bq, T) - 1 + S - T``. Its *own* key blocks
are ``lo_I = ⌊a_I / bk⌋ … hi_I = ⌊b_I / bk⌋`` (the single block ``I`` when ``bq = bk`` and
``T = S``). The signed block distance of key block ``J`` from query block ``I`` is::

    δ(I, J) = lo_I − J   if J < lo_I        (keys before the queries: δ > 0)
              0          if lo_I ≤ J ≤ hi_I
              hi_I − J   if J > hi_I        (keys after the queries: δ < 0)

Patterns are symmetric in δ; a causal request keeps exactly ``δ ≥ 0`` (``Causal`` rules out the
blocks ``J > hi_I``), so "causal or symmetric" follows from the mask.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import registry
from attnjax.masks import Mask
from attnjax.checks import check_positive, describe
from attnjax.sparse.engine import BlockSelector, covers_allowed
from attnjax.blocked.lists import BlockSparse, allowed_blocks, from_block_mask
from attnjax.tiling import num_tiles


def check_nonnegative(**values: object) -> None:
    """``ValueError`` unless every value is a non-negative int."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {describe(value)}")


def own_key_blocks(T: int, S: int, block_q: int, block_kv: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)``, int ``[nq]``: the key blocks holding the first and last position of each query block."""
    start = np.arange(num_tiles(T, block_q)) * block_q
    first = start + (S - T)
    last = np.minimum(start + block_q, T) - 1 + (S - T)
    return first // block_kv, last // block_kv


def block_distance(T: int, S: int, block_q: int, block_kv: int) -> np.ndarray:
    """Signed block distance ``δ(I, J)`` (module docstring), int ``[nq, nk]``; ``> 0`` for keys before."""
    lo, hi = own_key_blocks(T, S, block_q, block_kv)
    j = np.arange(num_tiles(S, block_kv))[None, :]
    lo, hi = lo[:, None], hi[:, None]
    return np.where(j < lo, lo - j, np.where(j > hi, hi - j, 0))


def causal_blocks(T: int, S: int, block_q: int, block_kv: int) -> np.ndarray:
    """Blocks with ``δ ≥ 0``, bool ``[nq, nk]``: the blocks that ``Causal()`` does not rule out."""
    return block_distance(T, S, block_q, block_kv) >= 0


def lists_from_pattern(pattern: np.ndarray, mask: Optional[Mask], T: int, S: int, block_q: int,
                       block_kv: int) -> BlockSparse:
    """Lists of a static block pattern ANDed with the blocks ``mask`` allows.

    Args:
      pattern: bool ``[nq, nk]`` or per head ``[H, nq, nk]`` (NumPy).
      mask: the request's mask (``None`` allows every block).
    Returns:
      ``BlockSparse`` with NumPy lists when ``mask`` is structural, jax lists (``K`` = the
      pattern's largest row count) when it holds data.
    """
    pattern = np.asarray(pattern, bool)
    pattern = pattern.reshape((1,) * (4 - pattern.ndim) + pattern.shape)
    allowed = allowed_blocks(mask, T, S, block_q, block_kv)
    if isinstance(allowed, np.ndarray):
        return from_block_mask(pattern & allowed, block_q, block_kv)
    max_blocks = max(1, int(pattern.sum(-1).max()))
    return from_block_mask(jnp.asarray(pattern) & allowed, block_q, block_kv, max_blocks)


def sliding_window_blocks(T: int, S: int, block_q: int, block_kv: int, window_blocks: int,
                          causal: bool = False) -> np.ndarray:
    """Local window: ``|δ(I, J)| ≤ window_blocks`` (``0 ≤ δ`` when causal), bool ``[nq, nk]``.

    Sliding-window attention (Beltagy et al. 2020, "Longformer") at block granularity. With
    ``bq = bk`` and ``T = S`` a row lists ``min(I, w) + 1`` blocks causally, ``2w + 1`` inside
    symmetrically, so the causal density is ``≈ (w + 1) / nk`` for ``nk ≫ w``.
    """
    check_nonnegative(window_blocks=window_blocks)
    d = block_distance(T, S, block_q, block_kv)
    return (np.abs(d) <= window_blocks) & ((d >= 0) | (not causal))


def dilated_blocks(T: int, S: int, block_q: int, block_kv: int, span_blocks: int, dilation: int,
                   causal: bool = False) -> np.ndarray:
    """Dilated window: ``δ = 0``, or ``|δ| ≤ span_blocks`` with ``|δ| ≡ 0 (mod dilation)``, bool ``[nq, nk]``.

    The dilated sliding window of Longformer (Beltagy et al. 2020) / the strided pattern of Child
    et al. 2019, at block granularity: the own block and every ``r``-th block within the span. A
    causal row lists at most ``1 + ⌊span / r⌋`` blocks, so the causal density is
    ``≈ (1 + ⌊span / r⌋) / nk``.
    """
    check_nonnegative(span_blocks=span_blocks)
    check_positive(dilation=dilation)
    d = block_distance(T, S, block_q, block_kv)
    dist = np.abs(d)
    keep = (dist == 0) | ((dist <= span_blocks) & (dist % dilation == 0))
    return keep & ((d >= 0) | (not causal))


def streaming_blocks(T: int, S: int, block_q: int, block_kv: int, sink_blocks: int, window_blocks: int,
                     causal: bool = False) -> np.ndarray:
    """Sinks + window: ``J < sink_blocks`` or ``|δ(I, J)| ≤ window_blocks`` (``δ ≥ 0`` when causal).

    StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"):
    the first tokens (here the first ``sink_blocks`` key blocks) stay visible to every query
    beside a local window. Causal density ``≈ (sink_blocks + window_blocks + 1) / nk``.
    """
    check_nonnegative(sink_blocks=sink_blocks)
    window = sliding_window_blocks(T, S, block_q, block_kv, window_blocks, causal)
    sinks = np.arange(num_tiles(S, block_kv))[None, :] < sink_blocks
    return window | (sinks & (causal_blocks(T, S, block_q, block_kv) | (not causal)))


class StaticSelector(BlockSelector):
    """A selector whose blocks depend only on shapes and config: subclasses implement ``pattern``."""

    @property
    def decodes(self) -> bool:
        """Each query tile lies in one key block when ``block_q`` divides ``block_kv``, so a token's keys
        don't depend on its tile-mates and a one-token query against a KV cache gives its row."""
        return self.block_kv % self.block_q == 0

    def pattern(self, T: int, S: int, num_heads: int = 1) -> np.ndarray:
        """The symmetric block pattern, bool ``[nq, nk]`` or per head ``[num_heads, nq, nk]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement pattern()")

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> BlockSparse:
        """``pattern(T, S, Hq)`` ANDed with the blocks ``mask`` allows (causal masks make it causal)."""
        T, S, num_heads = q.shape[1], k.shape[1], q.shape[2]
        return lists_from_pattern(self.pattern(T, S, num_heads), mask, T, S, self.block_q, self.block_kv)

    def selects_every_block(self, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> bool:
        """True when ``pattern(T, S, num_heads)`` holds every block the mask allows (``covers_allowed``):
        e.g. a window of ``w`` blocks once ``nk ≤ w + 1`` under ``Causal()``."""
        return covers_allowed(self.pattern(T, S, num_heads), mask, T, S, self.block_q, self.block_kv)

    def __post_init__(self):
        check_positive(block_q=self.block_q, block_kv=self.block_kv)


@registry.register
@dataclasses.dataclass(frozen=True)
class SparseWindow(StaticSelector):
    """Block-sparse local window: key block ``J`` is listed for query block ``I`` iff ``|δ(I, J)| ≤ w``.

    ``δ`` is the signed block distance (module docstring); with ``mask=Causal()`` only ``δ ≥ 0``
    survives, giving ``w + 1`` blocks per row (the own block and ``w`` before). Density ``≈
    (w + 1) / nk`` causal, ``(2w + 1) / nk`` symmetric. Sliding-window attention (Beltagy et al.
    2020) with whole tiles, so every listed tile is dense (no fine mask needed).

    Attributes:
      window_blocks: ``w``, key blocks on each side of the own block(s).
      block_q, block_kv: tile sizes.
    """

    window_blocks: int = 8
    block_q: int = 64
    block_kv: int = 64

    name: ClassVar[str] = "sparse_window"
    paper: ClassVar[str] = "Sliding-window attention (Beltagy et al. 2020), block-sparse"

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative(window_blocks=self.window_blocks)

    def pattern(self, T: int, S: int, num_heads: int = 1) -> np.ndarray:
        return sliding_window_blocks(T, S, self.block_q, self.block_kv, self.window_blocks)


@registry.register
@dataclasses.dataclass(frozen=True)
class Dilated(StaticSelector):
    """Dilated block window: ``J`` listed iff ``δ = 0`` or (``|δ| ≤ span`` and ``|δ| ≡ 0 mod r``).

    The own block plus every ``r``-th block within ``span`` blocks on each side (Longformer's
    dilated window, Beltagy et al. 2020; Child et al. 2019's strided pattern, local in span).
    Causal density ``≈ (1 + ⌊span / r⌋) / nk``.

    Attributes:
      span_blocks: how far (in blocks) the dilated window reaches.
      dilation: ``r``, the step between listed blocks.
      block_q, block_kv: tile sizes.
    """

    span_blocks: int = 32
    dilation: int = 4
    block_q: int = 64
    block_kv: int = 64

    name: ClassVar[str] = "dilated"
    paper: ClassVar[str] = "Dilated sliding window (Beltagy et al. 2020; Child et al. 2019), block-sparse"

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative(span_blocks=self.span_blocks)
        check_positive(dilation=self.dilation)

    def pattern(self, T: int, S: int, num_heads: int = 1) -> np.ndarray:
        return dilated_blocks(T, S, self.block_q, self.block_kv, self.span_blocks, self.dilation)


@registry.register
@dataclasses.dataclass(frozen=True)
class Streaming(StaticSelector):
    """StreamingLLM attention sinks + local window: ``J`` listed iff ``J < n_sink`` or ``|δ| ≤ w``.

    Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks": the first key
    blocks (holding the initial "sink" tokens) plus a window of ``w`` blocks on each side of the own
    block (only before it under ``Causal()``). Causal density ``≈ (n_sink + w + 1) / nk``.

    Attributes:
      sink_blocks: ``n_sink``, leading key blocks every query sees.
      window_blocks: ``w``.
      block_q, block_kv: tile sizes.
    """

    sink_blocks: int = 1
    window_blocks: int = 8
    block_q: int = 64
    block_kv: int = 64

    name: ClassVar[str] = "streaming"
    paper: ClassVar[str] = "StreamingLLM (Xiao et al. 2023)"

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative(sink_blocks=self.sink_blocks, window_blocks=self.window_blocks)

    def pattern(self, T: int, S: int, num_heads: int = 1) -> np.ndarray:
        return streaming_blocks(T, S, self.block_q, self.block_kv, self.sink_blocks, self.window_blocks)


__all__ = [
    "SparseWindow", "Dilated", "Streaming", "StaticSelector", "sliding_window_blocks", "dilated_blocks",
    "streaming_blocks", "block_distance", "own_key_blocks", "causal_blocks", "lists_from_pattern",
    "check_nonnegative",
]
