"""Modules for positional schemes: learned tables that become ``Bias`` rules, and layers whose attention
reads positions (relative embeddings, post-softmax position weights, complex rotations)."""

from attnjax.nn.positional.absolute import LearnedPositionEmbedding
from attnjax.nn.positional.complexformer import ComplexMultiHeadAttention
from attnjax.nn.positional.music import RelativeAttention
from attnjax.nn.positional.rcmha import RCMHA, CausalDepthwiseConv, RCMHACache
from attnjax.nn.positional.t5 import T5RelativeBias
from attnjax.nn.positional.urpe import URPEAttention

__all__ = [
    "LearnedPositionEmbedding", "ComplexMultiHeadAttention", "RelativeAttention", "RCMHA", "CausalDepthwiseConv",
    "RCMHACache", "T5RelativeBias", "URPEAttention",
]
