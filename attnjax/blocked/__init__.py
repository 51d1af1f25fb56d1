"""The blocked online-softmax engine shared by softmax, sparse, local, ring attention and the kernels.

- ``scores``: logit tiles (scale, bias, soft cap, masks, dropout) in the grouped-query layout.
- ``tiles``: query/key tile layouts and per-tile accumulators of the blocked XLA paths.
- ``weights``: score-to-weight functions (softmax, sigmoid, softplus), the one extension point of
  the blocked paths and the Pallas flash kernels.
- ``flash_xla``: FlashAttention-2 in XLA with a custom VJP (``flash_attention_xla`` and its
  backward for a given output and log-sum-exp).
- ``lists``: ``BlockSparse`` block lists that drive the block-sparse engine and kernels.

No mechanism lives here: the families (``attnjax.softmax``, ``attnjax.sparse``, ...) build on it.
"""

from attnjax.blocked.flash_xla import flash_attention_xla, flash_attention_xla_backward
from attnjax.blocked.lists import BlockSparse

__all__ = ["flash_attention_xla", "flash_attention_xla_backward", "BlockSparse"]
