"""Multi-head variants: the functional cores of head routing, head sharing and graph readings of attention.

Pure functions on ``[B, T, heads, D]`` arrays with their parameters passed in; the modules that own the
parameters are in ``attnjax.nn``.
"""

from attnjax.heads import gin, graph_routing
from attnjax.heads import bam, low_rank, union_of_experts
from attnjax.heads import echo, moh
