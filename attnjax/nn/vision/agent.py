"""The agent attention module as a Flax NNX module on NHWC feature maps (core: ``attnjax.vision.agent``).

Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024, sec. 3.3; parameter
names and layouts follow the official code (LeapLabTHU/Agent-Attention, ``AgentAttention`` in
``agent_transformer/models/agent_swin.py``: ``qkv``, ``proj``, ``dwc``, ``an_bias``, ``na_bias``, ``ah_bias``,
``aw_bias``, ``ha_bias``, ``wa_bias``), with the size-1 axes of the official bias shapes dropped.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_image, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.agent import BIAS_TABLE_SIZE, agent_attention, agent_position_bias, agent_tokens
from attnjax.vision.window import Window, window_shape


class AgentAttention(nnx.Module):
    """Agent attention module (Agent Attention, sec. 3.3; official ``AgentAttention``) on an ``H × W`` map::

        Q, K, V = x W_qkv + b_qkv                                   # heads of d = C / heads channels
        A = AdaptiveAvgPool_{p×p}(Q)                                # n = p² agent tokens
        O = softmax(Q Aᵀ/√d + B2) · softmax(A Kᵀ/√d + B1) · V + DWC(V)
        y = O W_proj + b_proj

    ``B1 = Resize(an_bias) + ah_bias + aw_bias`` (agents × keys) and ``B2 = Resize(na_bias)ᵀ + ha_bias +
    wa_bias`` (queries × agents), each a bilinearly resized ``7 × 7`` table per agent plus a row and a column term
    (``attnjax.vision.agent.agent_position_bias``); ``DWC`` is a ``k × k`` depth-wise convolution of the value map
    (all heads), the paper's diversity restoration. Attention is global over the map, aggregation first
    (``agent_attention``): ``O(H·W·n·C)``, linear in the number of pixels.

    The row and column bias terms fix the map size, so the module is built for one ``resolution`` (as the
    official module is, from its ``window_size`` / ``num_patches``).

    Example::

      attn = AgentAttention(64, 2, resolution=(14, 14), rngs=nnx.Rngs(0))
      y = attn(x)                                                  # x, y: [B, 14, 14, 64]

    Parameters: ``3C² + 3C`` (qkv with bias; ``3C²`` without) + ``C² + C`` (proj) + ``k²C + C`` (dwc)
    + ``2·heads·n·49`` (the two tables) + ``2·heads·n·(H + W)`` (row and column terms).

    Args:
      channels: ``C``, the channels of ``x``.
      num_heads: attention heads (the agents are split into heads like the queries).
      resolution: ``(H, W)`` (or ``s`` for a square map) of the inputs.
      agent_num: ``n``, a perfect square ``p²`` (49 in the paper's Agent-PVT/Swin stages 3-4; 9 and 16 in
        stages 1-2).
      kernel_size: the DWC's kernel (3 in the official code; odd).
      qkv_bias: biases in ``qkv`` (True in Agent-Swin and Agent-PVT).
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax's defaults) and the biases (``N(0, 0.02²)``, the official
        truncated normal without the truncation at ±2, which is 100σ away).
    """

    def __init__(self, channels: int, num_heads: int, *, resolution: Window, agent_num: int = 49,
                 kernel_size: int = 3, qkv_bias: bool = True, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.head_dim = resolve_head_dim(channels, num_heads, None)
        check_positive(agent_num=agent_num, kernel_size=kernel_size)
        pool = math.isqrt(agent_num)
        if pool * pool != agent_num:
            raise ValueError(f"agent_num must be a perfect square (the agents pool the queries to p x p), "
                             f"got {agent_num}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep H and W, got {kernel_size}")
        self.resolution = window_shape(resolution, "resolution")
        self.channels, self.num_heads, self.agent_num, self.pool = channels, num_heads, agent_num, pool
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(channels, 3 * channels, use_bias=qkv_bias, **common)
        self.proj = nnx.Linear(channels, channels, **common)
        self.dwc = nnx.Conv(channels, channels, (kernel_size, kernel_size), feature_group_count=channels, **common)
        (H, W), init = self.resolution, jax.nn.initializers.normal(0.02)
        table = (num_heads, agent_num, BIAS_TABLE_SIZE, BIAS_TABLE_SIZE)
        shapes = dict(an_bias=table, na_bias=table, ah_bias=(num_heads, agent_num, H),
                      aw_bias=(num_heads, agent_num, W), ha_bias=(num_heads, H, agent_num),
                      wa_bias=(num_heads, W, agent_num))
        for name, shape in shapes.items():
            setattr(self, name, nnx.Param(init(rngs.params(), shape, param_dtype)))

    def biases(self) -> tuple[jax.Array, jax.Array]:
        """``(B1 [heads, n, H·W], B2 [heads, H·W, n])`` in float32: the agent aggregation's and the agent
        broadcast's biases (official ``position_bias`` and ``agent_bias``)."""
        agent_bias = agent_position_bias(self.an_bias[...], self.ah_bias[...], self.aw_bias[...])
        query_bias = agent_position_bias(self.na_bias[...], jnp.swapaxes(self.ha_bias[...], 1, 2),
                                         jnp.swapaxes(self.wa_bias[...], 1, 2))
        return agent_bias, jnp.swapaxes(query_bias, 1, 2)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]`` with ``(H, W) = resolution``."""
        check_image("x", x, self.channels)
        B, H, W, C = x.shape
        if (H, W) != self.resolution:
            raise ValueError(f"x's height and width must be the resolution {list(self.resolution)} the module was "
                             f"built for, got {[H, W]}")
        heads = (self.num_heads, self.head_dim)
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        agents = agent_tokens(q.reshape(B, H, W, *heads), self.pool)
        agent_bias, query_bias = self.biases()
        o = agent_attention(*(a.reshape(B, H * W, *heads) for a in (q, k, v)), agents, agent_bias=agent_bias,
                            query_bias=query_bias)
        o = o.reshape(B, H, W, C) + self.dwc(v)
        return self.proj(o).astype(x.dtype)


PAPER = "Han et al. 2024 (Agent Attention, ECCV), sec. 3.3; official LeapLabTHU/Agent-Attention"
# Kind "other": its position biases fix the map size, so it is not an image module for any map (IMAGES).
register_module(ModuleSpec("agent_attention", AgentAttention, dict(channels=8, num_heads=2, resolution=(5, 7),
                                                                   agent_num=4),
                           lambda key: (jax.random.normal(key, (2, 5, 7, 8)),), kind="other", paper=PAPER))
