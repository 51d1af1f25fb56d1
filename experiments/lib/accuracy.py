"""How far a path's output is from its reference, and the bound that passes, per input dtype."""

from __future__ import annotations

import numpy as np

TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}
"""Pass bound on ``relative_error`` (max|actual - reference| / max|reference|) per input dtype."""


def relative_error(actual, expected) -> float:
    """``max|actual - expected| / max|expected|`` as a float (non-finite ``actual`` gives ``inf``)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-30))
