"""Uncertainty-quality metrics and calibration on synthetic cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from mlforce.metrics import auroc, auroc_top_fraction, miscalibration_area, spearman
from mlforce.uncertainty import fit_calibration


def test_perfect_and_reversed_ranking():
    error = np.linspace(0.01, 1.0, 50)
    assert spearman(2 * error + 1, error) == pytest.approx(1.0)
    assert auroc_top_fraction(error**2, error, 0.1) == pytest.approx(1.0)
    assert spearman(-error, error) == pytest.approx(-1.0)
    assert auroc_top_fraction(-error, error, 0.1) == pytest.approx(0.0)
    assert auroc(np.ones(4), np.array([1, 0, 1, 0], dtype=bool)) == pytest.approx(0.5)


def test_random_score_has_auroc_near_half():
    rng = np.random.default_rng(0)
    error = rng.random(4000)
    assert abs(auroc_top_fraction(rng.random(4000), error, 0.1) - 0.5) < 0.05


def test_calibration_recovers_a_known_scale_and_zeroes_the_area():
    rng = np.random.default_rng(1)
    std = rng.uniform(0.01, 0.2, size=(5000, 3))
    errors = 3.0 * std * rng.normal(size=std.shape)
    cal = fit_calibration(errors, std, method="scale")
    assert cal["scale"] == pytest.approx(3.0, rel=0.03)
    assert miscalibration_area(errors, std) > 0.2  # overconfident by 3x
    assert miscalibration_area(errors, cal["scale"] * std) < 0.02
    robust = fit_calibration(errors, std, method="robust")
    assert robust["scale"] == pytest.approx(3.0, rel=0.05)
    # a few atoms with a tiny σ and a real error: the likelihood scale blows up, the robust not
    spoiled_std = std.copy()
    spoiled_std[:25] = 1e-4
    assert fit_calibration(errors, spoiled_std, method="scale")["scale"] > 10
    assert fit_calibration(errors, spoiled_std, method="robust")["scale"] == pytest.approx(
        3.0, rel=0.06
    )
    numbers = rng.choice([1, 6], size=5000)
    errors_pe = np.where(numbers[:, None] == 1, 2.0, 5.0) * std * rng.normal(size=std.shape)
    pe = fit_calibration(errors_pe, std, numbers, method="per_element")
    assert pe["per_element"]["1"] == pytest.approx(2.0, rel=0.05)
    assert pe["per_element"]["6"] == pytest.approx(5.0, rel=0.05)
