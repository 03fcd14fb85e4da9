"""95% bootstrap intervals over test images (scipy's bootstrap, seeded): of a top-1 accuracy, and
of the paired difference between two methods' top-1 on the same images, so that a comparison is
read as holding, not holding, or undecided by the data."""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy.stats import bootstrap

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0


def _interval(values: np.ndarray) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` in percentage points (BCa's
    jackknife would hold an images x images array)."""
    values = np.asarray(values, dtype=np.float64)
    if np.all(values == values[0]):  # every resample gives the same mean
        return 100.0 * values[0], 100.0 * values[0]
    result = bootstrap((values,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile",
                       rng=np.random.default_rng(SEED), batch=100)
    low, high = result.confidence_interval
    return 100.0 * float(low), 100.0 * float(high)


def accuracy_interval(hits: np.ndarray) -> Tuple[float, float]:
    """95% interval of the accuracy (%) whose per-image hits (bool) are ``hits``."""
    return _interval(hits)


def difference_interval(hits: np.ndarray, reference: np.ndarray) -> Tuple[float, float, float]:
    """The top-1 difference (points) of ``hits`` over ``reference``, hits of the same images in
    the same order, and its 95% interval: images are resampled in pairs."""
    d = np.asarray(hits, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return (100.0 * float(d.mean()), *_interval(d))


def verdict(low: float, high: float) -> str:
    """How a difference's interval reads a claim that the difference is positive."""
    return "holds" if low > 0 else "does not hold" if high < 0 else "cannot tell"


def comparison(low: float, high: float) -> str:
    """A paired difference's interval (a row minus its reference) read as the row being better,
    worse, or neither told apart from its reference."""
    return {"holds": "better", "does not hold": "worse"}.get(verdict(low, high), "cannot tell")
