"""Positional schemes that are not additive logit biases, as mechanisms on ``[B, T, heads, D]`` arrays.

Post-softmax position weights (``urpe``), gated positional attention (``gpsa``), structured decay masks along
scan paths (``polyline``) and complex-valued rotations (``complexformer``) each change more than the logits, so
each has its own reference and fast path here; the additive rules (ALiBi, T5, relative embeddings, 2-D tables)
are ``attnjax.bias.Bias`` values in ``attnjax.positional``. Modules that own the parameters are in
``attnjax.nn``.
"""

from attnjax.relative import complexformer, gpsa, polyline, urpe

__all__ = ["complexformer", "gpsa", "polyline", "urpe"]
