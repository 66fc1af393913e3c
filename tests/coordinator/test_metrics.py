"""Prometheus metrics (crowdtrain/coordinator/metrics.py) and the web routes
(crowdtrain/coordinator/dashboard.py): names and values for a hand-built Status, and /metrics,
/ and the static files through the real app."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from swarm_helpers import copy_run

from crowdtrain.coordinator.metrics import metrics_text
from crowdtrain.coordinator.rules import Coordinator
from crowdtrain.coordinator.server import create_app
from crowdtrain.wire.protocol import Refusal, RoundSummary, Status, VolunteerSummary

NOW = 1_700_000_000.0


def status(**over) -> Status:
    rounds = [
        RoundSummary(round=0, state="closed", opened_at=NOW - 100, closed_at=NOW - 90,
                     contributions=2, refused=1, tokens=2000, train_loss=5.2, val_loss=5.5,
                     bytes_in=300, bytes_out=700),
        RoundSummary(round=1, state="closed", opened_at=NOW - 90, closed_at=NOW - 85,
                     contributions=2, refused=0, tokens=1500, train_loss=4.9, val_loss=5.0,
                     bytes_in=200, bytes_out=400),
        RoundSummary(round=2, state="open", opened_at=NOW - 85, closed_at=None, contributions=0,
                     refused=0, tokens=0, train_loss=None, val_loss=None, bytes_in=0,
                     bytes_out=50),
    ]
    vols = [
        VolunteerSummary(name="alice", device="cpu", last_seen=NOW - 10, rounds=2, tokens=2500,
                         accepted=3, refused=0, tokens_per_s=410.0),
        VolunteerSummary(name="bob", device="cuda", last_seen=NOW - 500, rounds=1, tokens=1000,
                         accepted=1, refused=1, tokens_per_s=None),
        VolunteerSummary(name="carol", device=None, last_seen=None, rounds=0, tokens=0,
                         accepted=0, refused=0, tokens_per_s=None),
    ]
    fields = dict(api_version=1, run_name="demo", round=2, finished=False, params=1_000_000,
                  payload_bytes=1_010_000, full_model_bytes=4_000_000, rounds=rounds,
                  volunteers=vols, initial_val_loss=5.5, round_deadline=NOW + 30,
                  refusals=[Refusal(round=0, volunteer="bob", reason="stale lease", at=NOW - 95)])
    return Status(**{**fields, **over})


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_names_and_values():
    text = metrics_text(status(), now=NOW)
    fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert all(name.startswith("crowdtrain_") for name in fams)
    types = {name: f.type for name, f in fams.items()}
    assert types["crowdtrain_rounds_closed"] == "counter"
    assert types["crowdtrain_contributions"] == "counter"
    assert types["crowdtrain_bytes_in"] == types["crowdtrain_bytes_out"] == "counter"
    assert types["crowdtrain_tokens_trained"] == "counter"
    assert types["crowdtrain_round"] == types["crowdtrain_volunteers_active"] == "gauge"
    assert types["crowdtrain_val_loss"] == types["crowdtrain_swarm_tokens_per_second"] == "gauge"
    v = samples(text)
    assert v[("crowdtrain_rounds_closed_total", ())] == 2
    assert v[("crowdtrain_round", ())] == 2
    assert v[("crowdtrain_contributions_total", (("outcome", "accepted"),))] == 4
    assert v[("crowdtrain_contributions_total", (("outcome", "refused"),))] == 1
    assert v[("crowdtrain_bytes_in_total", ())] == 500
    assert v[("crowdtrain_bytes_out_total", ())] == 1150
    assert v[("crowdtrain_tokens_trained_total", ())] == 3500
    assert v[("crowdtrain_volunteers_active", ())] == 1  # alice: 10 s ago; bob: 500 s ago
    assert v[("crowdtrain_volunteers", ())] == 3
    assert v[("crowdtrain_val_loss", ())] == pytest.approx(5.0)  # newest evaluated round
    assert v[("crowdtrain_swarm_tokens_per_second", ())] == pytest.approx(1500 / 5)
    assert v[("crowdtrain_finished", ())] == 0
    assert v[("crowdtrain_params", ())] == 1_000_000
    assert v[("crowdtrain_run_info", (("api_version", "1"), ("run_name", "demo")))] == 1


def test_metrics_of_a_fresh_run_omit_what_is_unknown():
    text = metrics_text(status(rounds=[], volunteers=[], refusals=[], initial_val_loss=None,
                               round=0, round_deadline=None), now=NOW)
    names = {f.name for f in text_string_to_metric_families(text.decode())}
    assert "crowdtrain_val_loss" not in names
    assert "crowdtrain_swarm_tokens_per_second" not in names
    v = samples(text)
    assert v[("crowdtrain_rounds_closed_total", ())] == 0
    assert v[("crowdtrain_contributions_total", (("outcome", "refused"),))] == 0
    assert v[("crowdtrain_volunteers_active", ())] == 0
    # with only the initial model evaluated, that is the latest held-out loss
    v = samples(metrics_text(status(rounds=[], volunteers=[]), now=NOW))
    assert v[("crowdtrain_val_loss", ())] == pytest.approx(5.5)


@pytest.fixture
def client(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=5, rounds=2, round_seconds=60)
    coord = Coordinator(run, evaluate_rounds=False)
    with TestClient(create_app(coord)) as c:
        yield c


def test_metrics_endpoint(client):
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    v = samples(r.content)
    assert v[("crowdtrain_round", ())] == 0
    assert v[("crowdtrain_rounds_closed_total", ())] == 0
    assert v[("crowdtrain_params", ())] > 0
    assert "/metrics" in client.get("/openapi.json").json()["paths"]


def test_dashboard_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'src="dashboard/app.js"' in r.text and "dashboard/style.css" in r.text
    js = client.get("/dashboard/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "v1/status" in js.text
    css = client.get("/dashboard/style.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert client.get("/dashboard/nope.js").status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/dashboard/{file}" not in paths


@pytest.mark.parametrize("path", [
    "/dashboard/../server.py",
    "/dashboard/..%2Fserver.py",
    "/dashboard/%2E%2E/server.py",
    "/dashboard/%2E%2E%2Fserver.py",
    "/dashboard/..%2F..%2Fpyproject.toml",
    "/dashboard/%2Fetc%2Fpasswd",
    "/dashboard/%2E%2E",
    "/dashboard/.",
])
def test_static_files_cannot_escape_the_dashboard_folder(client, path):
    r = client.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert "create_app" not in r.text and "root:" not in r.text and "[project]" not in r.text
