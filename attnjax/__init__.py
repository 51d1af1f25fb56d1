"""attnjax: attention mechanisms for JAX, with a reference beside every fast path.

    import attnjax as aj
    out = aj.attention(q, k, v, mechanism="softmax", mask=aj.masks.Causal())
"""

from attnjax import masks, nn, positional, registry, softmax
from attnjax.api import attention
from attnjax.bias import ArrayBias, Bias

__all__ = ["attention", "masks", "nn", "positional", "registry", "softmax", "Bias", "ArrayBias"]
__version__ = "0.1.0"
