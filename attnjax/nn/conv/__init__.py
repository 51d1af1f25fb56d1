"""Attention modules for convolutional networks, NHWC (``[B, H, W, C]``, as ``flax.nnx.Conv`` takes it).

Each module is registered with kind ``"image"`` (``attnjax.nn.registry.IMAGES``), cites its paper and
equation, owns its parameters, and calls the functional core in ``attnjax.vision`` where it has one.
"""

from attnjax.nn.conv.squeeze_excite import ConcurrentSqueezeExcite, SpatialSqueezeExcite, SqueezeExcite
from attnjax.nn.conv.polarized import PolarizedSelfAttention
from attnjax.nn.conv.efficient_local import EfficientLocalAttention
from attnjax.nn.conv.large_kernel import LargeKernelAttention, VANSpatialAttention
from attnjax.nn.conv.focal_modulation import FocalModulation
from attnjax.nn.conv.metaformer import MetaFormerBlock, PoolingMixer
from attnjax.nn.conv.partial_attention import (PartialChannelAttention, PartialSelfAttention, PartialSpatialAttention,
                                               PATBlock)
from attnjax.nn.conv.dual_attention import DANetChannelAttention, DANetPositionAttention
from attnjax.nn.conv.mbconv import MBConv
from attnjax.nn.conv.moat import MOATBlock
from attnjax.nn.conv.conditioned import DomainConditionedAttention, SentenceAttentionBlock
from attnjax.nn.conv.metamixer import FFNetBlock, FFNetChannelMixer, FFNifiedAttention
from attnjax.nn.conv.transnext import AggregatedAttention, ConvGLU, TransNeXtBlock

__all__ = [
    "ConcurrentSqueezeExcite", "SpatialSqueezeExcite", "SqueezeExcite", "PolarizedSelfAttention",
    "EfficientLocalAttention", "LargeKernelAttention", "VANSpatialAttention", "FocalModulation", "MetaFormerBlock",
    "PoolingMixer", "PartialChannelAttention", "PartialSelfAttention", "PartialSpatialAttention", "PATBlock",
    "DANetChannelAttention", "DANetPositionAttention", "MBConv", "MOATBlock", "DomainConditionedAttention",
    "SentenceAttentionBlock", "FFNetBlock", "FFNetChannelMixer", "FFNifiedAttention", "AggregatedAttention",
    "ConvGLU", "TransNeXtBlock",
]
