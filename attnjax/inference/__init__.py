"""Inference-time mechanisms over the modules of ``attnjax.nn``: caches (contiguous, paged, sink + window), cache
compression (SnapKV), attention calibration (ACT, VAR), retrieval loops and generation."""

from attnjax.inference.snapkv import (SnapKVCache, snapkv_compress, snapkv_decode, snapkv_prefill, snapkv_scores,
                                       snapkv_select)
from attnjax.inference.paged_cache import PagedKVCache, append, free, init_paged_cache, paged_decode, prefill
from attnjax.inference.streaming import StreamingCache, init_streaming_cache, streaming_decode, streaming_reference

__all__ = [
    "SnapKVCache", "snapkv_compress", "snapkv_decode", "snapkv_prefill", "snapkv_scores", "snapkv_select",
    "PagedKVCache", "init_paged_cache", "prefill", "paged_decode", "append", "free",
    "StreamingCache", "init_streaming_cache", "streaming_decode", "streaming_reference",
]
