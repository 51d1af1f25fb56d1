"""Memory modules' functional cores on ``[B, T, heads, D]`` arrays: test-time-trained neural memories (Titans,
Miras), chunked recurrent hybrids (RAT) and PMI's working and long-term memory. Modules that own the projections
and gates are in ``attnjax.nn.memory``.
"""

from attnjax.memory.deep_memory import (DeepMemoryState, MemoryMLP, deep_memory, deep_memory_init_state,
                                        deep_memory_read, deep_memory_reference, deep_memory_step, init_memory_mlp)
from attnjax.memory.miras import (MIRAS_VARIANTS, HuberBias, KLRetention, L2Bias, L2Retention, LpBias, LqRetention,
                                  as_objective, as_retention, miras_variant)
from attnjax.memory.neural_memory import (NeuralMemoryState, neural_memory, neural_memory_init_state,
                                          neural_memory_reference, neural_memory_step)
from attnjax.memory.pmi import (PMIState, competitive_attention, competitive_weights, integrate,
                                long_term_association, long_term_summary, working_memory_gate)
from attnjax.memory.rat import RATCache, rat, rat_init_cache, rat_recurrence, rat_reference, rat_step
from attnjax.memory.sequence_parallel import neural_memory_sequence_parallel

__all__ = [
    "NeuralMemoryState", "neural_memory", "neural_memory_init_state", "neural_memory_reference", "neural_memory_step",
    "neural_memory_sequence_parallel",
    "DeepMemoryState", "MemoryMLP", "deep_memory", "deep_memory_init_state", "deep_memory_read",
    "deep_memory_reference", "deep_memory_step", "init_memory_mlp",
    "MIRAS_VARIANTS", "HuberBias", "KLRetention", "L2Bias", "L2Retention", "LpBias", "LqRetention", "as_objective",
    "as_retention", "miras_variant",
    "RATCache", "rat", "rat_init_cache", "rat_recurrence", "rat_reference", "rat_step",
    "PMIState", "competitive_attention", "competitive_weights", "integrate", "long_term_association",
    "long_term_summary", "working_memory_gate",
]
