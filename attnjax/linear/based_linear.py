"""The ``based_linear`` registry entry: BASED's linear part (Arora et al. 2024, "Simple linear attention
language models balance the recall-throughput tradeoff"), the normalized 2nd-order Taylor map.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Union

from attnjax import registry
from attnjax.linear.feature_maps import FeatureMap
from attnjax.linear.mechanism import LinearMechanism


@registry.register
@dataclasses.dataclass(frozen=True)
class BasedLinear(LinearMechanism):
    """BASED's linear part: normalized 2nd-order Taylor map ``[1, x, x⊗x/√2]`` (no sliding window)."""

    feature_map: Union[str, FeatureMap] = "taylor"
    normalize: bool = True

    name: ClassVar[str] = "based_linear"
    paper: ClassVar[str] = "Arora et al. 2024, BASED (Zoology)"
