"""Pallas kernels for attnjax's blocked hot paths: flash attention (``flash``), Lightning
(``lightning``), block-sparse (``block_sparse``) and stick-breaking (``stick_breaking``). Each
kernel lives in its own subpackage with a custom VJP and names its reference in attnjax; the
scaffolding they share is public in ``common``. Importable on its own: nothing here depends on Flax.
"""


# The kernels build on attnjax's primitives and blocked engine. Importing one of those runs
# attnjax/__init__, which loads the families that import these kernels at their top, so the kernels
# load whole (not half way through a kernel package imported first) whichever package comes first.
import attnjax.masks  # noqa: F401, E402
