"""Block-sparse attention: one engine driven by block lists, and the selectors that build them."""

from attnjax.blocked.lists import (BlockSparse, allowed_blocks, density, from_block_ids, from_block_mask, to_block_mask,
                                  transpose)
from attnjax.sparse.engine import (BlockSelector, DenseSelectionWarning,  # noqa: I001 - after lists
                                   block_sparse_attention, block_sparse_attention_reference, selected_attention)
from attnjax.sparse.gather import block_sparse_attention_xla
from attnjax.sparse.tokens import (Buckets, KeyLists, TokenSelector, bucket_block_lists, pair_density,
                                   routed_attention, token_sparse_attention, token_sparse_attention_reference)
from attnjax.sparse.static import (Dilated, SparseWindow, StaticSelector, Streaming, dilated_blocks,
                                   sliding_window_blocks, streaming_blocks)
from attnjax.sparse.power import Power, power_blocks
from attnjax.sparse.radial import Radial, radial_blocks
from attnjax.sparse.s2 import S2, s2_blocks
from attnjax.sparse.moa import (MoA, attention_influence, min_loss_assignment, moa_block_mask, moa_profile,
                                moa_spans)
from attnjax.sparse.xattention import (XAttention, antidiagonal_scores, cumulative_threshold_select,
                                       sink_and_diagonal_blocks)
from attnjax.sparse.seer import (Seer, attention_recall, block_max_attention, block_max_attention_reference,
                                 select_threshold, select_topk)
from attnjax.sparse.moba import Moba, Vmoba, vmoba_permutation
from attnjax.sparse.longheads import LongHeads, longheads_decode, longheads_reference
from attnjax.sparse.paro import Paro, choose_permutation, quantized_attention_reference
from attnjax.sparse.combiner import (CombinerAxial, CombinerFixed, CombinerLogsparse, CombinerSupports,
                                     combiner_attention_reference, combiner_attention_xla, combiner_matrix,
                                     combiner_supports)
from attnjax.sparse.core_context import (CoreContext, core_context_access, core_context_attention_reference,
                                         core_context_attention_xla, core_context_matrix, core_tokens)
from attnjax.sparse.biformer import Biformer, biformer_attention, biformer_attention_reference
from attnjax.sparse.dma import biased_token_attention, dynamic_mask_attention, dynamic_mask_bias, dynamic_mask_lists
from attnjax.sparse.sparsifiner import connectivity_lists, connectivity_scores, sparsifiner_attention
from attnjax.sparse.spt import Spt, kmeans_codebooks, lookup_tables, pq_encode, pq_scores_reference, spt_select
from attnjax.sparse.routing import Routing, init_centroids, kmeans_step, routing_attention, routing_buckets
from attnjax.sparse.hyper import Hyper, hyper_attention_xla, sortlsh_buckets
from attnjax.sparse.landmark import (Landmark, insert_landmarks, landmark_attention,
                                    landmark_attention_reference, landmark_attention_xla)

__all__ = [
    "BlockSparse", "allowed_blocks", "density", "from_block_ids", "from_block_mask", "to_block_mask", "transpose",
    "BlockSelector", "DenseSelectionWarning", "block_sparse_attention", "block_sparse_attention_reference",
    "block_sparse_attention_xla",
    "selected_attention",
    "Buckets", "KeyLists", "TokenSelector", "bucket_block_lists", "pair_density", "routed_attention",
    "token_sparse_attention", "token_sparse_attention_reference",
    "StaticSelector", "SparseWindow", "Dilated", "Streaming", "Power", "Radial", "S2",
    "sliding_window_blocks", "dilated_blocks", "streaming_blocks", "power_blocks", "radial_blocks", "s2_blocks",
    "MoA", "attention_influence", "min_loss_assignment", "moa_block_mask", "moa_profile", "moa_spans",
    "XAttention", "antidiagonal_scores", "cumulative_threshold_select", "sink_and_diagonal_blocks",
    "Seer", "attention_recall", "block_max_attention", "block_max_attention_reference", "select_threshold",
    "select_topk",
    "Moba", "Vmoba", "vmoba_permutation",
    "Paro", "choose_permutation", "quantized_attention_reference",
    "CombinerFixed", "CombinerLogsparse", "CombinerAxial", "CombinerSupports", "combiner_attention_reference",
    "combiner_attention_xla", "combiner_matrix", "combiner_supports",
    "CoreContext", "core_context_access", "core_context_attention_reference", "core_context_attention_xla",
    "core_context_matrix", "core_tokens",
    "Biformer", "biformer_attention", "biformer_attention_reference",
    "Landmark", "insert_landmarks", "landmark_attention", "landmark_attention_reference", "landmark_attention_xla",
]
