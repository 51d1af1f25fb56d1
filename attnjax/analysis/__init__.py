"""Analysis tools for attention maps at any length: statistics computed blockwise from q and k.

Every per-query or per-key statistic is computed one query tile at a time (``blockwise``), with the
scale, bias, soft cap, masks and GQA layout of ``attnjax.attention``, so it runs at 32k-128k tokens
without a ``[T, S]`` map; the ``*_of_map`` forms take dense maps (small inputs, other libraries' models).
"""

from attnjax.analysis import (blockwise, entropy, sinks, anchors, distance, heads, similarity, rank, rollout,
                              regularizers, distillation, capture, plots)
from attnjax.analysis.entropy import attention_entropy, entropy_of_map
from attnjax.analysis.sinks import attention_received, detect_sinks, sink_metric, sink_scores, sink_scores_of_map
from attnjax.analysis.distance import (future_attention_influence, future_attention_influence_of_map, head_span,
                                       split_heads_by_span, windowed_attention_distance,
                                       windowed_attention_distance_of_map)
from attnjax.analysis.anchors import (receiver_head_kurtosis, receiver_head_scores, receiver_heads,
                                      segment_ids_from_spans, sentence_attention, sentence_attention_of_map,
                                      vertical_scores)
from attnjax.analysis.heads import (attention_argmax, attention_influence, copy_paste_events, head_ablation_loss_change,
                                    head_importance, retrieval_scores, uniform_head_masking)
from attnjax.analysis.similarity import attention_similarity, attention_similarity_of_maps
from attnjax.analysis.rank import (arank, arank_of_maps, hyperattention_alpha, hyperattention_alpha_of_map,
                                   hyperattention_kappa, kv_state, kv_state_rank, numerical_rank, squared_column_norms,
                                   stable_rank, stable_rank_of_map)
from attnjax.analysis.rollout import attention_rollout
from attnjax.analysis.regularizers import (attention_entropy_regularizer, entropic_overload, entropy_guided_penalty,
                                          entropy_guided_regularizer, entropy_profile, entropy_profile_of_maps,
                                          mean_head_entropy, mean_head_entropy_of_map, row_entropies)
from attnjax.analysis.distillation import (HasteSchedule, attention_cross_entropy, attention_cross_entropy_of_maps,
                                          attention_kl, attention_kl_of_maps, feature_alignment_loss,
                                          haste_attention_loss, haste_gradient_trigger, minilm_attention_loss,
                                          minilm_loss, minilm_loss_of_maps, minilm_value_relation_loss,
                                          value_relation_map)
from attnjax.analysis.capture import AttentionInputs, apply_to_layers, attention_maps, capture_attention
from attnjax.analysis.plots import plot_attention_map, plot_head_heatmap, plot_rollout_on_image

__all__ = [
    "blockwise", "entropy", "sinks", "anchors", "distance", "heads", "similarity", "rank", "rollout",
    "regularizers", "distillation", "attention_entropy", "entropy_of_map", "attention_received", "detect_sinks",
    "sink_metric", "sink_scores", "sink_scores_of_map", "future_attention_influence",
    "future_attention_influence_of_map", "head_span", "split_heads_by_span", "windowed_attention_distance",
    "windowed_attention_distance_of_map", "receiver_head_kurtosis", "receiver_head_scores", "receiver_heads",
    "segment_ids_from_spans", "sentence_attention", "sentence_attention_of_map", "vertical_scores",
    "attention_argmax", "attention_influence", "copy_paste_events", "head_ablation_loss_change",
    "head_importance", "retrieval_scores", "uniform_head_masking", "attention_similarity",
    "attention_similarity_of_maps", "arank", "arank_of_maps", "hyperattention_alpha", "hyperattention_alpha_of_map",
    "hyperattention_kappa", "kv_state", "kv_state_rank",
    "numerical_rank", "squared_column_norms", "stable_rank", "stable_rank_of_map", "attention_rollout",
    "attention_entropy_regularizer", "entropic_overload", "entropy_guided_penalty",
    "entropy_guided_regularizer", "entropy_profile", "entropy_profile_of_maps", "mean_head_entropy",
    "mean_head_entropy_of_map", "row_entropies", "HasteSchedule", "attention_cross_entropy",
    "attention_cross_entropy_of_maps", "attention_kl", "attention_kl_of_maps", "feature_alignment_loss",
    "haste_attention_loss", "haste_gradient_trigger", "minilm_attention_loss", "minilm_loss", "minilm_loss_of_maps",
    "minilm_value_relation_loss", "value_relation_map",
]
