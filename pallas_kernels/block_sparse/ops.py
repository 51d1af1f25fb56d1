"""Thin dispatch for the Pallas block-sparse kernels: the GPU (Triton) or TPU (Mosaic) kernel by
backend; on CPU the GPU kernel runs in interpret mode (correct, slow).

Reference: ``attnjax.sparse.block_sparse_attention_reference`` (tests/kernels/test_block_sparse.py).
"""

from __future__ import annotations

from typing import Optional

import jax

from attnjax.masks import Mask
from attnjax.blocked.lists import BlockSparse
from pallas_kernels.block_sparse import gpu, tpu
from pallas_kernels.common.interpret import default_interpret


def block_sparse_attention_pallas(
    q: jax.Array, k: jax.Array, v: jax.Array, blocks: BlockSparse, *, mask: Optional[Mask] = None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, return_lse: bool = False,
    interpret: Optional[bool] = None, backend: Optional[str] = None,
):
    """Softmax attention restricted to the listed key blocks, as a Pallas kernel with a custom VJP.

    ``out_i = Σ_j softmax_j(s_ij | j ∈ blocks(i), mask(i, j)) v_j`` with
    ``s_ij = cap·tanh(scale·q_i·k_j / cap)`` (cap optional), computed FlashAttention-2 style
    (Dao 2023) over the listed tiles only; same results as
    ``attnjax.sparse.block_sparse_attention_reference``.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (``Hq % Hkv == 0``).
      blocks: ``attnjax.sparse.BlockSparse`` lists, static (NumPy) or dynamic (jax, inside jit).
      mask: optional fine mask applied inside the listed tiles: Full, Causal, SlidingWindow,
        ChunkedCausal, Segments, Explicit and their ``&``/``|``, AND-ed with any structural mask
        (a registered mask pytree with no array leaves whose ``tile`` is index arithmetic, e.g. a
        neighborhood mask). Anything else raises NotImplementedError.
      scale: logit scale, default ``1/sqrt(D)``; logits_soft_cap: ``cap`` in ``cap·tanh(s/cap)``.
      return_lse: also return the float32 log-sum-exp ``[B, T, Hq]`` (``-inf`` on empty rows;
        differentiable).
      interpret: force Pallas interpret mode (default: only on CPU).
      backend: "gpu", "tpu" or "cpu"; None = ``jax.default_backend()`` ("cpu" runs the GPU kernel
        in interpret mode).
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype (0 on rows that see no key), or ``(out, lse)``.
    Raises:
      NotImplementedError for requests the kernels don't serve (fine masks they can't evaluate,
      block sizes the backend can't tile, head dims > 256), so ``implementation="auto"`` falls
      back to the xla path.
    """
    backend = backend or jax.default_backend()
    kwargs = dict(mask=mask, scale=scale, logits_soft_cap=logits_soft_cap, return_lse=return_lse)
    if backend == "tpu":
        return tpu.block_sparse_attention_tpu(q, k, v, blocks, **kwargs, interpret=bool(interpret))
    if backend not in ("gpu", "cpu", "cuda", "rocm"):
        raise NotImplementedError(f"no Pallas block-sparse kernel for backend {backend!r}")
    return gpu.block_sparse_attention_gpu(q, k, v, blocks, **kwargs,
                                          interpret=default_interpret(interpret, backend, "block_sparse"))


__all__ = ["block_sparse_attention_pallas"]
