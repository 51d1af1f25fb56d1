"""Vision-transformer attention modules on NHWC feature maps (``[B, H, W, C]``) and token sets.

Each module owns its projections and calls the functional core in ``attnjax.vision``; image modules are
registered with kind ``"image"``, multi-input ones (two branches, pooling queries) with kind ``"other"``.
"""

from attnjax.nn.vision.agent import AgentAttention
from attnjax.nn.vision.condaformer import ConDaFormerBlock, LocalStructureEnhancement
from attnjax.nn.vision.convit import GPSA, ConViTBlock
from attnjax.nn.vision.criss_cross import CrissCrossAttention, RecurrentCrissCrossAttention
from attnjax.nn.vision.crossformer import CrossFormerBlock, CrossScaleEmbedding, DynamicPositionBias
from attnjax.nn.vision.crossvit import CrossViTCrossAttention
from attnjax.nn.vision.davit import ChannelAttention, ConvPosEnc, DaViTBlock, DualAttentionHalf, SpatialWindowAttention
from attnjax.nn.vision.dcal import GlobalLocalCrossAttention, PairwiseCrossAttention
from attnjax.nn.vision.fit import FITBlock, FITCrossAttention, FITLayer
from attnjax.nn.vision.halo import HaloAttention
from attnjax.nn.vision.inline import InLineAttention
from attnjax.nn.vision.kmeans_attention import KMaXMaskHead, KMeansCrossAttention
from attnjax.nn.vision.l2vit import L2ViTBlock, LinearGlobalAttention, LocalConcentration, LocalWindowAttention
from attnjax.nn.vision.maxvit import MaxViTBlock
from attnjax.nn.vision.mil import ACMILPooling, AttentionMILPooling, GatedAttentionLogits
from attnjax.nn.vision.plain_detr import BoxRPBCrossAttention, BoxRPBMLP
from attnjax.nn.vision.polyline import PolylinePathAttention
from attnjax.nn.vision.probing import AttentiveProbe
from attnjax.nn.vision.rala import RALAttention, RAVLTBlock
from attnjax.nn.vision.scatterformer import ScatterFormerLayer
from attnjax.nn.vision.slab import SimplifiedLinearAttention, SLABBlock
from attnjax.nn.vision.strip import StripSelfAttention
from attnjax.nn.vision.swin import SwinBlock, TransformerMLP, WindowAttention

__all__ = [
    "AgentAttention", "ConDaFormerBlock", "LocalStructureEnhancement", "GPSA", "ConViTBlock", "CrissCrossAttention",
    "RecurrentCrissCrossAttention", "CrossFormerBlock", "CrossScaleEmbedding", "DynamicPositionBias",
    "CrossViTCrossAttention", "ChannelAttention", "ConvPosEnc", "DaViTBlock", "DualAttentionHalf",
    "SpatialWindowAttention", "GlobalLocalCrossAttention", "PairwiseCrossAttention", "FITBlock", "FITCrossAttention",
    "FITLayer", "HaloAttention", "InLineAttention", "KMaXMaskHead", "KMeansCrossAttention", "L2ViTBlock",
    "LinearGlobalAttention", "LocalConcentration", "LocalWindowAttention", "MaxViTBlock", "ACMILPooling",
    "AttentionMILPooling", "GatedAttentionLogits", "BoxRPBCrossAttention", "BoxRPBMLP", "PolylinePathAttention",
    "AttentiveProbe", "RALAttention", "RAVLTBlock", "ScatterFormerLayer", "SimplifiedLinearAttention", "SLABBlock",
    "StripSelfAttention", "SwinBlock", "TransformerMLP", "WindowAttention",
]
