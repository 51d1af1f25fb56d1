"""Stick-breaking attention (Tan et al. 2024, "Scaling Stick-Breaking Attention") as Pallas
kernels with a custom VJP.

- ``ops.stick_breaking_attention_pallas``: the dispatch (GPU Triton kernel, TPU Mosaic kernel, CPU
  interpret).
- ``gpu``: Triton-lowering kernels; ``tpu``: Mosaic kernels; ``common``: static config, checks,
  schedule, reverse cumsums.

Reference in attnjax: ``attnjax.softmax.stick_breaking.stick_breaking_attention_reference``.
"""

from pallas_kernels.stick_breaking.ops import stick_breaking_attention_pallas

__all__ = ["stick_breaking_attention_pallas"]
