"""Pallas kernels for attnjax's blocked hot paths: flash attention (``flash``), Lightning
(``lightning``), block-sparse (``block_sparse``) and stick-breaking (``stick_breaking``). Each
kernel lives in its own subpackage with a custom VJP and names its reference in attnjax; the
scaffolding they share is public in ``common``. Importable on its own: nothing here depends on Flax.
"""
