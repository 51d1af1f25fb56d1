"""Positional schemes that are not additive logit biases, as mechanisms on ``[B, T, heads, D]`` arrays.

Post-softmax position weights, gated positional attention, structured decay masks along scan paths and
complex-valued rotations each change more than the logits, so each has its own reference and fast path
here; the additive rules (ALiBi, T5, relative embeddings, 2-D tables) are ``attnjax.bias.Bias`` values in
``attnjax.positional``. Modules that own the parameters are in ``attnjax.nn``.
"""

from attnjax.relative import polyline

from attnjax.relative import gpsa
from attnjax.relative import urpe
from attnjax.relative import complexformer

__all__: list[str] = []
