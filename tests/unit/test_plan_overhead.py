"""The planner's wrapper overheads (distml.plan.overhead): a calibration's per-step and
per-unit costs come back out of probe runs that cost exactly that much more than the
step-time model's price, and a plan pays them on each axis it spreads over, per unit of
what that axis's wrapper works per (FSDP units, tensor modules, pipeline actions)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from distml.plan.calibrate import Machine
from distml.plan.layout import RankShare
from distml.plan.overhead import _tracer, fit, priced, probe_settings
from distml.plan.steptime import axis_overheads, step_time, units

MACHINE = Machine(flops_per_s=2e10, memory_bytes_per_s=1e10, op_seconds=5e-6,
                  network_bytes_per_s=1e9, network_latency_s=5e-5, cores=2)
# seconds per step, seconds per unit: what the probes are made to cost beyond their price
TRUE = {"ddp": (2e-3, 0.0), "fsdp": (1e-3, 3e-3), "tensor": (0.0, 4e-3),
        "pipeline-1f1b": (5e-4, 1e-3)}


def test_fit_recovers_the_overheads_the_probe_runs_cost():
    plain = {"4": 1e-3, "8": 2e-3}
    runs = priced(plain, MACHINE)
    measured: dict[str, dict[str, float]] = {"plain": plain}
    for name, layers, key, n, price in runs:
        per_step, per_unit = TRUE.get(key, (0.0, 0.0))
        measured.setdefault(name, {})[str(layers)] = price + per_step + per_unit * n
    got = {key: (a, b) for key, a, b in fit(measured, MACHINE)}
    for key, (per_step, per_unit) in TRUE.items():
        assert got[key] == pytest.approx((per_step, per_unit), abs=1e-9), key
    # what is priced higher than it ran is no negative overhead
    assert got["zero1"] == (0.0, 0.0)
    # the units the probes differ in: FSDP units, tensor modules, pipeline actions
    n = {(key, layers): units for _, layers, key, units, _ in runs}
    assert n[("fsdp", 8)] > n[("fsdp", 4)]
    assert n[("tensor", 8)] > n[("tensor", 4)]
    assert n[("pipeline-1f1b", 8)] == 2 * n[("pipeline-1f1b", 4)]


@pytest.mark.parametrize(("parallel", "keys"), [
    ({"strategy": "fsdp", "world_size": 2}, [("fsdp", "full")]),
    ({"strategy": "fsdp", "world_size": 2, "fsdp": {"reshard_after_forward": False}},
     [("fsdp-zero2", "full")]),
    ({"strategy": "tensor", "world_size": 4, "tensor_degree": 2, "data_degree": 2},
     [("fsdp", "full"), ("tensor", "tensor")]),
    ({"strategy": "pipeline", "world_size": 4, "data_degree": 2,
      "pipeline": {"degree": 2, "schedule": "gpipe"}},
     [("ddp", "replicate"), ("pipeline-gpipe", "pipeline")]),
])
def test_a_plan_pays_each_axis_overhead_per_unit(parallel, keys):
    s = probe_settings(parallel, 2)
    assert axis_overheads(s, s.dims) == keys
    trace = _tracer(4)(8)
    share = RankShare(1.0, 1.0, tuple(range(len(trace.layers))), 0)
    paid = replace(MACHINE, overheads=tuple((k, *TRUE.get(k, (7e-4, 2e-4)))
                                            for k in ("ddp", "fsdp", "fsdp-zero2", "tensor",
                                                      "pipeline-gpipe")))
    micro = 2 if s.dims.pipeline > 1 else 1
    extra = step_time(trace, s, s.dims, share, paid, micro_steps=micro).total_s - \
        step_time(trace, s, s.dims, share, MACHINE, micro_steps=micro).total_s
    expected = sum(a + b * units(kind, trace, s, micro)
                   for key, kind in keys for _, a, b in [next(o for o in paid.overheads
                                                              if o[0] == key)])
    assert extra == pytest.approx(expected)
    assert extra > 0



def test_a_measured_collective_factor_scales_what_fsdp_pays_for_that_collective():
    """gloo's reduce-scatter is an all-reduce underneath: the factor calibration measures
    for it multiplies the reduce-scatter's price, and only it."""
    s = probe_settings({"strategy": "fsdp", "world_size": 2}, 1)
    trace = _tracer(4)(8)
    share = RankShare(1.0, 1.0, tuple(range(len(trace.layers))), 0)

    def comm(**factors: float) -> float:
        m = replace(MACHINE, collective_factors=tuple(factors.items()))
        return step_time(trace, s, s.dims, share, m, micro_steps=1).communication_s

    base, scatter = comm(), comm(reduce_scatter=3.0) - comm()
    assert scatter > 0
    # the reduce-scatter of the gradients: (n-1)/n of their bytes and one message, 2 ranks
    one = trace.grad_bytes / 2 / MACHINE.network_bytes_per_s + MACHINE.network_latency_s
    assert scatter == pytest.approx(2 * one)
    assert comm(all_reduce=3.0) == pytest.approx(base)  # FSDP issues no all-reduce
