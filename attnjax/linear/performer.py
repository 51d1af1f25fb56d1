"""The ``performer`` registry entry: FAVOR+ positive orthogonal random features (Choromanski et al.
2021, "Rethinking Attention with Performers"), normalized. The map is ``feature_maps.Performer``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Union

from attnjax import registry
from attnjax.linear.feature_maps import FeatureMap, Performer
from attnjax.linear.mechanism import LinearMechanism


@registry.register
@dataclasses.dataclass(frozen=True)
class PerformerAttention(LinearMechanism):
    """Performer: normalized FAVOR+ positive orthogonal random features (fixed seed, see ``Performer``)."""

    feature_map: Union[str, FeatureMap] = Performer()
    normalize: bool = True

    name: ClassVar[str] = "performer"
    paper: ClassVar[str] = "Choromanski et al. 2021, Rethinking Attention with Performers"
