"""Memory modules' functional cores on ``[B, T, heads, D]`` arrays: test-time-trained neural memories (Titans,
Miras) and chunked recurrent hybrids (RAT). Modules that own the projections and gates are in
``attnjax.nn.memory``.
"""

__all__: list = []
