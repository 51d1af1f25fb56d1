"""Inference-time mechanisms over the modules of ``attnjax.nn``: caches (paged, sink + window), cache compression
(SnapKV), attention calibration (ACT, VAR) and head steering (VHD/VHR)."""

from attnjax.inference.snapkv import (SnapKVCache, snapkv_compress, snapkv_decode, snapkv_prefill, snapkv_scores,
                                       snapkv_select)
from attnjax.inference.paged_cache import PagedKVCache, append, free, init_paged_cache, paged_decode, prefill
from attnjax.inference.streaming import StreamingCache, init_streaming_cache, streaming_decode, streaming_reference
from attnjax.inference.calibration import (ACT, act_attention_reference, act_attention_xla, act_layers, act_sinks,
                                           mean_received_attention, search_act_heads)
from attnjax.inference.visual_sinks import (VAR, VisualTokens, sink_dimension_values, sink_tokens,
                                            var_attention_reference, var_attention_xla)
from attnjax.inference.head_steering import (head_divergence, head_outputs, reinforce_heads, select_heads,
                                             token_divergence)
from attnjax.inference.infiniretri import (infiniretri_layer_scorer, infiniretri_read, infiniretri_scores,
                                            infiniretri_select)
from attnjax.inference.generate import generate, generate_by_recomputing, sample_token
from attnjax.inference.landmark_retrieval import (landmark_retrieval_attention, landmark_scores, retrieval_mask,
                                                  retrieve_blocks)

__all__ = [
    "SnapKVCache", "snapkv_compress", "snapkv_decode", "snapkv_prefill", "snapkv_scores", "snapkv_select",
    "PagedKVCache", "init_paged_cache", "prefill", "paged_decode", "append", "free",
    "StreamingCache", "init_streaming_cache", "streaming_decode", "streaming_reference",
    "ACT", "act_attention_reference", "act_attention_xla", "act_layers", "act_sinks", "mean_received_attention",
    "search_act_heads", "VAR", "VisualTokens", "sink_dimension_values", "sink_tokens", "var_attention_reference",
    "var_attention_xla", "head_divergence", "head_outputs", "reinforce_heads", "select_heads", "token_divergence",
    "infiniretri_scores", "infiniretri_select", "infiniretri_read", "infiniretri_layer_scorer",
    "generate", "generate_by_recomputing", "sample_token",
    "landmark_scores", "retrieve_blocks", "retrieval_mask", "landmark_retrieval_attention",
]
