"""Label-free performance estimation: confidence-based performance estimation (CBPE, as
NannyML names it) of a classifier's accuracy on rows whose labels have not come.

If the class probabilities are calibrated, a row's chance of being predicted right is its
top probability, so the expected accuracy of a window of rows is the mean of their top
probabilities, and the realised accuracy scatters around it with variance
sum p(1 - p) / n^2 (a sum of independent Bernoullis). Networks are rarely calibrated out of
training, so the select stage fits **temperature scaling** (one parameter, the softmax of
log-probabilities / T, by maximum likelihood with scipy) on the validation split and checks
it on the held-out reference rows (the test split, which no selection step ranked on): how
far the expected accuracy there is from the realised one is the calibration's own error,
added to the interval. Both go to ``reference.json`` under ``calibration``.

What it sees: a change in where rows fall relative to the decision boundary (covariate
shift). What it cannot see: a change of the labels' relation to the inputs (concept drift
proper), which only labels show.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import optimize, special

Z = 1.959964  # the two-sided 95% normal quantile
TEMPERATURE_RANGE = (0.05, 20.0)


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """(N, C) probabilities -> the softmax of their log / temperature."""
    logp = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0))
    return special.softmax(logp / temperature, axis=1)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``labels``."""
    logp = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0))
    labels = np.asarray(labels, np.int64)

    def nll(log_t: float) -> float:
        lp = special.log_softmax(logp / np.exp(log_t), axis=1)
        return float(-lp[np.arange(len(labels)), labels].mean())

    lo, hi = np.log(TEMPERATURE_RANGE)
    return float(np.exp(optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded").x))


def expected_accuracy(confidence: np.ndarray, calibration: dict[str, Any] | None = None
                      ) -> tuple[float, float, float]:
    """(estimate, low, high) of the accuracy of rows with these calibrated top probabilities:
    the 95% interval of the realised accuracy, widened by what the held-out check of the
    ``calibration`` leaves unknown (its gap between expected and realised accuracy, and that
    gap's own sampling error)."""
    c = np.asarray(confidence, np.float64)
    n = len(c)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    est = float(c.mean())
    var = float(np.sum(c * (1 - c))) / n**2
    bias = 0.0
    if calibration is not None:
        acc, rows = calibration["held_out_accuracy"], max(1, calibration["held_out_rows"])
        bias = abs(calibration["held_out_expected_accuracy"] - acc)
        var += acc * (1 - acc) / rows
    half = Z * np.sqrt(var) + bias
    return est, float(max(0.0, est - half)), float(min(1.0, est + half))


def fit_calibration(val_probs: np.ndarray, val_y: np.ndarray, held_probs: np.ndarray,
                    held_y: np.ndarray) -> dict[str, Any]:
    """Temperature fitted on the validation rows, checked on the held-out reference rows."""
    t = fit_temperature(val_probs, val_y)
    held = calibrate(held_probs, t)
    expected = float(held.max(axis=1).mean())
    realised = float((held.argmax(axis=1) == np.asarray(held_y)).mean())
    return {"method": "temperature", "temperature": t, "fitted_on": "val",
            "checked_on": "test", "held_out_rows": len(held_y),
            "held_out_expected_accuracy": expected, "held_out_accuracy": realised}
