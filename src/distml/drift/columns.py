"""Data drift per input column against the training reference, with scipy.stats.

A column is **drifted** when its difference from the reference is both *significant* and
*large enough to matter*:

- significance: continuous numeric columns, the two-sample Kolmogorov-Smirnov test
  (``ks_2samp``) of the new values against the reference's sample, which accounts for both
  samples' sizes (it is exact at any size of the new data: the sample is a true sample of
  the training rows); discrete numeric columns (few distinct values) and categorical ones,
  the chi-squared test of homogeneity (``chi2_contingency``) of the reference's exact
  counts and the new counts, values the reference never saw counted in one extra bin. The
  p-values of all columns of a report are corrected together with Benjamini-Hochberg
  (``false_discovery_control``) at ``alpha``;
- effect size: continuous columns, the Wasserstein distance between the new values and the
  reference sample divided by the reference's standard deviation (*normed Wasserstein*, in
  standard deviations the distribution moved: a 0.25-sd shift scores 0.25); discrete and
  categorical columns, the Jensen-Shannon distance (base 2, in [0, 1]) between the
  reference's and the new shares. The effect must reach ``min_wasserstein`` or
  ``min_jensen_shannon`` (0.1 by default, Evidently's thresholds for the same measures).

A report of n rows tests at the level ``min(alpha, false_alarms_per_million_rows * n /
10^6)``: with the null hypothesis true for every column, BH keeps the chance of any column
being *significant* in one report at most that level, so stationary data cut into reports of
any size raises at most ``false_alarms_per_million_rows`` false alarms per 10^6 rows on
average (at 0.05 a 1,000-row report would raise 50). The effect gate then keeps fresh rows
of the training distribution from being named at any size (at 10^5-10^6 rows a test finds
differences far too small to matter: the reference is a sample, the data a snapshot).
PSI (population stability index) over the reference's deciles (or categories) is kept as
the summary score (PSI < 0.1 stable, 0.1-0.25 moderate, > 0.25 major).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats
from scipy.spatial import distance

logger = logging.getLogger(__name__)

PSI_EPS = 1e-4  # proportions floor: an empty bin would make PSI infinite
MIN_WASSERSTEIN = 0.1  # normed Wasserstein (reference standard deviations) to be drifted
MIN_JENSEN_SHANNON = 0.1  # Jensen-Shannon distance (base 2) to be drifted
FALSE_ALARMS_PER_MILLION_ROWS = 1.0  # expected false alarms per 10^6 stationary rows


@dataclass(frozen=True)
class Gate:
    """What makes a column drifted: significance after BH (at ``level(rows)``), and an effect
    at least this big."""

    alpha: float = 0.05
    min_wasserstein: float = MIN_WASSERSTEIN
    min_jensen_shannon: float = MIN_JENSEN_SHANNON
    false_alarms_per_million_rows: float = FALSE_ALARMS_PER_MILLION_ROWS

    def level(self, rows: int) -> float:
        """The significance level of a report of ``rows`` rows: alpha, or less for a small
        report, so that false alarms stay a rate per row whatever the reports' size."""
        return min(self.alpha, self.false_alarms_per_million_rows * rows / 1e6)

    def minimum(self, measure: str) -> float:
        return self.min_wasserstein if measure == "wasserstein_normed" else \
            self.min_jensen_shannon


@dataclass
class ColumnDrift:
    column: str
    kind: str  # numeric | categorical
    test: str  # ks | chi2
    statistic: float
    p_value: float
    effect: float  # normed Wasserstein (ks) or Jensen-Shannon distance (chi2)
    effect_measure: str  # wasserstein_normed | jensen_shannon
    psi: float
    rows: int
    p_adjusted: float = 1.0
    significant: bool = False  # BH-adjusted p below alpha
    drifted: bool = False  # significant and the effect at least the gate's minimum

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def psi(ref: np.ndarray, new: np.ndarray) -> float:
    """Population stability index of two proportion vectors over the same bins."""
    p = np.maximum(np.asarray(ref, dtype=np.float64), PSI_EPS)
    q = np.maximum(np.asarray(new, dtype=np.float64), PSI_EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def jensen_shannon(ref_counts: np.ndarray, new_counts: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2: 0 the same shares, 1 disjoint) of two count vectors."""
    p, q = np.asarray(ref_counts, np.float64), np.asarray(new_counts, np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return 0.0
    return float(distance.jensenshannon(p / p.sum(), q / q.sum(), base=2))


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    return values[~np.isnan(values)].astype(np.float64)


def continuous_test(column: dict[str, Any], values: np.ndarray
                    ) -> tuple[float, float, float, float]:
    """(KS statistic, p-value, normed Wasserstein, PSI) of ``values`` against the sample."""
    sample = np.asarray(column["sample"], dtype=np.float32).astype(np.float64)
    res = stats.ks_2samp(sample, values)
    scale = column["std"] if column["std"] > 0 else 1.0
    effect = stats.wasserstein_distance(sample, values) / scale
    edges = np.unique(np.quantile(sample, np.arange(1, 10) / 10))  # the sample's deciles
    ref_props = np.bincount(np.searchsorted(edges, sample), minlength=len(edges) + 1)
    new_props = np.bincount(np.searchsorted(edges, values), minlength=len(edges) + 1)
    score = psi(ref_props / len(sample), new_props / len(values))
    return float(res.statistic), float(res.pvalue), float(effect), score


def discrete_counts(column: dict[str, Any], values: np.ndarray) -> np.ndarray:
    """New counts of the reference's values, then of values it never saw (one bin)."""
    ref_values = np.asarray(column["values"], dtype=np.float32)
    v = np.asarray(values, dtype=np.float32)
    idx = np.minimum(np.searchsorted(ref_values, v), len(ref_values) - 1)
    seen = ref_values[idx] == v
    counts = np.bincount(idx[seen], minlength=len(ref_values))
    return np.append(counts, int((~seen).sum()))


def chi2_categorical(ref_counts: np.ndarray, new_counts: np.ndarray) -> tuple[float, float]:
    """(chi-squared, p-value) of homogeneity; categories empty on both sides are dropped."""
    table = np.stack([ref_counts, new_counts]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or table[1].sum() == 0:
        return 0.0, 1.0  # one category (or no new rows): nothing can differ
    res = stats.chi2_contingency(table)
    return float(res.statistic), float(res.pvalue)


def counts_drift(name: str, kind: str, ref: np.ndarray, new: np.ndarray) -> ColumnDrift:
    """Chi-squared, Jensen-Shannon and PSI of two aligned count vectors."""
    stat, p = chi2_categorical(ref, new)
    rows = int(new.sum())
    score = psi(ref / max(1, ref.sum()), new / max(1, rows)) if rows else 0.0
    return ColumnDrift(name, kind, "chi2", stat, p, jensen_shannon(ref, new), "jensen_shannon",
                       score, rows)


def numeric_column(column: dict[str, Any], values: np.ndarray) -> ColumnDrift:
    values = _finite(values)
    if column.get("discrete"):
        ref = np.append(np.asarray(column["counts"], np.int64), 0)
        return counts_drift(column["name"], "numeric", ref, discrete_counts(column, values))
    if len(values) == 0:
        return ColumnDrift(column["name"], "numeric", "ks", 0.0, 1.0, 0.0,
                           "wasserstein_normed", 0.0, 0)
    d, p, effect, score = continuous_test(column, values)
    return ColumnDrift(column["name"], "numeric", "ks", d, p, effect, "wasserstein_normed",
                       score, len(values))


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
    return counts_drift(column["name"], "categorical", ref, counts)


def correct(results: list[ColumnDrift], gate: Gate) -> list[ColumnDrift]:
    """Benjamini-Hochberg across the columns at the gate's level for the report's size, then
    the effect gate; sets p_adjusted, significant and drifted."""
    if not results:
        return results
    adjusted = stats.false_discovery_control([r.p_value for r in results], method="bh")
    level = gate.level(max(r.rows for r in results))
    for r, q in zip(results, adjusted, strict=True):
        r.p_adjusted = float(q)
        r.significant = bool(q < level and r.rows > 0)
        r.drifted = r.significant and r.effect >= gate.minimum(r.effect_measure)
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
                  gate: Gate | None = None) -> list[ColumnDrift]:
    """Every monitored column of ``x`` (N, F model inputs) tested, then corrected together."""
    index = {n: j for j, n in enumerate(feature_names)}
    results = []
    for col in reference["columns"]:
        values = column_values(col, x, index)
        results.append(numeric_column(col, values) if col["kind"] == "numeric"
                       else categorical_column(col, values))
    return correct(results, gate or Gate())


def prediction_drift(reference: dict[str, Any], predictions: np.ndarray, labels: list[str], *,
                     gate: Gate | None = None) -> ColumnDrift:
    """The predicted classes (or values) against the validation split's, uncorrected."""
    ref = {**reference["predictions"], "name": "prediction"}
    if ref["kind"] == "numeric":
        result = numeric_column(ref, predictions)
    else:
        counts = np.bincount(np.asarray(predictions, np.int64), minlength=len(labels))
        result = categorical_column(ref, {labels[i]: int(c) for i, c in enumerate(counts)})
    return correct([result], gate or Gate())[0]
