"""Data drift per input column against the training reference, with scipy.stats:

- numeric: the two-sample Kolmogorov-Smirnov statistic between the reference sketch's CDF
  and the new values' empirical CDF, its p-value from scipy's ``kstwo`` distribution at the
  effective size n*m/(n+m) (as ``ks_2samp``'s asymptotic method does; conservative for
  discrete values);
- categorical: the chi-squared test of homogeneity (``chi2_contingency``) of the reference's
  and the new category counts;
- the p-values of all columns are corrected together with Benjamini-Hochberg
  (``false_discovery_control``): a column is drifted when its adjusted p-value is below
  ``alpha``, so at most ``alpha`` of the columns named drifted are expected to be wrong;
- PSI (population stability index) over the reference's deciles (or categories) is the
  effect size and the summary score (PSI < 0.1 stable, 0.1-0.25 moderate, > 0.25 major).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

logger = logging.getLogger(__name__)

PSI_EPS = 1e-4  # proportions floor: an empty bin would make PSI infinite


@dataclass
class ColumnDrift:
    column: str
    kind: str  # numeric | categorical
    test: str  # ks | chi2
    statistic: float
    p_value: float
    psi: float
    rows: int
    p_adjusted: float = 1.0
    drifted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def psi(ref: np.ndarray, new: np.ndarray) -> float:
    """Population stability index of two proportion vectors over the same bins."""
    p = np.maximum(np.asarray(ref, dtype=np.float64), PSI_EPS)
    q = np.maximum(np.asarray(new, dtype=np.float64), PSI_EPS)
    return float(np.sum((q - p) * np.log(q / p)))


class NumericReference:
    """A numeric sketch as a right-continuous CDF (steps, or linear between quantiles)."""

    def __init__(self, sketch: dict[str, Any]) -> None:
        self.points = np.asarray(sketch["points"], dtype=np.float32).astype(np.float64)
        self.cdf = np.asarray(sketch["cdf"], dtype=np.float64)
        self.interpolate = bool(sketch["interpolate"])
        self.rows = int(sketch["rows"])

    def __call__(self, x: np.ndarray, *, left: bool = False) -> np.ndarray:
        """F(x), or F(x-) with ``left``."""
        i = np.searchsorted(self.points, x, side="left" if left else "right")  # points <= x
        below = np.concatenate([[0.0], self.cdf])[i]  # F at the last point at or below x
        if not self.interpolate:
            return below
        # Between quantiles q[i-1] < x < q[i] the CDF is linear; at and beyond the ends flat.
        inside = (i > 0) & (i < len(self.points))
        j = np.clip(i, 1, len(self.points) - 1)
        lo, hi = self.points[j - 1], self.points[j]
        frac = np.where(hi > lo, (x - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
        between = self.cdf[j - 1] + frac * (self.cdf[j] - self.cdf[j - 1])
        return np.where(inside & (x > lo), between, below)

    def quantile_edges(self, bins: int = 10) -> np.ndarray:
        """Distinct inner edges at the reference's 1/bins, ..., (bins-1)/bins quantiles."""
        levels = np.arange(1, bins) / bins
        if self.interpolate:
            return np.unique(np.interp(levels, self.cdf, self.points))
        # a step CDF: the first point whose cumulative share reaches the level
        idx = np.minimum(np.searchsorted(self.cdf, levels - 1e-9), len(self.points) - 1)
        return np.unique(self.points[idx])


def ks_numeric(ref: NumericReference, values: np.ndarray) -> tuple[float, float]:
    """(KS statistic, p-value) of ``values`` against the reference sketch."""
    x = np.sort(np.asarray(values, dtype=np.float32).astype(np.float64))
    m = len(x)
    u = np.unique(x)
    f_right = np.searchsorted(x, u, side="right") / m  # F_new(u)
    f_left = np.searchsorted(x, u, side="left") / m  # F_new(u-)
    # Both CDFs are monotone: the supremum of |F_ref - F_new| is at a new value (from either
    # side) or, for a step reference, at one of its points.
    d = max(np.max(np.abs(ref(u) - f_right)), np.max(np.abs(ref(u, left=True) - f_left)))
    if not ref.interpolate:
        pts = ref.points
        d = max(d, np.max(np.abs(ref(pts) - np.searchsorted(x, pts, side="right") / m)))
    n_eff = max(1, round(ref.rows * m / (ref.rows + m)))
    return float(d), float(stats.kstwo.sf(d, n_eff))


def psi_numeric(ref: NumericReference, values: np.ndarray) -> float:
    edges = ref.quantile_edges()
    ref_props = np.diff(np.concatenate([[0.0], ref(edges), [1.0]]))  # bins (e[k-1], e[k]]
    new_bins = np.searchsorted(edges, np.asarray(values, np.float32).astype(np.float64),
                               side="left")
    new_props = np.bincount(new_bins, minlength=len(edges) + 1) / max(1, len(values))
    return psi(ref_props, new_props)


def chi2_categorical(ref_counts: np.ndarray, new_counts: np.ndarray) -> tuple[float, float]:
    """(chi-squared, p-value) of homogeneity; categories empty on both sides are dropped."""
    table = np.stack([ref_counts, new_counts]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or table[1].sum() == 0:
        return 0.0, 1.0  # one category (or no new rows): nothing can differ
    res = stats.chi2_contingency(table)
    return float(res.statistic), float(res.pvalue)


def numeric_column(column: dict[str, Any], values: np.ndarray) -> ColumnDrift:
    ref = NumericReference(column)
    values = np.asarray(values, dtype=np.float32)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return ColumnDrift(column["name"], "numeric", "ks", 0.0, 1.0, 0.0, 0)
    d, p = ks_numeric(ref, values)
    return ColumnDrift(column["name"], "numeric", "ks", d, p, psi_numeric(ref, values),
                       len(values))


def category_table(column: dict[str, Any], new: dict[str, int]) -> tuple[list[str], np.ndarray,
                                                                        np.ndarray]:
    """Aligned (names, reference counts, new counts); new categories and the reference's
    'other' share one bin."""
    names = list(column["categories"])
    ref = list(column["counts"])
    counts = [new.get(c, 0) for c in names]
    names.append("(other)")
    ref.append(column.get("other", 0))
    counts.append(sum(v for k, v in new.items() if k not in set(column["categories"])))
    return names, np.asarray(ref), np.asarray(counts)


def categorical_column(column: dict[str, Any], new: dict[str, int]) -> ColumnDrift:
    _, ref, counts = category_table(column, new)
    stat, p = chi2_categorical(ref, counts)
    rows = int(counts.sum())
    score = psi(ref / max(1, ref.sum()), counts / max(1, rows)) if rows else 0.0
    return ColumnDrift(column["name"], "categorical", "chi2", stat, p, score, rows)


def correct(results: list[ColumnDrift], *, alpha: float) -> list[ColumnDrift]:
    """Benjamini-Hochberg across the columns; sets p_adjusted and drifted."""
    if not results:
        return results
    adjusted = stats.false_discovery_control([r.p_value for r in results], method="bh")
    for r, q in zip(results, adjusted, strict=True):
        r.p_adjusted = float(q)
        r.drifted = bool(q < alpha and r.rows > 0)
    return results


def onehot_categories(block: np.ndarray, column: dict[str, Any]) -> tuple[np.ndarray, int]:
    """A one-hot block (N, K) of model inputs -> each hot row's category index, and the
    number of rows with none hot (a category training never saw). Later transforms (e.g.
    standardize) move the 0/1 levels, so a feature is hot past the middle of its levels."""
    hot, cold = np.asarray(column["hot"]), np.asarray(column["cold"])
    is_hot = (block - (hot + cold) / 2) * np.sign(hot - cold) > 0  # (N, K)
    any_hot = is_hot.any(axis=1)
    return is_hot[any_hot].argmax(axis=1), int((~any_hot).sum())


def column_values(column: dict[str, Any], x: np.ndarray, index: dict[str, int]
                  ) -> np.ndarray | dict[str, int]:
    """A column's new values from the model-input matrix ``x`` (N, F): the numeric feature,
    or category counts from the one-hot block."""
    if column["kind"] == "numeric":
        return x[:, index[column["features"][0]]]
    which, other = onehot_categories(x[:, [index[f] for f in column["features"]]], column)
    counts = np.bincount(which, minlength=len(column["features"]))
    out = {c: int(n) for c, n in zip(column["categories"], counts, strict=True)}
    out["(other)"] = other
    return out


def feature_drift(reference: dict[str, Any], x: np.ndarray, feature_names: list[str], *,
                  alpha: float = 0.05) -> list[ColumnDrift]:
    """Every monitored column of ``x`` (N, F model inputs) tested, then corrected together."""
    index = {n: j for j, n in enumerate(feature_names)}
    results = []
    for col in reference["columns"]:
        values = column_values(col, x, index)
        results.append(numeric_column(col, values) if col["kind"] == "numeric"
                       else categorical_column(col, values))
    return correct(results, alpha=alpha)


def prediction_drift(reference: dict[str, Any], predictions: np.ndarray, labels: list[str], *,
                     alpha: float = 0.05) -> ColumnDrift:
    """The predicted classes (or values) against the validation split's, uncorrected."""
    ref = {**reference["predictions"], "name": "prediction"}
    if ref["kind"] == "numeric":
        result = numeric_column(ref, predictions)
    else:
        counts = np.bincount(np.asarray(predictions, np.int64), minlength=len(labels))
        result = categorical_column(ref, {labels[i]: int(c) for i, c in enumerate(counts)})
    return correct([result], alpha=alpha)[0]
