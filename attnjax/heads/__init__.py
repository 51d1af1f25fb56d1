"""Multi-head variants: the functional cores of head routing, head sharing and graph readings of attention.

Pure functions on ``[B, T, heads, D]`` arrays with their parameters passed in; the modules that own the
parameters are in ``attnjax.nn``. ``moh`` (mixture-of-head routing), ``echo`` (reusing an earlier layer's
attention map), ``low_rank`` (LAMA's low-rank head pooling), ``bam`` (mixtures of attention experts),
``union_of_experts`` (selective multi-head attention), ``graph_routing`` (MoE routers mixed over a graph of
tokens) and ``gin`` (the attention matrix as a GIN adjacency).
"""

from attnjax.heads import bam, echo, gin, graph_routing, low_rank, moh, union_of_experts

__all__ = ["bam", "echo", "gin", "graph_routing", "low_rank", "moh", "union_of_experts"]
