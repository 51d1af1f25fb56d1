"""The ``lightning`` registry entry: Lightning Attention-2 (Qin et al. 2024), identity φ with a per-head
decay ``λ_h = exp(−m_h)`` from the ALiBi slopes. The math and paths are in ``linear_attention``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Union

from attnjax import registry
from attnjax.linear.mechanism import LinearMechanism


@registry.register
@dataclasses.dataclass(frozen=True)
class Lightning(LinearMechanism):
    """Lightning Attention-2: identity φ, unnormalized, per-head decay ``exp(-alibi_slope_h)``.

    ``decay`` may also be a tuple of ``Hq`` floats in (0, 1] or None.
    """

    decay: Union[None, str, tuple] = "alibi"

    name: ClassVar[str] = "lightning"
    paper: ClassVar[str] = "Qin et al. 2024, Lightning Attention-2"
