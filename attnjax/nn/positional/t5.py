"""T5's relative position bias table as a module: it owns the table and hands out the ``T5Bias`` rule."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional.t5 import T5Bias, t5_relative_buckets


class T5RelativeBias(nnx.Module):
    """A learned ``[num_buckets, num_heads]`` table of T5 relative position biases (Raffel et al. 2020, §2.1).

    ``module()`` returns the ``attnjax.positional.T5Bias`` rule over that table, for
    ``attnjax.attention(..., bias=module())`` or ``MultiHeadAttention(position_bias=...)``; the rule is
    evaluated per tile, and ``jax.grad`` reaches the table through every blocked path and kernel.

    As ``MultiHeadAttention(position_bias=functools.partial(T5RelativeBias, bidirectional=False))`` each
    layer builds its own table. T5 shares one table across the layers of a stack: assign one module to
    every layer (``layer.position_bias = shared``); NNX keeps the reference shared.

    Args:
      num_heads: query heads ``H``.
      bidirectional: encoder (True) or causal decoder (False) bucketing.
      num_buckets: 32 in T5.
      max_distance: 128 in T5.
      stddev: the table's normal init; HuggingFace's T5 uses ``d_model^-0.5``, the paper gives none.
    """

    def __init__(self, num_heads: int, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128,
                 stddev: float = 0.02, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(num_heads=num_heads)
        t5_relative_buckets(jnp.zeros((), jnp.int32), bidirectional=bidirectional, num_buckets=num_buckets,
                            max_distance=max_distance)  # raises ValueError for a bad bucketing
        self.bidirectional, self.max_distance = bidirectional, max_distance
        init = nnx.initializers.normal(stddev)
        self.table = nnx.Param(init(rngs.params(), (num_buckets, num_heads), param_dtype))

    def __call__(self, query_offset: Optional[jax.Array] = None) -> T5Bias:
        """The rule over this table; ``query_offset`` places a decode step (see ``T5Bias``)."""
        return T5Bias(self.table[...], bidirectional=self.bidirectional, max_distance=self.max_distance,
                      query_offset=query_offset)



register_module(ModuleSpec("t5_relative_bias", T5RelativeBias, dict(num_heads=2, num_buckets=8, max_distance=16),
                           lambda key: (), kind="other", paper="Raffel et al. 2020 (T5), §2.1"))
register_module(ModuleSpec(
    "t5_mha", MultiHeadAttention,
    dict(d_model=16, num_heads=4, num_kv_heads=2,
         position_bias=functools.partial(T5RelativeBias, bidirectional=False, num_buckets=8, max_distance=16)),
    (2, 9, 16), kind="layer", paper="Raffel et al. 2020 (T5), §2.1: learned relative position biases",
    causal=True, decodes=True))
