"""Pallas flash attention (FlashAttention-2, Dao 2023) with a custom VJP.

- ``ops.flash_attention_pallas``: the dispatch (GPU Triton kernel, TPU Mosaic kernel, CPU interpret).
- ``gpu``: the Triton-lowering kernels; ``tpu``: the Mosaic kernels.
- ``common``: backend-independent pieces (the weight-function extension point re-exported from
  ``attnjax.blocked.weights``, the block schedule, the refusals). Mask plans, the static config
  and the flash-family tile math, shared with block-sparse, are in ``pallas_kernels.common``.

Reference in attnjax: ``attnjax.softmax.softmax_attention_reference``.
"""

from pallas_kernels.flash.common import SOFTMAX, SigmoidWeight, SoftmaxWeight, SoftplusWeight, WeightFunction
from pallas_kernels.flash.ops import flash_attention_pallas

__all__ = ["flash_attention_pallas", "WeightFunction", "SoftmaxWeight", "SigmoidWeight", "SoftplusWeight", "SOFTMAX"]
