"""Drift detectors: the column tests against reference sketches, the correction across
columns, PSI, the window tests and margin density, and the streaming monitor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from distml.drift.columns import (
    Gate,
    chi2_categorical,
    feature_drift,
    numeric_column,
    psi,
)
from distml.drift.detectors import (
    ErrorDetector,
    MarginDensityDetector,
    MarginReference,
    WindowTest,
    make_river_detector,
    margins,
    window_bounds,
)
from distml.drift.monitor import DriftMonitor, DriftSettings, _Ring
from distml.drift.reference import (
    SAMPLE_ROWS,
    categorical_sketch,
    numeric_sketch,
    sketch_columns,
)
from distml.errors import ConfigError

RNG = np.random.default_rng(0)


def _col(values: np.ndarray, name: str = "c") -> dict:
    return {"name": name, "kind": "numeric", "features": [name], **numeric_sketch(values)}


def test_a_discrete_column_keeps_exact_counts_and_gets_scipys_chi2_on_them():
    ref = RNG.integers(0, 17, 3000).astype(np.float32)
    new = np.append(RNG.integers(2, 17, 400), [40, 40]).astype(np.float32)  # 40: never seen
    col = _col(ref)
    assert col["discrete"]
    assert col["counts"] == np.unique(ref, return_counts=True)[1].tolist()
    r = numeric_column(col, new)
    assert r.test == "chi2"
    counts = np.append(np.unique(ref, return_counts=True)[1], 0)
    new_counts = np.append(np.bincount(new[new < 17].astype(int), minlength=17), 2)
    expected = stats.chi2_contingency(np.stack([counts, new_counts]))
    assert r.p_value == pytest.approx(expected.pvalue)
    assert r.effect_measure == "jensen_shannon"


def test_a_continuous_column_keeps_a_seeded_sample_and_its_true_size_and_ks_uses_both():
    values = RNG.normal(size=50_000).astype(np.float32)
    col = _col(values)
    assert not col["discrete"]
    assert col["rows"] == 50_000
    assert len(col["sample"]) == SAMPLE_ROWS
    assert col == _col(values)  # seeded
    new = RNG.normal(0.3, 1.0, 2000).astype(np.float32)
    r = numeric_column(col, new)
    expected = stats.ks_2samp(np.asarray(col["sample"], np.float64), new.astype(np.float64))
    assert (r.statistic, r.p_value) == pytest.approx((expected.statistic, expected.pvalue))
    assert r.effect == pytest.approx(0.3, abs=0.05)  # normed Wasserstein: sds moved


@pytest.mark.parametrize("rows", [100_000])  # 10^6: tests/integration/test_drift_at_scale.py
def test_fresh_rows_of_the_training_distribution_name_no_column_at_any_size(rows):
    rng = np.random.default_rng(rows)
    train = np.concatenate([rng.normal(size=(20_000, 4)), rng.integers(0, 5, (20_000, 4))],
                           axis=1).astype(np.float32)
    names = [f"c{j}" for j in range(8)]
    cols = [{"name": n, "kind": "numeric", "features": [n]} for n in names]
    ref = {"columns": sketch_columns(cols, names, train)}
    new = np.concatenate([rng.normal(size=(rows, 4)), rng.integers(0, 5, (rows, 4))],
                         axis=1).astype(np.float32)
    results = feature_drift(ref, new, names)
    assert [r.column for r in results if r.drifted] == []
    assert max(r.effect for r in results) < 0.05
    new[:, 1] += 0.25  # a quarter of a standard deviation
    new[:, 6] = np.where(rng.random(rows) < 0.3, 4, new[:, 6])  # a share of 4 moved
    assert [r.column for r in feature_drift(ref, new, names) if r.drifted] == ["c1", "c6"]


def test_small_reports_keep_false_alarms_a_rate_per_row():
    """300 stationary reports of 1,000 rows (3 x 10^5 rows, 8 columns): at alpha alone
    about one report in 70 names a column by noise (about 4 here); at the per-row level (1
    per 10^6 rows) about 0.3 are expected."""
    rng = np.random.default_rng(11)
    names = [f"c{j}" for j in range(8)]
    cols = [{"name": n, "kind": "numeric", "features": [n]} for n in names]
    ref = {"columns": sketch_columns(cols, names, rng.normal(size=(20_000, 8)))}
    gate = Gate()
    assert gate.level(1000) == pytest.approx(0.001)
    assert gate.level(10**6) == gate.alpha
    named = {"per_row": 0, "flat": 0}
    for _ in range(300):
        results = feature_drift(ref, rng.normal(size=(1000, 8)).astype(np.float32), names)
        named["per_row"] += any(r.drifted for r in results)
        named["flat"] += any(r.p_adjusted < gate.alpha and r.effect >= gate.min_wasserstein
                             for r in results)  # what alpha alone would have named
    assert named["per_row"] <= 1
    assert named["flat"] >= 2


def test_a_significant_but_tiny_difference_is_not_drift():
    # its own generator: the module's RNG draws depend on which tests ran first on this
    # worker, and at 0.05 sd the reference's 5,000-row sample made p 0.17 in one order
    rng = np.random.default_rng(23)
    col = _col(rng.normal(size=20_000).astype(np.float32))
    new = rng.normal(0.08, 1.0, (1_000_000, 1)).astype(np.float32)  # 0.08 sd: significant
    [r] = feature_drift({"columns": [col]}, new, ["c"])
    assert r.significant
    assert not r.drifted
    [r] = feature_drift({"columns": [col]}, new, ["c"], gate=Gate(min_wasserstein=0.01))
    assert r.drifted


def test_psi_is_zero_for_the_same_shares_and_large_for_a_shift():
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    # by hand: (0.8 - 0.5) ln(0.8/0.5) + (0.2 - 0.5) ln(0.2/0.5)
    assert psi([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.3 * np.log(1.6) + 0.3 * np.log(2.5))
    col = _col(RNG.normal(size=10_000))
    assert numeric_column(col, RNG.normal(size=5000)).psi < 0.02
    assert numeric_column(col, RNG.normal(1.0, 1.0, 5000)).psi > 0.25


def test_chi2_on_categories_and_an_unseen_category_is_drift():
    _, p_same = chi2_categorical(np.array([500, 300, 200]), np.array([52, 29, 19]))
    _, p_diff = chi2_categorical(np.array([500, 300, 200]), np.array([20, 30, 50]))
    assert p_same > 0.5
    assert p_diff < 1e-6
    _, p_one = chi2_categorical(np.array([100, 0]), np.array([50, 0]))
    assert p_one == 1.0  # one category on both sides: nothing can differ


def _columns(n: int, rows: np.ndarray) -> list[dict]:
    cols = [{"name": f"c{j}", "kind": "numeric", "features": [f"c{j}"]} for j in range(n)]
    return sketch_columns(cols, [f"c{j}" for j in range(n)], rows)


def test_benjamini_hochberg_names_the_shifted_columns_only():
    ref = {"columns": _columns(30, RNG.normal(size=(4000, 30)).astype(np.float32))}
    new = RNG.normal(size=(600, 30)).astype(np.float32)
    new[:, [4, 17]] += 0.4
    results = feature_drift(ref, new, [f"c{j}" for j in range(30)])
    assert [r.column for r in results if r.drifted] == ["c4", "c17"]
    raw_p = [r.p_value for r in results]
    # the adjusted p-values are scipy's BH over the same p-values, in the same order
    assert [r.p_adjusted for r in results] == pytest.approx(
        stats.false_discovery_control(raw_p, method="bh"))
    assert all(r.p_adjusted >= r.p_value for r in results)


def test_categorical_columns_from_a_one_hot_block_that_was_standardized_after():
    cats = ["a", "b", "c"]

    def encode(which: np.ndarray) -> np.ndarray:  # one-hot, then (x - 0.4) / 2 per feature
        return (np.eye(3, dtype=np.float32)[which] - 0.4) / 2

    col = {"name": "k", "kind": "categorical", "features": ["k=a", "k=b", "k=c"],
           "categories": cats, "hot": [0.3] * 3, "cold": [-0.2] * 3}
    [sketch] = sketch_columns([col], col["features"], encode(RNG.choice(3, 3000,
                                                                         p=[0.6, 0.3, 0.1])))
    assert sketch["counts"][0] > sketch["counts"][1] > sketch["counts"][2] > 0
    assert sketch["other"] == 0
    same = encode(RNG.choice(3, 500, p=[0.6, 0.3, 0.1]))
    unseen = same.copy()
    unseen[:150] = -0.2  # a category the one-hot step never saw: every feature cold
    ref = {"columns": [sketch]}
    [r_same] = feature_drift(ref, same, col["features"])
    [r_unseen] = feature_drift(ref, unseen, col["features"])
    assert not r_same.drifted
    assert r_unseen.drifted
    assert r_unseen.test == "chi2"


def test_the_top_categories_are_kept_in_order_and_the_rest_counted_as_other():
    sketch = categorical_sketch([f"x{i}" for i in range(150)], np.arange(150) + 1)
    assert sketch["categories"] == [f"x{i}" for i in range(50, 150)]  # the top, in order
    assert sketch["other"] == sum(range(1, 51))
    assert sketch["rows"] == sum(range(1, 151))


def test_margins_are_the_gap_between_the_two_highest_probabilities():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.45, 0.45], [0.05, 0.15, 0.8]])
    assert margins(probs) == pytest.approx([0.5, 0.0, 0.65])
    ref = MarginReference.from_margins(np.array([0.05, 0.15, 0.25, 0.35, 0.95]), bins=10)
    assert ref.threshold_for(0.4) == pytest.approx(0.2)
    assert ref.below(0.2) == 2
    assert ref.rows == 5


def test_window_bounds_widen_with_the_reference_uncertainty_and_the_number_of_tests():
    small = window_bounds(30, 100, window=200, step=10, alpha=0.01)
    large = window_bounds(3000, 10_000, window=200, step=10, alpha=0.01)
    assert small.low < large.low
    assert small.high > large.high
    fewer = window_bounds(3000, 10_000, window=200, step=10, alpha=0.01, horizon=200)
    assert fewer.high < large.high
    assert fewer.per_test_alpha > large.per_test_alpha


def test_window_test_keeps_its_false_alarm_rate_and_sees_a_change():
    rng = np.random.default_rng(1)
    false = 0
    for _ in range(20):  # 20 stationary streams of 20,000 samples at alpha = 0.2
        test = WindowTest(600, 2000, window=200, step=10, alpha=0.2)
        false += bool(test.update(rng.random(20_000) < 0.3))
    assert false <= 4  # expected at most 0.2 * 20 (Bonferroni is conservative)
    test = WindowTest(600, 2000, window=200, step=10, alpha=0.01)
    bits = np.concatenate([rng.random(3000) < 0.3, rng.random(3000) < 0.5])
    alarms = test.update(bits)
    assert alarms
    assert 3000 <= alarms[0] < 3200


def test_margin_density_alarms_when_the_model_grows_unsure_and_not_before():
    rng = np.random.default_rng(2)

    def probs(n: int, unsure: float) -> np.ndarray:
        top = np.where(rng.random(n) < unsure, rng.uniform(0.5, 0.55, n),
                       rng.uniform(0.7, 1.0, n))
        return np.stack([top, 1 - top], axis=1)

    ref = MarginReference.from_margins(margins(probs(2000, 0.2)))
    det = MarginDensityDetector(ref, density=0.2, window=200, step=10, alpha=0.01)
    assert det.update(probs(5000, 0.2)) == []
    alarms = det.update(probs(2000, 0.5))
    assert alarms
    assert 5000 <= alarms[0] < 5300


def test_the_error_window_sees_a_stream_worse_from_its_first_sample_adwin_alone_does_not():
    errors = (np.random.default_rng(3).random(3000) < 0.4).astype(int)
    assert ErrorDetector("adwin").update(errors) == []  # constant rate: no change within
    alarms = ErrorDetector("adwin", ref_errors=50, ref_rows=500).update(errors)  # 10% before
    assert alarms
    assert alarms[0] < 200


def test_an_unknown_detector_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="'cusum' is not known; choose from window, adwin, ddm"):
        make_river_detector("cusum")


def test_ring_keeps_the_last_rows_in_order():
    ring = _Ring(5)
    ring.extend(np.arange(3))
    ring.extend(np.arange(3, 7))
    assert ring.values().tolist() == [2, 3, 4, 5, 6]
    ring.extend(np.arange(7, 20))
    assert ring.values().tolist() == [15, 16, 17, 18, 19]


def _monitor_reference() -> dict:
    x = RNG.normal(size=(2000, 3)).astype(np.float32)
    probs = np.stack([np.full(500, 0.9), np.full(500, 0.1)], axis=1)
    return {"columns": _columns(3, x),
            "predictions": categorical_sketch(["no", "yes"], np.array([450, 50])),
            "margin_histogram": list(MarginReference.from_margins(margins(probs)).counts),
            "held_out_errors": 25, "held_out_rows": 500}


def test_monitor_matches_labels_by_id_and_the_report_is_json():
    mon = DriftMonitor(_monitor_reference(), feature_names=["c0", "c1", "c2"],
                       labels=["no", "yes"], settings=DriftSettings(error_window=20))
    x = RNG.normal(size=(40, 3)).astype(np.float32)
    probs = np.tile([0.9, 0.1], (40, 1))
    mon.update(x, probs, ids=[f"r{i}" for i in range(40)])
    # labels arrive later, out of order, with an id nobody asked about and an unknown class
    matched = mon.add_labels(["yes"] * 30 + ["maybe", "no"],
                             ids=[f"r{i}" for i in reversed(range(30))] + ["r35", "zz"])
    assert matched == 31
    report = json.loads(json.dumps(mon.report()))
    sup = report["supervised"]
    assert sup["labels"] == 31
    assert sup["unknown_labels"] == 1
    assert sup["error_rate"] == pytest.approx(1.0)
    assert report["concept_drift"]
    assert report["concept_drift_from"] == "labels"
    assert report["drifted_features"] == []
