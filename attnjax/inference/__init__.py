"""Inference-time mechanisms over the modules of ``attnjax.nn``: caches (contiguous, paged, sink + window), cache
compression (SnapKV), attention calibration (ACT, VAR), retrieval loops and generation."""

from attnjax.inference.snapkv import (SnapKVCache, snapkv_compress, snapkv_decode, snapkv_prefill, snapkv_scores,
                                       snapkv_select)
from attnjax.inference.streaming import StreamingCache, init_streaming_cache, streaming_decode, streaming_reference

__all__ = [
    "SnapKVCache", "snapkv_compress", "snapkv_decode", "snapkv_prefill", "snapkv_scores", "snapkv_select",
    "StreamingCache", "init_streaming_cache", "streaming_decode", "streaming_reference",
]
