"""The pipeline benchmark's bubble: over one window shared by the ranks (the per-rank
windows it replaced read too low), and the makespan model it is compared with."""

from __future__ import annotations

import pytest
from bench.model_parallel import model_bubble, own_window_bubble, shared_window_bubble


def _gpipe(stages: int, m: int) -> list[list[tuple[str, int, int]]]:
    """GPipe's order on each rank (one stage per rank): every forward, then every backward;
    the last stage computes each micro-batch's loss after its forward."""
    orders = []
    for s in range(stages):
        forward = [a for mb in range(m) for a in
                   [("forward", s, mb)] + ([("loss", s, mb)] if s == stages - 1 else [])]
        orders.append(forward + [("backward", s, mb) for mb in range(m)])
    return orders


@pytest.mark.parametrize(("stages", "m"), [(2, 1), (2, 2), (2, 8), (4, 3)])
def test_equal_stages_give_gpipes_formula(stages, m):
    times = {(s, k): t for s in range(stages)
             for k, t in (("forward", 1.0), ("loss", 0.0), ("backward", 2.0))}
    assert model_bubble(_gpipe(stages, m), times) == pytest.approx(
        (stages - 1) / (m + stages - 1))


def test_a_slower_last_stage_widens_the_bubble_beyond_the_formula():
    times = {(0, "forward"): 1.0, (0, "backward"): 2.0, (1, "forward"): 2.0,
             (1, "loss"): 0.0, (1, "backward"): 4.0}
    # M = 2: stage 1 is the bottleneck: makespan 1 + 2*2 + 2*4 + 2 = 15, busy 6 + 12.
    assert model_bubble(_gpipe(2, 2), times) == pytest.approx(1 - 18 / 30)


def test_the_shared_window_counts_the_first_stages_tail_that_own_windows_leave_out():
    # M = 1, K = 2, F = 1, B = 2, free sends: stage 0 forwards [0, 1], stage 1 forwards
    # [1, 2] and backwards [2, 4], stage 0 backwards [4, 6]. Rank 1 leaves the schedule at
    # 4, so its own window misses stage 0's backward.
    ranks = [{"step": (0.0, 6.0), "actions": [("forward", 0, 0, 0.0, 1.0),
                                              ("backward", 0, 0, 4.0, 6.0)]},
             {"step": (0.0, 4.0), "actions": [("forward", 1, 0, 1.0, 2.0),
                                              ("backward", 1, 0, 2.0, 4.0)]}]
    assert shared_window_bubble(ranks) == pytest.approx(0.5)  # the formula's (K-1)/(M+K-1)
    assert own_window_bubble(ranks) == pytest.approx((0.5 + 0.25) / 2)
