"""attnjax: attention mechanisms for JAX, with a reference beside every fast path.

    import attnjax as aj
    out = aj.attention(q, k, v, mechanism="softmax", mask=aj.masks.Causal())

``attnjax.nn`` (the Flax NNX modules), ``attnjax.analysis`` (statistics of attention maps, which
capture whole models) and ``attnjax.inference`` (caches, cache compression, calibration) are imported on
first access, so the functional core and ``pallas_kernels`` import without Flax.
"""

import importlib

from attnjax import softmax  # noqa: I001 - registers first: the baseline heads every table
from attnjax import heads, linear, local, masks, memory, parallel, positional, registry, relative, sparse, vision
from attnjax.api import attention
from attnjax.bias import ArrayBias, Bias

__all__ = ["analysis", "attention", "heads", "inference", "linear", "local", "masks", "memory", "nn", "parallel",
           "positional", "registry", "relative", "softmax", "sparse", "vision", "Bias", "ArrayBias"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``attnjax.nn``, ``attnjax.analysis`` and ``attnjax.inference`` on first access (PEP 562): Flax is needed by the
    modules only."""
    if name in ("nn", "analysis", "inference"):
        return importlib.import_module(f"attnjax.{name}")
    raise AttributeError(f"module 'attnjax' has no attribute {name!r}")
