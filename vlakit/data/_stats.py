"""The per-feature statistics LeRobot writes to ``meta/stats.json``, computed one way for
the writer and for a reader whose folder lacks them."""

import numpy as np


def feature_statistics(x: np.ndarray) -> dict[str, list[float]]:
    """``mean``, ``std``, ``min``, ``max``, ``q01``, ``q99`` of ``x`` ``[n, d]`` over its
    rows, each ``[d]``, computed in float64. ``std`` is the population deviation
    (``ddof=0``) and the quantiles interpolate linearly, as LeRobot's ``compute_stats``."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
            "min": x.min(0).tolist(), "max": x.max(0).tolist(),
            "q01": np.quantile(x, 0.01, axis=0).tolist(),
            "q99": np.quantile(x, 0.99, axis=0).tolist()}
