"""Memory modules: Titans (MAC, MAG, MAL) and Miras memory layers, RAT, and the PMI working/long-term memory."""

__all__: list = []
