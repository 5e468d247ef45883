"""Step matching (paper Figs. 5 and 19): at which step does MoT first reach the dense model's
final loss, as a fraction of the dense run's steps (and of its wall-clock time)?

Training curves are noisy, so both are smoothed with a bias-corrected exponential moving
average first; the dense target is the smoothed value at its last step. Validation curves are
sparse, so the crossing is interpolated linearly between evaluation points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def ema(values: np.ndarray, alpha: float) -> np.ndarray:
    """Bias-corrected EMA (as TensorBoard's smoothing): out_t = avg_t / (1 - alpha^t)."""
    out = np.empty(len(values))
    avg = 0.0
    for i, value in enumerate(values, 1):
        avg = alpha * avg + (1 - alpha) * value
        out[i - 1] = avg / (1 - alpha**i)
    return out


def first_crossing(steps: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """First (fractional) step at which the piecewise-linear curve reaches <= target."""
    below = np.nonzero(values <= target)[0]
    if len(below) == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(s0 + (v0 - target) / (v0 - v1) * (s1 - s0))


@dataclass(frozen=True)
class Match:
    """Where a candidate run first reaches the baseline's final loss."""

    target: float  # baseline's final (smoothed) loss
    step: float | None  # candidate's first step at or below it (None: never within budget)
    step_fraction: float | None  # step / baseline's last step
    time_fraction: float | None  # candidate's elapsed time at that step / baseline's total time

    def as_dict(self) -> dict:
        return {"target": self.target, "step": self.step, "step_fraction": self.step_fraction, "time_fraction": self.time_fraction}


def match_curves(
    base_steps: np.ndarray, base_values: np.ndarray, base_times: np.ndarray,
    cand_steps: np.ndarray, cand_values: np.ndarray, cand_times: np.ndarray,
    smoothing: float = 0.0,
) -> Match:
    """Compare two loss curves (steps increasing, times = cumulative seconds at each step).

    ``smoothing`` is the EMA factor (0 = none; e.g. 0.95 for per-step training losses)."""
    base_values = ema(base_values, smoothing) if smoothing else base_values
    cand_values = ema(cand_values, smoothing) if smoothing else cand_values
    target = float(base_values[-1])
    step = first_crossing(cand_steps, cand_values, target)
    if step is None:
        return Match(target, None, None, None)
    elapsed = float(np.interp(step, cand_steps, cand_times))
    return Match(target, step, step / float(base_steps[-1]), elapsed / float(base_times[-1]) if base_times[-1] > 0 else math.nan)
