"""The pace of overlapped rounds (coordinator/pacing.py), alone: speeds heard, the paced end
fixed by a round's first lease, the cases that are not paced."""

from __future__ import annotations

import pytest

from crowdtrain.coordinator.pacing import PACE_SLACK, RATE_WINDOW, Pacer


def test_the_first_lease_fixes_the_round_end_from_the_fastest_speed():
    p = Pacer(overlap=True, round_seconds=100.0)
    p.heard(1, 50.0, now=0.0)
    p.heard(2, 200.0, now=1.0)
    p.heard(3, None, now=1.0)  # no speed yet: not counted
    end = p.end(0, round_tokens=1000, now=10.0)
    assert end == pytest.approx(10.0 + PACE_SLACK * 1000 / 200.0)
    p.heard(4, 1000.0, now=11.0)  # a faster volunteer later does not move a fixed end
    assert p.end(0, 1000, now=12.0) == end and p.paced(0)
    assert p.end(1, 1000, now=20.0) == pytest.approx(20.0 + PACE_SLACK * 1000 / 1000.0)


def test_no_pace_without_overlap_or_two_recent_speeds():
    assert Pacer(overlap=False, round_seconds=60.0).end(0, 1000, now=0.0) is None
    p = Pacer(overlap=True, round_seconds=60.0)
    p.heard(1, 100.0, now=0.0)
    assert p.end(0, 1000, now=1.0) is None and not p.paced(0)  # one speed is not a pace
    p.heard(2, 100.0, now=0.0)
    later = RATE_WINDOW * 60.0 + 1.0  # both speeds too old by then
    assert p.end(0, 1000, now=later) is None
    assert p.end(0, 1000, now=1.0) is not None and p.paced(0)


def test_old_rounds_ends_are_dropped():
    p = Pacer(overlap=True, round_seconds=60.0)
    p.heard(1, 100.0, now=0.0)
    p.heard(2, 100.0, now=0.0)
    for rnd in range(6):
        p.end(rnd, 1000, now=float(rnd))
    assert sorted(p.ends) == [3, 4, 5]
