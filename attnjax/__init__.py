"""attnjax: attention mechanisms for JAX, with a reference beside every fast path.

    import attnjax as aj
    out = aj.attention(q, k, v, mechanism="softmax", mask=aj.masks.Causal())
"""

from attnjax import softmax  # noqa: I001 - registers first: the baseline heads every table
from attnjax import linear, local, masks, nn, parallel, positional, registry, sparse
from attnjax.api import attention
from attnjax.bias import ArrayBias, Bias

__all__ = ["attention", "linear", "local", "masks", "nn", "parallel", "positional", "registry", "softmax", "sparse",
           "Bias", "ArrayBias"]
__version__ = "0.1.0"
