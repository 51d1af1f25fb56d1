"""Memory modules: Titans' neural memory layer and its MAC, MAG and MAL variants (with the Miras memories), RAT,
and the PMI working/long-term memory."""

from attnjax.nn.memory.pmi import PMIMemory
from attnjax.nn.memory.rat import RAT
from attnjax.nn.memory.titans import (MEMORIES, MemoryConfig, MemoryGates, NeuralMemoryCache, NeuralMemoryLayer,
                                      TitansMAC, TitansMACCache, TitansMAG, TitansMAL, TitansWindowCache,
                                      prepend_persistent)

__all__ = ["NeuralMemoryLayer", "NeuralMemoryCache", "MemoryConfig", "MemoryGates", "MEMORIES", "prepend_persistent",
           "TitansMAC", "TitansMACCache", "TitansMAG", "TitansMAL", "TitansWindowCache", "RAT", "PMIMemory"]
