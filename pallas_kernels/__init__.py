"""Pallas kernels for attnjax's blocked hot paths (flash attention, Lightning, block-sparse,
neighborhood). Each kernel lives in its own subpackage with a custom VJP and names its reference
in attnjax. Importable on its own: nothing here depends on Flax.
"""
