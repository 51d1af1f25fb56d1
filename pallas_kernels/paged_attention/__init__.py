"""Pallas paged decode attention (PagedAttention, Kwon et al. 2023) over a shared page pool.

- ``ops.paged_attention_pallas``: the dispatch (GPU Triton kernel with split-K, TPU Mosaic kernel
  with scalar-prefetched page tables, CPU interpret).
- ``gpu``: the Triton kernel (index loads of whole pages); ``tpu``: the Mosaic kernel (the
  pipeline DMAs pages chosen by the prefetched page table).
- ``common``: the layout contract (``check_paged``) and the block math (online-softmax update,
  split-K merge) shared with the XLA path ``attnjax.softmax.paged_attention_xla``.

Reference in attnjax: ``attnjax.softmax.paged_attention_reference``.
"""

from pallas_kernels.paged_attention.common import PagedDims, check_paged
from pallas_kernels.paged_attention.ops import paged_attention_pallas

__all__ = ["paged_attention_pallas", "check_paged", "PagedDims"]
