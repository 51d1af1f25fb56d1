"""Lightning Attention-2 (Qin et al. 2024): causal chunked linear attention with per-head decay,
as Pallas kernels (GPU/Triton and TPU/Mosaic) with a custom VJP. See :mod:`.ops`."""

from pallas_kernels.lightning.ops import lightning_attention_pallas

__all__ = ["lightning_attention_pallas"]
