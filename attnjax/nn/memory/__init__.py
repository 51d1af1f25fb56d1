"""Memory modules: Titans (MAC, MAG, MAL) and Miras memory layers, RAT, and the PMI working/long-term memory."""

from attnjax.nn.memory.pmi import PMIMemory
from attnjax.nn.memory.rat import RAT

__all__: list = ["PMIMemory", "RAT"]
