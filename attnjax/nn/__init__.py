"""Flax NNX modules over the functional core; usable from Linen through ``flax.nnx.bridge``.

Every module is listed in the module registry (``attnjax.nn.registry``) with a tiny example and its
promises (causal, decodes). ``LAYERS`` (token mixers ``[B, T, d] -> [B, T, d]``) and ``BLOCKS``
(residual blocks) are its live name -> class views, so experiments can pick layers by name.
Softmax-family mechanisms are used through ``MultiHeadAttention(mechanism=...)``.
"""

from attnjax.nn import conv, memory, positional, registry, vision
from attnjax.nn.aaren import Aaren
from attnjax.nn.attention import KVCache, MultiHeadAttention, SequenceParallel
from attnjax.nn.based import BasedBlock, BasedCache, BasedLinearAttention, SlidingWindowAttention
from attnjax.nn.registry import BLOCKS, IMAGES, LAYERS, ModuleSpec, modules, register_module
from attnjax.nn.seer_gate import AttnGate, distillation_step, gate_loss
from attnjax.nn.selective import SelectiveAttention
from attnjax.nn.simplicial import SimplicialAttention
from attnjax.nn.transnormer import (LRPE, SGLU, LinearCache, TransNormerAttention, TransNormerBlock, srms_norm,
                                    transnormer_decay)
from attnjax.nn.bam import BAMAttention, upcycle_attention
from attnjax.nn.echo import EchoAttention, EchoAttentionStack, EchoCache
from attnjax.nn.gin import GINAttention, GINCache
from attnjax.nn.graph_moe import GraphMoE, GraphMoEBlock, GraphMoEBlockCache, RouterCache
from attnjax.nn.low_rank import LowRankAttention, LowRankCache
from attnjax.nn.moh import MoHAttention
from attnjax.nn.union_of_experts import SelectiveCache, SelectiveMultiHeadAttention
from attnjax.nn.flowformer import FlowAttention
from attnjax.nn.kernelized_rpe import KernelizedRPEAttention
from attnjax.nn.normalization import ProgressiveRepBatchNorm, RepBatchNorm, set_progress
from attnjax.nn.zoology import (BaseConv, BaseConvBlock, RoutedSparseAttention, SelectiveLookups, ZoologyCache,
                                 ZoologyHybridBlock, ZoologySelectiveBlock)
from attnjax.nn.biformer import BiLevelRoutingAttention
from attnjax.nn.routing import RoutingAttention
from attnjax.nn.sparse_predicted import DynamicMaskAttention, SparsifinerAttention, SparsifinerPredictor, SptAttention
from attnjax.nn.pointer import PointerAttention, pointer_log_probs, pointer_scores, pointer_scores_reference

__all__ = [
    "MultiHeadAttention", "KVCache", "SequenceParallel", "SelectiveAttention", "SimplicialAttention", "Aaren",
    "AttnGate", "distillation_step", "gate_loss", "LinearCache", "TransNormerAttention", "TransNormerBlock", "LRPE",
    "SGLU", "srms_norm", "transnormer_decay", "BasedLinearAttention", "SlidingWindowAttention", "BasedBlock",
    "BasedCache", "registry", "ModuleSpec", "modules", "register_module", "LAYERS", "BLOCKS", "IMAGES", "conv", "vision",
    "BAMAttention", "upcycle_attention", "EchoAttention", "EchoAttentionStack", "EchoCache", "GINAttention",
    "GINCache", "GraphMoE", "GraphMoEBlock", "GraphMoEBlockCache", "RouterCache", "LowRankAttention", "LowRankCache",
    "MoHAttention", "SelectiveCache", "SelectiveMultiHeadAttention", "positional", "memory", "FlowAttention",
    "KernelizedRPEAttention", "ProgressiveRepBatchNorm", "RepBatchNorm", "set_progress",
    "BiLevelRoutingAttention",
    "PointerAttention", "pointer_log_probs", "pointer_scores", "pointer_scores_reference",
]
