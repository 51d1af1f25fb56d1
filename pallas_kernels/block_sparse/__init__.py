"""Block-sparse softmax attention as Pallas kernels with a custom VJP, driven by
``attnjax.sparse.BlockSparse`` lists (static NumPy or dynamic jax).

- ``ops.block_sparse_attention_pallas``: the dispatch (GPU Triton kernel, TPU Mosaic kernel, CPU
  interpret).
- ``gpu``: Triton-lowering kernels (lists as index arrays, count-bounded loops); ``tpu``: Mosaic
  kernels (lists by scalar prefetch, one sequential grid step per list slot); ``common``: static
  config, fine-mask split, list transposition.

Reference in attnjax: ``attnjax.sparse.block_sparse_attention_reference``.
"""

from pallas_kernels.block_sparse.ops import block_sparse_attention_pallas

__all__ = ["block_sparse_attention_pallas"]
