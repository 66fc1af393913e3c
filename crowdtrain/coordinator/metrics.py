"""Prometheus metrics of a run, rendered from one `Status` snapshot at scrape time.

`metrics_text(status)` is a pure function: it builds a fresh registry with one custom collector
over the snapshot and returns the text exposition format. Nothing is kept between scrapes,
so counters are totals recomputed from the ledger (monotonic because the ledger only grows).
Every metric name starts with `crowdtrain_`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crowdtrain.wire.protocol import RoundSummary, Status

ACTIVE_SECONDS = 120.0
"""A volunteer seen by the coordinator within this many seconds counts as active."""


def latest_val_loss(status: Status) -> float | None:
    """Held-out loss of the newest evaluated model (the initial one if no other is)."""
    for r in reversed(status.rounds):
        if r.val_loss is not None:
            return r.val_loss
    return status.initial_val_loss


def round_tokens_per_s(r: RoundSummary) -> float | None:
    """Swarm throughput of a closed round: its tokens over its wall-clock duration."""
    if r.closed_at is None or r.closed_at <= r.opened_at:
        return None
    return r.tokens / (r.closed_at - r.opened_at)


def last_closed(status: Status) -> RoundSummary | None:
    closed = [r for r in status.rounds if r.state == "closed" and r.closed_at is not None]
    return closed[-1] if closed else None


def active_volunteers(status: Status, now: float | None = None) -> int:
    now = time.time() if now is None else now
    return sum(1 for v in status.volunteers
               if v.last_seen is not None and now - v.last_seen <= ACTIVE_SECONDS)


class StatusCollector(Collector):
    """Turns one Status snapshot into metric families."""

    def __init__(self, status: Status, now: float | None = None) -> None:
        self.status = status
        self.now = time.time() if now is None else now

    def collect(self) -> Iterator[Metric]:
        st = self.status
        info = GaugeMetricFamily("crowdtrain_run_info", "The run this coordinator hosts",
                                 labels=["run_name", "api_version"])
        info.add_metric([st.run_name, str(st.api_version)], 1)
        yield info
        yield GaugeMetricFamily("crowdtrain_params", "Parameters of the model", value=st.params)
        yield GaugeMetricFamily("crowdtrain_round", "The round now open (the last one when "
                                "finished)", value=st.round)
        yield GaugeMetricFamily("crowdtrain_finished", "1 once the run has finished",
                                value=int(st.finished))
        yield CounterMetricFamily("crowdtrain_rounds_closed", "Rounds closed so far",
                                  value=sum(r.state == "closed" for r in st.rounds))
        contrib = CounterMetricFamily("crowdtrain_contributions",
                                      "Contributions received, by outcome", labels=["outcome"])
        contrib.add_metric(["accepted"], sum(v.accepted for v in st.volunteers))
        contrib.add_metric(["refused"], sum(v.refused for v in st.volunteers))
        yield contrib
        yield CounterMetricFamily("crowdtrain_bytes_in", "Bytes of contributions received "
                                  "(closed rounds)", value=sum(r.bytes_in for r in st.rounds))
        yield CounterMetricFamily("crowdtrain_bytes_out", "Bytes sent to workers (models, "
                                  "updates, shards)", value=sum(r.bytes_out for r in st.rounds))
        yield CounterMetricFamily("crowdtrain_tokens_trained", "Tokens of accepted "
                                  "contributions", value=sum(v.tokens for v in st.volunteers))
        yield GaugeMetricFamily("crowdtrain_volunteers", "Volunteers that ever joined",
                                value=len(st.volunteers))
        yield GaugeMetricFamily(
            "crowdtrain_volunteers_active",
            f"Volunteers seen within the last {ACTIVE_SECONDS:.0f} s",
            value=active_volunteers(st, self.now))
        val = latest_val_loss(st)
        if val is not None:
            yield GaugeMetricFamily("crowdtrain_val_loss", "Held-out validation loss of the "
                                    "newest evaluated model", value=val)
        last = last_closed(st)
        tps = round_tokens_per_s(last) if last is not None else None
        if tps is not None:
            yield GaugeMetricFamily("crowdtrain_swarm_tokens_per_second", "Tokens per second "
                                    "of the whole swarm in the last closed round", value=tps)
        if st.round_deadline is not None:
            yield GaugeMetricFamily("crowdtrain_round_deadline_seconds", "Unix time the open "
                                    "round closes at the latest", value=st.round_deadline)


def metrics_text(status: Status, now: float | None = None) -> bytes:
    """The Prometheus text exposition of `status`; `now` (unix time) defaults to the clock."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status, now))
    return generate_latest(registry)
