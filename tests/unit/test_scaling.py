from __future__ import annotations

import pytest

from distml.workflow.scale import measure
from distml.workflow.scaling import amdahl_max_speedup, analyze, fit_amdahl, plot


def _repeated(times: dict[int, float], spread: float = 0.02) -> dict[int, list[float]]:
    return {n: [t * (1 - spread), t, t * (1 + spread)] for n, t in times.items()}


@pytest.mark.parametrize("serial", [0.0, 0.05, 0.2, 0.5])
def test_amdahl_and_karp_flatt_recover_a_known_serial_fraction(serial):
    # T_N = T_1 (f + (1 - f) / N): the law itself, with a little measurement noise.
    noise = {1: 1.0, 2: 1.003, 4: 0.997, 8: 1.002, 16: 0.999}
    times = {n: 10.0 * (serial + (1 - serial) / n) * noise[n] for n in noise}
    out = analyze(_repeated(times))
    assert out["warnings"] == []
    assert out["amdahl_parallel_fraction"] == pytest.approx(1 - serial, abs=0.01)
    for point in out["points"][1:]:
        assert point["karp_flatt"] == pytest.approx(serial, abs=0.01)
    first = out["points"][0]
    assert (first["speedup"], first["efficiency"], first["karp_flatt"]) == (1.0, 1.0, None)
    assert (first["seconds_min"], first["seconds_max"], first["repeats"]) == pytest.approx(
        (9.8, 10.2, 3))


def test_each_point_is_the_median_of_its_repeats():
    out = analyze({1: [4.0, 40.0, 4.2], 2: [2.1, 2.0, 2.2]})  # one outlier of T_1
    assert out["points"][0]["seconds"] == 4.2
    assert out["points"][1]["speedup"] == pytest.approx(4.2 / 2.1)


def test_weak_scaling_recovers_gustafsons_serial_fraction():
    # With N times the work on N workers, Gustafson's scaled speedup is N - a (N - 1):
    # timings built from a known a.
    a, t1 = 0.15, 10.0
    times = {n: n * t1 / (n - a * (n - 1)) for n in (1, 2, 4, 8)}
    out = analyze(_repeated(times, 0.0), mode="weak")
    assert out["mode"] == "weak"
    assert out["points"][3]["speedup"] == pytest.approx(8 - a * 7)
    assert out["gustafson_serial_fraction"] == pytest.approx(a, abs=0.01)


def test_superlinear_or_too_short_timings_are_flagged_not_fitted():
    superlinear = analyze(_repeated({1: 10.0, 2: 1.9}))  # efficiency 2.6 on 2 cores
    assert superlinear["amdahl_parallel_fraction"] is None
    assert any("efficiency 2.63 at 2 workers is above 1.05" in w
               for w in superlinear["warnings"])
    short = analyze(_repeated({1: 0.3, 2: 0.2}))
    assert short["amdahl_parallel_fraction"] is None
    assert any("too short to measure" in w for w in short["warnings"])


def test_the_warm_up_is_not_charged_to_the_first_point():
    # The first call pays imports and cold caches (5 s); the work itself takes 2 s / N.
    calls: list[int] = []

    def time_once(n: int) -> float:
        calls.append(n)
        return 5.0 if len(calls) == 1 else 2.0 / n

    samples = measure(time_once, [1, 2], repeats=3)
    assert calls == [1, 1, 2, 1, 2, 1, 2]  # a warm-up, then interleaved rounds
    out = analyze(samples)
    assert out["points"][1]["speedup"] == pytest.approx(2.0)
    assert out["warnings"] == []


def test_limits_and_errors(tmp_path):
    assert fit_amdahl([(1, 1.0)]) == 0.0
    assert amdahl_max_speedup(1.0) is None
    assert amdahl_max_speedup(0.75) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="need a 1-worker point"):
        analyze({2: [1.0]})
    path = plot(analyze(_repeated({1: 4.0, 2: 2.2})), tmp_path / "s.png", title="t")
    assert path.stat().st_size > 1000
    flagged = plot(analyze(_repeated({1: 4.0, 2: 1.0})), tmp_path / "f.png", title="t")
    assert flagged.stat().st_size > 1000
