"""Round schedules of a DiLoCo run, as a pure function: how many inner steps each round asks
for (H fixed, or growing over the run at the same total).

Both the coordinator (leases, checkpoint step counts) and the benchmarks' simulator use it, so
what is measured is what runs.
"""

from __future__ import annotations


def inner_steps_schedule(total: int, rounds: int, growth: float = 1.0) -> list[int]:
    """`rounds` positive integers summing to `total`, geometric from first to last with
    last / first ~= `growth` (1.0: all equal, the remainder spread over the last rounds).

    A growing H spends more synchronisations early, when the model changes fastest and the
    workers' models drift apart most per step, and fewer later, at the same total bytes."""
    if rounds < 1 or total < rounds:
        raise ValueError(f"need 1 <= rounds <= total, got rounds={rounds}, total={total}")
    if not growth >= 1.0:
        raise ValueError(f"growth must be >= 1, got {growth}")
    q = growth ** (1.0 / (rounds - 1)) if rounds > 1 else 1.0
    weights = [q ** i for i in range(rounds)]
    scale = total / sum(weights)
    out = [max(1, int(w * scale)) for w in weights]
    i = rounds - 1
    while sum(out) < total:  # hand out the rounding remainder from the last round backwards
        out[i] += 1
        i = i - 1 if i > 0 else rounds - 1
    while sum(out) > total:  # only when max(1, .) lifted early rounds: take from the largest
        out[out.index(max(out))] -= 1
    return out
