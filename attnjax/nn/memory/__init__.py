"""Memory modules: Titans (MAC, MAG, MAL) and Miras memory layers, RAT, and the PMI working/long-term memory."""

from attnjax.nn.memory.pmi import PMIMemory
from attnjax.nn.memory.rat import RAT
from attnjax.nn.memory.titans import (MEMORIES, MemoryConfig, MemoryGates, NeuralMemoryCache, NeuralMemoryLayer,
                                      TitansMAC, TitansMACCache, TitansMAG, TitansMAL, TitansWindowCache,
                                      prepend_persistent)

__all__: list = ["PMIMemory", "RAT"]
__all__ += ["MEMORIES", "MemoryConfig", "MemoryGates", "NeuralMemoryCache", "NeuralMemoryLayer", "prepend_persistent",
            "TitansMAC", "TitansMACCache", "TitansMAG", "TitansMAL", "TitansWindowCache"]
