"""Linear attention: feature maps, decay (Lightning), states, packed segments; registry entries
"linear", "lightning", "performer" and "based_linear"."""

from attnjax.linear import feature_maps
from attnjax.linear.feature_maps import FEATURE_MAPS, Performer
from attnjax.linear.lightning import BasedLinear, Lightning, LinearAttention, PerformerAttention
from attnjax.linear.linear_attention import (
    NORMALIZER_EPS, linear_attention, linear_attention_step, segment_ids_from_cu_seqlens)

__all__ = [
    "feature_maps", "FEATURE_MAPS", "Performer", "linear_attention", "linear_attention_step",
    "segment_ids_from_cu_seqlens", "NORMALIZER_EPS", "LinearAttention", "Lightning",
    "PerformerAttention", "BasedLinear",
]
