"""Exact softmax attention and its alternatives."""

from attnjax.softmax.flash_xla import flash_attention_xla
from attnjax.softmax.softmax import Softmax, softmax_attention_reference

__all__ = ["Softmax", "softmax_attention_reference", "flash_attention_xla"]
