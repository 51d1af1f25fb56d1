"""Testing utilities: numerical comparison helpers and the registry conformance checks.

The top floor of the library (it may import every family and the modules); attnjax's test suite
and ``experiments/`` use it, and so can a user testing a model or a new mechanism built on attnjax.
"""

from attnjax.testing import conformance, modules
from attnjax.testing.numerics import TOLERANCE, assert_close, assert_grads_close, grads, numpy_rng, random_qkv

__all__ = ["conformance", "modules", "TOLERANCE", "assert_close", "assert_grads_close", "grads", "numpy_rng", "random_qkv"]
