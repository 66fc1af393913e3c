"""The HTTP layer over the real app (in-process ASGI client): status codes and messages."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from swarm_helpers import copy_run, payload

from crowdtrain.coordinator.rules import Coordinator
from crowdtrain.coordinator.server import create_app
from crowdtrain.wire import protocol


@pytest.fixture
def client(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=5, rounds=2, round_seconds=60)
    coord = Coordinator(run, evaluate_rounds=False)
    with TestClient(create_app(coord)) as c:
        c.coord = coord
        yield c


def join(client, name="alice"):
    r = client.post(protocol.JOIN, json={"name": name, "device": "cpu", "api_version": 1})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def test_info_docs_and_openapi(client):
    info = protocol.RunInfo.model_validate(client.get(protocol.INFO).json())
    assert info.preset == "tiny" and info.round == 0 and info.schedule.codec == "int8"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for p in (protocol.INFO, protocol.JOIN, protocol.LEASE, protocol.SUBMIT, protocol.STATUS):
        assert p in paths


def test_old_worker_is_told_to_upgrade(client):
    r = client.get(protocol.INFO, headers={protocol.API_HEADER: "0"})
    assert r.status_code == 426 and "upgrade" in r.json()["detail"]
    r = client.post(protocol.JOIN, json={"name": "x", "device": "cpu", "api_version": 99})
    assert r.status_code == 426 and "pip install -U crowdtrain" in r.json()["detail"]


def test_an_int4_run_takes_only_workers_that_speak_int4(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run4", codec="int4", rounds=2)
    with TestClient(create_app(Coordinator(run, evaluate_rounds=False))) as c:
        r = c.get(protocol.INFO, headers={protocol.API_HEADER: "1"})
        assert r.status_code == 426 and "API v2..v" in r.json()["detail"]
        r = c.post(protocol.JOIN, json={"name": "old", "device": "cpu", "api_version": 1})
        assert r.status_code == 426
        info = c.get(protocol.INFO, headers={protocol.API_HEADER: str(protocol.API_VERSION)})
        schedule = protocol.RunInfo.model_validate(info.json()).schedule
        assert (schedule.codec, schedule.block) == ("int4", 64)
        r = c.post(protocol.JOIN, json={"name": "new", "device": "cpu", "api_version": 2})
        assert r.status_code == 200


def test_a_sparse_run_takes_only_workers_of_api_v3_and_tells_them_k_and_bits(tiny_run,
                                                                             tmp_path):
    run = copy_run(tiny_run, tmp_path / "runs", codec="sparse", sparse_density=0.02,
                   sparse_bits=4, rounds=2, sparse_ef_decay=1.0)  # plain error feedback: v3
    decayed = copy_run(tiny_run, tmp_path / "decayed", codec="sparse", rounds=2)
    with TestClient(create_app(Coordinator(decayed, evaluate_rounds=False))) as c:
        r = c.get(protocol.INFO, headers={protocol.API_HEADER: "3"})  # its feedback decays: v4
        assert r.status_code == 426 and "API v4..v" in r.json()["detail"], r.text
    with TestClient(create_app(Coordinator(run, evaluate_rounds=False))) as c:
        for old in ("1", "2"):  # a v2 worker speaks int4 but not the sparse codec
            r = c.get(protocol.INFO, headers={protocol.API_HEADER: old})
            assert r.status_code == 426 and "API v3..v" in r.json()["detail"], r.text
            assert "pip install -U crowdtrain" in r.json()["detail"]
        r = c.post(protocol.JOIN, json={"name": "old", "device": "cpu", "api_version": 2})
        assert r.status_code == 426 and "your worker speaks v2" in r.json()["detail"]
        info = c.get(protocol.INFO, headers={protocol.API_HEADER: str(protocol.API_VERSION)})
        schedule = protocol.RunInfo.model_validate(info.json()).schedule
        assert (schedule.codec, schedule.block, schedule.sparse_k, schedule.sparse_bits) == (
            "sparse", 4096, 82, 4)
        r = c.post(protocol.JOIN, json={"name": "new", "device": "cpu", "api_version": 3})
        assert r.status_code == 200
    assert protocol.min_api_version("sparse") == 3 < protocol.API_VERSION
    assert protocol.min_api_version("int8") == 1 and protocol.min_api_version("int4") == 2
    # a chat run's loss masks came with v4: an older worker would train on every token
    assert protocol.min_api_version("int8", masked=True) == 4 < protocol.API_VERSION
    # and the sparse codec's decayed error feedback (a v3 worker would keep plain feedback)
    assert protocol.min_api_version("sparse", sparse_ef_decay=0.95) == 4
    assert protocol.min_api_version("sparse", sparse_ef_decay=1.0) == 3


def test_auth_and_input_validation(client):
    assert client.post(protocol.LEASE, json={}).status_code == 401
    r = client.post(protocol.LEASE, json={}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and "join again" in r.json()["detail"]
    r = client.post(protocol.JOIN, json={"name": "<script>", "device": "cpu", "api_version": 1})
    assert r.status_code == 422


def test_full_exchange_and_size_limit(client):
    h = join(client)
    lease = protocol.LeaseResponse.model_validate(
        client.post(protocol.LEASE, json={}, headers=h).json()).lease
    model = client.get(protocol.MODEL, headers=h)
    assert model.status_code == 200 and model.headers[protocol.ROUND_HEADER] == "0"
    shard = client.get(protocol.SHARD.format(sha256="0" * 64), headers=h)
    assert shard.status_code == 404
    big = b"\0" * (client.coord.upload_limit + 1)
    r = client.post(protocol.SUBMIT.format(lease_id=lease.lease_id), content=big, headers=h)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
    r = client.post(protocol.SUBMIT.format(lease_id=lease.lease_id), content=b"junk", headers=h)
    assert r.status_code == 422 and "invalid payload" in r.json()["detail"]
    blob = payload(lease, client.coord.shapes)
    r = client.post(protocol.SUBMIT.format(lease_id=lease.lease_id), content=blob, headers=h)
    assert r.status_code == 200 and r.json()["accepted"]
    client.coord.tick()
    upd = client.get(protocol.UPDATE.format(round=0), headers=h)
    assert upd.status_code == 200 and len(upd.content) < 1.1 * client.coord.params + 4096
    r = client.get(protocol.UPDATE.format(round=5), headers=h)
    assert r.status_code == 404 and "not closed yet" in r.json()["detail"]
    st = protocol.Status.model_validate(client.get(protocol.STATUS).json())
    assert st.round == 1 and st.rounds[0].contributions == 1
    assert st.rounds[0].bytes_in == len(blob) and st.rounds[0].bytes_out >= len(model.content)
    assert st.volunteers[0].name == "alice" and st.volunteers[0].accepted == 1
