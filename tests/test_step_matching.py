"""The step-matching computation on synthetic curves with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from mot_core.bench.matching import ema, first_crossing, match_curves


def test_ema_is_bias_corrected_and_flat_on_constants():
    assert np.allclose(ema(np.full(50, 3.0), 0.9), 3.0)
    values = np.array([1.0, 0.0])
    assert ema(values, 0.5)[1] == pytest.approx((0.5 * 0.5 * 1.0) / (1 - 0.25))


def test_first_crossing_interpolates_between_points():
    steps = np.array([100, 200, 300, 400])
    values = np.array([4.0, 3.0, 2.0, 1.0])
    assert first_crossing(steps, values, 2.5) == pytest.approx(250.0)
    assert first_crossing(steps, values, 4.5) == pytest.approx(100.0)
    assert first_crossing(steps, values, 0.5) is None


def test_power_law_curves_match_at_the_known_fraction():
    # dense: L(s) = 2 + 10 / s^0.5; MoT is the same curve reached in half the steps:
    # L_mot(s) = L_dense(2 s). So MoT reaches dense's final loss at exactly half the budget.
    steps = np.arange(1, 1001, dtype=float)
    dense = 2 + 10 / steps**0.5
    mot = 2 + 10 / (2 * steps) ** 0.5
    times_dense = steps * 1.0
    times_mot = steps * 1.1  # MoT steps 10% slower: wall-clock fraction = 0.5 * 1.1
    m = match_curves(steps, dense, times_dense, steps, mot, times_mot)
    assert m.step == pytest.approx(500.0, abs=1e-6)
    assert m.step_fraction == pytest.approx(0.5, abs=1e-6)
    assert m.time_fraction == pytest.approx(0.55, abs=1e-6)


def test_noisy_curves_match_near_the_truth_after_smoothing():
    rng = np.random.default_rng(0)
    steps = np.arange(1, 2001, dtype=float)
    dense = 2 + 10 / steps**0.5 + rng.normal(0, 0.05, len(steps))
    mot = 2 + 10 / (2.5 * steps) ** 0.5 + rng.normal(0, 0.05, len(steps))
    m = match_curves(steps, dense, steps, steps, mot, steps, smoothing=0.98)
    assert m.step_fraction == pytest.approx(1 / 2.5, abs=0.05)


def test_never_reaching_the_target_is_reported_as_none():
    steps = np.arange(1, 101, dtype=float)
    m = match_curves(steps, 1 / steps, steps, steps, 2 / steps, steps)
    assert m.step is None and m.step_fraction is None and m.time_fraction is None
