"""The ``linear`` registry entry: normalized linear attention with φ = elu + 1 (Katharopoulos et al.
2020, "Transformers are RNNs", eq. 6). The math and paths are in ``linear_attention``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Union

from attnjax import registry
from attnjax.linear.feature_maps import FeatureMap
from attnjax.linear.mechanism import LinearMechanism


@registry.register
@dataclasses.dataclass(frozen=True)
class LinearAttention(LinearMechanism):
    """Normalized linear attention with φ = elu + 1."""

    feature_map: Union[str, FeatureMap] = "elu+1"
    normalize: bool = True

    name: ClassVar[str] = "linear"
    paper: ClassVar[str] = "Katharopoulos et al. 2020, Transformers are RNNs"
