"""The flash-family tile on Triton, shared by the flash and block-sparse GPU kernels: the optional
inputs of a ``FlashStatic`` call (sinks, bias, mask data) with their block specs and in-kernel
loader, and the tile math (capped logits, the allowed pairs, FA-2's recomputation of ``P`` and
``dS`` from the saved row statistic).

Grids are ``(i, b, h)`` for query-major programs (kind "q": forward, dQ) and ``(j, b, c)`` for
key-major ones (kind "kv": dK/dV, the ``FlashStatic.block_heads`` query heads of head block ``c`` in
one block: a GQA group, or whole K and V groups when their head counts differ).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common.gpu import dot, full_spec
from pallas_kernels.common.mask_plans import SegmentData, eval_mask, tile_iotas
from pallas_kernels.common.scores import alibi_tile, apply_soft_cap, soft_cap_grad, t5_bucket_tile, t5_tile
from pallas_kernels.common.statics import FlashStatic


@dataclasses.dataclass
class Extras:
    """Optional kernel inputs in a fixed order, with their specs for a given kernel kind."""

    arrays: list
    specs: list


def extras(st: FlashStatic, sinks, bias, mask_data, kind: str) -> Extras:
    """Arrays and specs of the sinks, the bias (ALiBi slopes, T5's ``(table, offset)`` from
    ``pallas_kernels.flash.common.t5_operands``, or an array) and the mask data, for a kernel of
    ``kind`` "q" (grid (i, b, h): a query tile and all keys) or "kv" (grid (j, b, c): all queries
    of the head block and one key tile)."""
    arrays, specs = [], []
    G, bq, bk, T_pad, S_pad = st.block_heads, st.block_q, st.block_kv, st.T_pad, st.S_pad
    if sinks is not None:
        arrays.append(sinks)
        specs.append(full_spec(sinks))
    if st.bias_kind == "alibi":
        arrays.append(bias)
        specs.append(full_spec(bias))
    elif st.bias_kind == "t5":
        arrays += list(bias)
        specs += [full_spec(x) for x in bias]
    elif st.bias_kind == "array":
        arrays.append(bias)
        specs.append(_bh_tile_spec(bias.shape, kind, G, bq, bk, T_pad, S_pad))
    for d in mask_data:
        if isinstance(d, SegmentData):
            one = d.q.shape[0] == 1
            if kind == "q":
                specs.append(pl.BlockSpec((None, bq), lambda i, b, h, one=one: (0 if one else b, i)))
                specs.append(pl.BlockSpec((None, S_pad), lambda i, b, h, one=one: (0 if one else b, 0)))
            else:
                specs.append(pl.BlockSpec((None, T_pad), lambda j, b, h, one=one: (0 if one else b, 0)))
                specs.append(pl.BlockSpec((None, bk), lambda j, b, h, one=one: (0 if one else b, j)))
            arrays += [d.q, d.kv]
        else:
            arrays.append(d.mask)
            specs.append(_bh_tile_spec(d.mask.shape, kind, G, bq, bk, T_pad, S_pad))
    return Extras(arrays, specs)


def _bh_tile_spec(shape, kind, G, bq, bk, T_pad, S_pad):
    """Spec for a ``[Bx, Hx, T_pad, S_pad]`` array with ``Bx ∈ {1, B}``, ``Hx ∈ {1, Hq}``."""
    b1, h1 = shape[0] == 1, shape[1] == 1
    if kind == "q":
        return pl.BlockSpec((None, None, bq, S_pad),
                            lambda i, b, h: (0 if b1 else b, 0 if h1 else h, i, 0))
    # kv kind: all query heads of the head block (G of them) or the single broadcast head.
    return pl.BlockSpec((None, None if h1 else G, T_pad, bk),
                        lambda j, b, hk: (0 if b1 else b, 0 if h1 else hk, 0, j))


class Loader:
    """In-kernel access to the optional inputs (``extras``) of one program.

    ``h``: the query head (traced); for kind "kv", ``g`` picks the head inside the head block.
    """

    def __init__(self, st: FlashStatic, refs, kind: str):
        self.st, self.kind = st, kind
        refs = list(refs)
        self.sinks = refs.pop(0) if st.has_sinks else None
        self.bias = refs.pop(0) if st.bias_kind is not None else None
        if st.bias_kind == "t5":
            self.bias = (self.bias, refs.pop(0))
        self.mask = {}
        if st.mask_plan is not None:
            for data_kind, slot in st.mask_plan.data_kinds():
                if data_kind == "segments":
                    self.mask[slot] = (refs.pop(0), refs.pop(0))
                else:
                    self.mask[slot] = refs.pop(0)
        assert not refs

    def _bh_tile(self, ref, i, j, g):
        """Tile (i, j) of a [.., T_pad, S_pad] bias/mask ref in this program's block."""
        bq, bk = self.st.block_q, self.st.block_kv
        if self.kind == "q":
            return ref[:, pl.ds(j * bk, bk)]
        rows = pl.ds(i * bq, bq)
        if len(ref.shape) == 3:
            return ref[g, rows, :]
        return ref[rows, :]

    def bias_tile(self, h, i, j, g, rows, cols):
        """The bias on tile ``(i, j)`` of query head ``h``: ALiBi or T5 from the iotas, or the array's tile."""
        if self.st.bias_kind == "alibi":
            return alibi_tile(self.bias[h], rows, cols, self.st.T, self.st.S)
        if self.st.bias_kind == "t5":
            table, nb = self.bias[0], self.st.t5.num_buckets
            return t5_tile([table[h * nb + b] for b in range(nb)], self.t5_buckets(rows, cols))
        return self._bh_tile(self.bias, i, j, g)

    def t5_buckets(self, rows, cols):
        """T5's bucket of each (query, key) pair of the tile (``scores.t5_bucket_tile``)."""
        return t5_bucket_tile(rows, cols, self.bias[1][0], self.st.t5)

    def mask_loader(self, i, j, g):
        """``eval_mask``'s loader of the Segments/Explicit data of tile ``(i, j)``."""
        bq, bk = self.st.block_q, self.st.block_kv

        def load(data_kind, slot):
            if data_kind == "segments":
                q_ref, kv_ref = self.mask[slot]
                if self.kind == "q":
                    qs, ks = q_ref[...], kv_ref[pl.ds(j * bk, bk)]
                else:
                    qs, ks = q_ref[pl.ds(i * bq, bq)], kv_ref[...]
                return qs[:, None], ks[None, :]
            return self._bh_tile(self.mask[slot], i, j, g)

        return load


def scores(st: FlashStatic, q, k, loader: Loader, h, i, j, g):
    """Capped logits ``[bq, bk]`` float32 (before masking) and the tile's iotas."""
    s = dot(q, k) * st.scale
    rows, cols = tile_iotas(i, j, st.block_q, st.block_kv)
    if st.bias_kind is not None:
        s = s + loader.bias_tile(h, i, j, g, rows, cols)
    return apply_soft_cap(s, st.logits_soft_cap), rows, cols


def allowed(st: FlashStatic, loader: Loader, i, j, g, rows, cols):
    """Bool ``[bq, bk]``: "the key is not padding" and the mask plan on tile ``(i, j)``."""
    ok = cols < st.S
    if st.mask_plan is not None:
        ok = ok & eval_mask(st.mask_plan, rows, cols, st.T, st.S, loader.mask_loader(i, j, g))
    return ok


def recompute(st: FlashStatic, s, mb, nb, dterm, dp, ok):
    """``P`` and ``dS`` (w.r.t. the raw, pre-cap logits) of one tile from the saved statistic."""
    fn = st.weight_fn
    w = fn.weight(fn.transform(s), mb[:, None])
    scale_n = jnp.exp(-nb)[:, None]
    p = w * scale_n
    dpds = fn.dweight(s, w) * scale_n
    if ok is not None:
        p = jnp.where(ok, p, 0.0)
        dpds = jnp.where(ok, dpds, 0.0)
    ds = dpds * (dp - dterm[:, None]) if fn.normalized else dpds * dp
    if st.logits_soft_cap is not None:
        ds = ds * soft_cap_grad(s, st.logits_soft_cap)
    return p, ds


__all__ = ["Extras", "extras", "Loader", "scores", "allowed", "recompute"]
