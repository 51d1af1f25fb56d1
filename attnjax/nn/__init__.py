"""Flax NNX modules over the functional core; usable from Linen through ``flax.nnx.bridge``.

``LAYERS`` maps names to token mixers (``[B, T, d] -> [B, T, d]`` with ``init_cache``/``decode``)
and ``BLOCKS`` to residual blocks, so experiments can pick layers by name. Softmax-family
mechanisms are used through ``MultiHeadAttention(mechanism=...)``.
"""

from attnjax.nn import aaren, based, transnormer
from attnjax.nn.aaren import Aaren
from attnjax.nn.attention import KVCache, MultiHeadAttention, SequenceParallel
from attnjax.nn.based import BasedBlock, BasedCache, BasedLinearAttention, SlidingWindowAttention
from attnjax.nn.seer_gate import AttnGate, distillation_step, gate_loss
from attnjax.nn.selective import SelectiveAttention
from attnjax.nn.simplicial import SimplicialAttention
from attnjax.nn.transnormer import (LRPE, SGLU, LinearCache, TransNormerAttention, TransNormerBlock, srms_norm,
                                    transnormer_decay)

LAYERS = {**transnormer.LAYERS, **based.LAYERS, **aaren.LAYERS}
BLOCKS = {**transnormer.BLOCKS, **based.BLOCKS}

__all__ = [
    "MultiHeadAttention", "KVCache", "SequenceParallel", "SelectiveAttention", "SimplicialAttention", "Aaren",
    "AttnGate", "distillation_step", "gate_loss", "LinearCache", "TransNormerAttention", "TransNormerBlock", "LRPE", "SGLU",
    "srms_norm", "transnormer_decay", "BasedLinearAttention", "SlidingWindowAttention", "BasedBlock",
    "BasedCache", "LAYERS", "BLOCKS",
]
