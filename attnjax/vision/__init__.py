"""Vision attention: the functional cores of attention modules for conv nets and vision transformers.

Pure functions with their parameters passed in: on NHWC feature maps ``[B, H, W, C]`` (the layout of
``flax.nnx.Conv``), image-like q/k/v ``[B, H, W, heads, D]`` (``[B, F, H, W, heads, D]`` for voxels), or token
sets ``[B, N, heads, D]``. Each op has a dense reference beside its fast path (window reshapes, gathers, the
block-sparse engine, or ``attnjax.attention`` on folded groups), which never forms an ``[HW, HW]`` array. The
modules that own the parameters are in ``attnjax.nn.conv`` (attention for conv nets) and ``attnjax.nn.vision``
(vision transformers).
"""

from attnjax.vision import (agent, aggregated_attention, channel_attention, conditioned, condaformer, criss_cross,
                            crossformer, crossvit, dcal, dsvt, dual_attention, efficient_local, fit, focal_modulation,
                            halo, kmeans_attention, l2vit, large_kernel, metamixer, mil, partial_attention, polarized,
                            pooling_mixer, probing, region, rollout, scatterformer, slab, squeeze_excite, strip, window)

__all__ = ["agent", "aggregated_attention", "channel_attention", "conditioned", "condaformer", "criss_cross",
           "crossformer", "crossvit", "dcal", "dsvt", "dual_attention", "efficient_local", "fit", "focal_modulation",
           "halo", "kmeans_attention", "l2vit", "large_kernel", "metamixer", "mil", "partial_attention", "polarized",
           "pooling_mixer", "probing", "region", "rollout", "scatterformer", "slab", "squeeze_excite", "strip",
           "window"]
