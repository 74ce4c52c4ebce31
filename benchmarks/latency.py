"""One percentile definition for every benchmark, so their p95 and p99 figures can be compared."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The `q` quantile (0 to 1) as an observed value: numpy's "higher" method, the smallest sample at or above
    the interpolated position (p95 of 1..20 is 20). It gives the same figures as the nearest-rank rule
    `sorted(values)[int(q * n)]` that earlier results were computed with, for q = 0.5, 0.95 and 0.99."""
    if not values:
        raise ValueError("a percentile of no values")
    return float(np.percentile(values, 100 * q, method="higher"))
