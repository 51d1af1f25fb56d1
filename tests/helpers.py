"""Shared test helpers for this suite; they live in ``attnjax.testing`` so that the conformance
checks and ``experiments/`` use the same ones."""

from attnjax.testing.numerics import (TOLERANCE, assert_close, assert_grads_close, assert_outputs_and_grads_close, grads,
                                      numpy_rng, outputs_and_grads, random_qkv)

__all__ = ["TOLERANCE", "assert_close", "assert_grads_close", "assert_outputs_and_grads_close", "grads", "numpy_rng",
           "outputs_and_grads", "random_qkv"]
