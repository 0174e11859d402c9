"""Pure functions that score an uncertainty against true errors."""

from __future__ import annotations

import numpy as np
from scipy.special import erfinv
from scipy.stats import rankdata, spearmanr


def spearman(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Spearman rank correlation between two (N,) arrays; NaN if either is constant."""
    predicted, actual = np.asarray(predicted), np.asarray(actual)
    if len(predicted) < 2 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return float("nan")
    return float(spearmanr(predicted, actual).statistic)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC of ``score`` for the boolean labels ``positive`` (Mann-Whitney U; ties count ½)."""
    score = np.asarray(score, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_top_fraction(score: np.ndarray, error: np.ndarray, fraction: float = 0.1) -> float:
    """ROC-AUC of ``score`` for flagging the ``fraction`` of items with the largest ``error``."""
    error = np.asarray(error, dtype=np.float64)
    n_top = max(1, round(fraction * len(error)))
    positive = np.zeros(len(error), dtype=bool)
    positive[np.argsort(-error, kind="stable")[:n_top]] = True
    return auroc(score, positive)


def miscalibration_area(errors: np.ndarray, std: np.ndarray, n_levels: int = 99) -> float:
    """Area between the observed and the ideal coverage curve of Gaussian intervals.

    ``errors`` and ``std`` (any equal shapes, e.g. per force component): for each nominal level
    p, the fraction of ``|error| <= z_p * std`` with ``z_p = sqrt(2) erfinv(p)``; the mean
    absolute gap to p over p in (0, 1). 0 is perfect, 0.5 the worst.
    """
    e = np.abs(np.asarray(errors, dtype=np.float64)).ravel()
    s = np.maximum(np.asarray(std, dtype=np.float64).ravel(), 1e-12)
    levels = np.linspace(0.01, 0.99, n_levels)
    z = np.sqrt(2.0) * erfinv(levels)
    observed = np.array([np.mean(e <= zi * s) for zi in z])
    return float(np.mean(np.abs(observed - levels)))


def coverage_curve(
    errors: np.ndarray, std: np.ndarray, n_levels: int = 19
) -> tuple[np.ndarray, np.ndarray]:
    """Nominal levels and observed coverage of Gaussian intervals (for calibration plots)."""
    e = np.abs(np.asarray(errors, dtype=np.float64)).ravel()
    s = np.maximum(np.asarray(std, dtype=np.float64).ravel(), 1e-12)
    levels = np.linspace(0.05, 0.95, n_levels)
    z = np.sqrt(2.0) * erfinv(levels)
    return levels, np.array([np.mean(e <= zi * s) for zi in z])
