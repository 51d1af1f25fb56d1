"""Thin dispatch for the Pallas paged decode attention kernels: the GPU (Triton) or TPU (Mosaic)
kernel by backend; on CPU the GPU kernel runs in interpret mode (correct, slow).

Reference: ``attnjax.softmax.paged_attention_reference`` (tests/kernels/test_paged_attention.py).
"""

from __future__ import annotations

import math
from typing import Optional

import jax

from pallas_kernels.common.interpret import default_interpret
from pallas_kernels.common.refusals import refuse_unserved
from pallas_kernels.paged_attention import common, gpu, tpu


def paged_attention_pallas(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array, lengths: jax.Array, *,
    scale: Optional[float] = None, pages_per_block: Optional[int] = None, num_splits: Optional[int] = None,
    backend: Optional[str] = None, interpret: Optional[bool] = None,
) -> jax.Array:
    """Softmax attention of each sequence's last ``Tq`` queries over its paged K/V, as a Pallas kernel.

    ``out[b, t, h] = Σ_{j < L_b − Tq + 1 + t} softmax_j(scale · q[b, t, h] · k_j) v_j`` where ``k_j`` is slot
    ``j % page_size`` of page ``page_table[b, j // page_size]`` (PagedAttention, Kwon et al. 2023, §4.1;
    ``L_b = lengths[b]``). Layout and alignment: ``pallas_kernels.paged_attention.common``.

    Args:
      q: ``[B, Hq, D]`` or ``[B, Tq, Hq, D]``; k_pages: ``[P, page_size, Hk, D]``; v_pages:
        ``[P, page_size, Hv, Dv]``; page_table: int ``[B, M]``; lengths: int ``[B]``.
      scale: logit scale, default ``1/sqrt(D)``.
      pages_per_block: pages per compute step (default: about 64 tokens on GPU, 128 on TPU).
      num_splits: GPU split-K count (default: enough programs for a GPU); the TPU kernel takes none.
      backend: "gpu", "tpu" or "cpu"; None = ``jax.default_backend()`` ("cpu" runs the GPU kernel in
        interpret mode).
      interpret: force Pallas interpret mode (default: only on CPU).
    Returns:
      ``[B, Hq, Dv]`` or ``[B, Tq, Hq, Dv]`` (as q) in q's dtype; a query that sees no key gives 0.
    Raises:
      ValueError/TypeError for inputs that break the layout (``common.check_paged``);
      NotImplementedError for requests a kernel doesn't serve (``Hk != Hv``, sizes the backend can't
      tile, head dims > 256), so ``implementation="auto"`` falls back to the xla path. No backward:
      ``attnjax.softmax.paged_attention`` differentiates the "pallas" path through the xla path.
    """
    dims = common.check_paged(q, k_pages, v_pages, page_table, lengths)
    refuse_unserved("paged attention", q, v_pages)
    scale = 1.0 / math.sqrt(dims.D) if scale is None else float(scale)
    backend = backend or jax.default_backend()
    q4 = common.as_tokens(q)
    if backend == "tpu":
        interpret = bool(interpret)
        ppb = tpu.default_pages_per_block(dims.page_size, dims.M) if pages_per_block is None else pages_per_block
        _check_block(ppb, num_splits, splits_allowed=False)
        tpu.refuse(dims, q.dtype, interpret)
        out = tpu.paged_attention_tpu(q4, k_pages, v_pages, page_table, lengths, dims, scale=scale,
                                      pages_per_block=ppb, interpret=interpret)
    elif backend in ("gpu", "cpu", "cuda", "rocm"):
        interpret = default_interpret(interpret, backend, "paged_attention")
        ppb = gpu.default_pages_per_block(dims.page_size, dims.M) if pages_per_block is None else pages_per_block
        _check_block(ppb, num_splits, splits_allowed=True)
        gpu.refuse(dims, ppb, interpret)
        splits = gpu.default_num_splits(dims, ppb) if num_splits is None else num_splits
        out = gpu.paged_attention_gpu(q4, k_pages, v_pages, page_table, lengths, dims, scale=scale,
                                      pages_per_block=ppb, num_splits=splits, interpret=interpret)
    else:
        raise NotImplementedError(f"no Pallas paged attention kernel for backend {backend!r}")
    return out[:, 0] if q.ndim == 3 else out


def _check_block(pages_per_block, num_splits, *, splits_allowed: bool) -> None:
    for name, value in (("pages_per_block", pages_per_block), ("num_splits", num_splits)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_splits is not None and not splits_allowed:
        raise NotImplementedError("the TPU paged attention kernel has no split-K (num_splits); it walks a "
                                  "sequence's pages on a sequential grid axis")


__all__ = ["paged_attention_pallas"]
