"""Exact softmax attention and its alternatives (one file per mechanism)."""

from attnjax.blocked.flash_xla import flash_attention_xla, flash_attention_xla_backward
from attnjax.softmax.softmax import Softmax, softmax_attention_reference  # noqa: I001 - registers first

from attnjax.blocked import weights
from attnjax.softmax.aaren import (AarenState, aaren_combine, aaren_init_state, aaren_recurrent,
                                   aaren_reference, aaren_scan, aaren_step)
from attnjax.softmax.paged import (paged_attention, paged_attention_pallas, paged_attention_reference,
                                   paged_attention_xla)
from attnjax.softmax.reversed import (Reversed, TransposedMask, dependency_mask, dependency_parents,
                                      reversed_attention_reference, reversed_attention_weights,
                                      reversed_attention_xla, tree_parents)
from attnjax.softmax.selective import Selective, selective_attention, selective_temperature
from attnjax.softmax.sigmoid import (Sigmoid, sigmoid_attention_pallas, sigmoid_attention_reference,
                                     sigmoid_attention_xla)
from attnjax.softmax.simplicial import Simplicial, simplicial_attention_reference, simplicial_attention_windowed
from attnjax.softmax.softplus import (Softplus, softplus_attention_pallas, softplus_attention_reference,
                                      softplus_attention_xla)
from attnjax.softmax.stick_breaking import (StickBreaking, stick_breaking_attention_reference,
                                            stick_breaking_attention_xla, stick_breaking_weights)

__all__ = [
    "Softmax", "softmax_attention_reference", "flash_attention_xla", "flash_attention_xla_backward", "weights",
    "AarenState", "aaren_combine", "aaren_init_state", "aaren_recurrent", "aaren_reference", "aaren_scan",
    "aaren_step",
    "paged_attention", "paged_attention_reference", "paged_attention_xla", "paged_attention_pallas",
    "Reversed", "TransposedMask", "dependency_mask", "dependency_parents", "reversed_attention_reference",
    "reversed_attention_weights", "reversed_attention_xla", "tree_parents",
    "Selective", "selective_attention", "selective_temperature",
    "Sigmoid", "sigmoid_attention_reference", "sigmoid_attention_xla", "sigmoid_attention_pallas",
    "Softplus", "softplus_attention_reference", "softplus_attention_xla", "softplus_attention_pallas",
    "Simplicial", "simplicial_attention_reference", "simplicial_attention_windowed",
    "StickBreaking", "stick_breaking_attention_reference", "stick_breaking_attention_xla", "stick_breaking_weights",
]
