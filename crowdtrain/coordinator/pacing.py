"""The pace of an overlapped run's rounds: how fast the volunteers are, and when each round's
leases end their training.

Overlapped, the fast volunteers train the next round while the open one closes, so nobody
should hold a round back: the first lease on a round fixes when every lease of it ends
(`Pacer.end`), at PACE_SLACK x the time the fastest volunteer seen lately needs for the
round's H steps. A slower volunteer then trains fewer steps and sends them when the fastest
does; one that got its lease late (it was still sending) catches up. A round whose leases
were given before two speeds were known (round 0, or the first round after a restart: the
speeds live in memory only) is *unpaced*: its leases are asked to finish once its first
contribution is in (`Coordinator._finish_unpaced`).

Speeds are what lease requests report (`LeaseRequest.tokens_per_s`); stop-and-wait runs are
never paced. No I/O and no clock of its own (the caller passes `now`), so it tests alone.
"""

from __future__ import annotations

# a round's leases end their training PACE_SLACK x the time the fastest volunteer that asked
# for a lease in the last RATE_WINDOW x round_seconds needs for the round's H steps, after the
# round's first lease
PACE_SLACK = 1.15
RATE_WINDOW = 3.0
KEPT_ROUNDS = 3  # paced ends kept: the open round, the one ahead, and one before


class Pacer:
    """Volunteers' recent speeds and the rounds' paced ends of one run."""

    def __init__(self, overlap: bool, round_seconds: float):
        self.overlap, self.round_seconds = overlap, round_seconds
        self.rates: dict[int, tuple[float, float]] = {}  # volunteer -> (tokens/s, when)
        self.ends: dict[int, float] = {}  # round -> when its leases' training ends

    def heard(self, volunteer: int, tokens_per_s: float | None, now: float) -> None:
        """A volunteer's reported speed (ignored when it has none yet)."""
        if tokens_per_s:
            self.rates[volunteer] = (tokens_per_s, now)

    def end(self, rnd: int, round_tokens: int, now: float) -> float | None:
        """When round `rnd`'s leases end their training (`round_tokens`: the tokens of its H
        steps for one volunteer): fixed by the first call for the round. None: not paced
        (stop-and-wait, or fewer than two volunteers' speeds heard lately)."""
        if not self.overlap:
            return None
        if rnd not in self.ends:
            recent = [rate for rate, at in self.rates.values()
                      if now - at < RATE_WINDOW * self.round_seconds]
            if len(recent) < 2:
                return None
            self.ends[rnd] = now + PACE_SLACK * round_tokens / max(recent)
            for old in [r for r in self.ends if r < rnd - KEPT_ROUNDS + 1]:
                del self.ends[old]
        return self.ends[rnd]

    def paced(self, rnd: int) -> bool:
        """Whether round `rnd`'s leases were given a paced end."""
        return rnd in self.ends
