"""Vision attention: the functional cores of attention modules for conv nets and vision transformers.

Pure functions on NHWC feature maps ``[B, H, W, C]`` (the layout of ``flax.nnx.Conv``) with their
parameters passed in; the modules that own the parameters are in ``attnjax.nn.conv``.
"""

from attnjax.vision import (efficient_local, focal_modulation, large_kernel, polarized, pooling_mixer,
                            squeeze_excite, partial_attention, dual_attention, window, conditioned,
                            metamixer, aggregated_attention)

__all__ = ["squeeze_excite"]
