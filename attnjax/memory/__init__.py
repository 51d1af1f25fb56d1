"""Memory modules' functional cores on ``[B, T, heads, D]`` arrays: test-time-trained neural memories (Titans,
Miras) and chunked recurrent hybrids (RAT). Modules that own the projections and gates are in
``attnjax.nn.memory``.
"""

from attnjax.memory.pmi import (PMIState, competitive_attention, competitive_weights, integrate,
                                long_term_association, long_term_summary, working_memory_gate)
from attnjax.memory.rat import RATCache, rat, rat_init_cache, rat_recurrence, rat_reference, rat_step
from attnjax.memory.neural_memory import (NeuralMemoryState, neural_memory, neural_memory_init_state,
                                          neural_memory_reference, neural_memory_step)
from attnjax.memory.deep_memory import (DeepMemoryState, MemoryMLP, deep_memory, deep_memory_init_state,
                                        deep_memory_read, deep_memory_reference, deep_memory_step, init_memory_mlp)
from attnjax.memory.miras import (HuberBias, KLRetention, L2Bias, L2Retention, LpBias, LqRetention, MIRAS_VARIANTS,
                                  as_objective, as_retention, miras_variant)

__all__: list = ["NeuralMemoryState", "neural_memory", "neural_memory_init_state",
                 "neural_memory_reference", "neural_memory_step",
                 "DeepMemoryState", "MemoryMLP", "deep_memory", "deep_memory_init_state", "deep_memory_read",
                 "deep_memory_reference", "deep_memory_step", "init_memory_mlp",
                 "HuberBias", "KLRetention", "L2Bias", "L2Retention", "LpBias", "LqRetention", "MIRAS_VARIANTS",
                 "as_objective", "as_retention", "miras_variant",
                 "PMIState", "competitive_attention", "competitive_weights", "integrate", "long_term_association",
                 "long_term_summary", "working_memory_gate",
                 "RATCache", "rat", "rat_init_cache", "rat_recurrence", "rat_reference", "rat_step"]
