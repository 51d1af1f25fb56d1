"""Vision attention: the functional cores of attention modules for conv nets and vision transformers.

Pure functions on NHWC feature maps ``[B, H, W, C]`` (the layout of ``flax.nnx.Conv``) with their
parameters passed in; the modules that own the parameters are in ``attnjax.nn.conv``. ``window``
partitions maps into (padded) windows and runs ``attnjax.attention`` in each.
"""

from attnjax.vision import (aggregated_attention, conditioned, criss_cross, dual_attention, efficient_local,
                            focal_modulation, halo, crossvit, dcal, fit, rollout, kmeans_attention, probing, mil,
                            large_kernel, metamixer, partial_attention, polarized, pooling_mixer, squeeze_excite,
                            condaformer, dsvt, region, crossformer, strip, window)

__all__ = ["aggregated_attention", "conditioned", "dual_attention", "efficient_local", "focal_modulation",
           "large_kernel", "metamixer", "partial_attention", "polarized", "pooling_mixer", "squeeze_excite", "window"]
