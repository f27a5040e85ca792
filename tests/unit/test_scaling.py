from __future__ import annotations

import pytest

from distml.monitoring.scaling import amdahl_max_speedup, analyze, fit_amdahl, plot


@pytest.mark.parametrize("serial", [0.0, 0.05, 0.2, 0.5])
def test_amdahl_and_karp_flatt_recover_a_known_serial_fraction(serial):
    # T_N = T_1 (f + (1 - f) / N): the law itself, with a little measurement noise.
    noise = {1: 1.0, 2: 1.003, 4: 0.997, 8: 1.002, 16: 0.999}
    times = {n: 10.0 * (serial + (1 - serial) / n) * noise[n] for n in noise}
    out = analyze(times)
    assert out["amdahl_parallel_fraction"] == pytest.approx(1 - serial, abs=0.01)
    for point in out["points"][1:]:
        assert point["karp_flatt"] == pytest.approx(serial, abs=0.01)
    first = out["points"][0]
    assert (first["speedup"], first["efficiency"], first["karp_flatt"]) == (1.0, 1.0, None)


def test_weak_scaling_recovers_gustafsons_serial_fraction():
    # With N times the work on N workers, Gustafson's scaled speedup is N - a (N - 1):
    # timings built from a known a.
    a, t1 = 0.15, 10.0
    times = {n: n * t1 / (n - a * (n - 1)) for n in (1, 2, 4, 8)}
    out = analyze(times, mode="weak")
    assert out["mode"] == "weak"
    assert out["points"][3]["speedup"] == pytest.approx(8 - a * 7)
    assert out["gustafson_serial_fraction"] == pytest.approx(a, abs=0.01)


def test_limits_and_errors(tmp_path):
    assert fit_amdahl([(1, 1.0)]) == 0.0
    assert amdahl_max_speedup(1.0) is None
    assert amdahl_max_speedup(0.75) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="need a 1-worker point"):
        analyze({2: 1.0})
    path = plot(analyze({1: 4.0, 2: 2.2}), tmp_path / "s.png", title="t")
    assert path.stat().st_size > 1000
