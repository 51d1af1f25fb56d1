"""Triton-lowering helpers shared by the GPU kernels (flash, block-sparse, stick-breaking): the
tile-size cap, compiler parameters, a float32-accumulating 2-D matmul, the EMPTY/PARTIAL/FULL
switch of a tile walk and the block spec of a small whole array."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnjax.masks import EMPTY, FULL

MAX_BLOCK = 128
"""Larger tiles don't fit a GPU SM's registers/shared memory; bigger requests (e.g. the 512 x 512
tiles of ``attnjax.softmax.Softmax``, tuned for the xla path) are clipped to this."""


def compiler_params(D_pad: int, Dv_pad: int, block_q: int, block_kv: int, num_warps=None, num_stages=None):
    """Triton ``CompilerParams``: 4 warps for small tiles/head dims, 8 for large; fewer pipeline
    stages for wide heads (shared memory per stage grows with the head dim)."""
    width = max(D_pad, Dv_pad)
    if num_warps is None:
        num_warps = 4 if (width <= 64 or block_q * block_kv <= 64 * 64) else 8
    if num_stages is None:
        num_stages = 3 if width <= 128 else 2
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot(a, b, *, contract_a: int = 1, contract_b: int = 1):
    """2-D matmul with float32 accumulation; contracting axes picked so no explicit transpose."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           preferred_element_type=jnp.float32, precision=precision)


def switch_on_code(code, carry, partial_fn, full_fn):
    """By tile code: EMPTY leaves ``carry`` unchanged; PARTIAL runs ``partial_fn`` (with the element
    mask); FULL runs ``full_fn`` (without)."""
    return lax.cond(code == EMPTY, lambda c: c,
                    lambda c: lax.cond(code == FULL, full_fn, partial_fn, c), carry)


def full_spec(x):
    """The whole (small) array in every program: schedules, lists, sinks, slopes."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


__all__ = ["MAX_BLOCK", "compiler_params", "dot", "switch_on_code", "full_spec"]
