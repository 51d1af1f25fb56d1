"""Local attention on token grids: neighbourhood attention (NA, dilated, causal, GNA strides) in 1-D/2-D/3-D."""

from attnjax.local.neighborhood import (DEFAULT_TILE_SHAPES, Neighborhood, NeighborhoodMask,
                                        neighborhood_attention, neighborhood_attention_reference)

__all__ = ["DEFAULT_TILE_SHAPES", "Neighborhood", "NeighborhoodMask", "neighborhood_attention",
           "neighborhood_attention_reference"]
