"""Access control: invite-only runs, the owner's admin token, bans, ending a run, rate limits,
implausible throughput flagged. Coordinator rules directly, then through the real app."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from swarm_helpers import copy_run, payload

from crowdtrain.cli.admin import run_admin
from crowdtrain.coordinator.ratelimit import RateLimiter
from crowdtrain.coordinator.rules import Coordinator
from crowdtrain.coordinator.server import create_app
from crowdtrain.errors import CrowdtrainError, Refused
from crowdtrain.wire import protocol
from crowdtrain.wire.protocol import JoinRequest, LeaseRequest


@pytest.fixture
def make(tiny_run, tmp_path):
    made = []

    def factory(**swarm):
        run = copy_run(tiny_run, tmp_path / f"run{len(made)}",
                       **{"inner_steps": 5, "rounds": 3, "round_seconds": 60, **swarm})
        made.append(Coordinator(run, evaluate_rounds=False))
        return made[-1]

    yield factory
    for c in made:
        c.close()


def join(coord, name="alice", invite=None):
    return coord.join(JoinRequest(name=name, device="cpu", api_version=1, invite=invite))


def test_invite_only_run(make):
    coord = make(access="invite")
    with pytest.raises(Refused, match="invite-only") as e:
        join(coord)
    assert e.value.status == 403
    key = coord.ledger.add_invite(uses=2)
    join(coord, "a", key)
    join(coord, "b", key)
    with pytest.raises(Refused, match="used up"):
        join(coord, "c", key)
    with pytest.raises(Refused, match="unknown"):
        join(coord, "d", "made-up-key")
    assert key not in str([dict(r) for r in coord.ledger.query("SELECT * FROM invites")])


def test_admin_token_is_shown_once_and_stored_hashed(make):
    coord = make()
    token = coord.new_admin_token()
    assert token and coord.new_admin_token() is None
    assert token not in str([dict(r) for r in coord.ledger.query("SELECT * FROM meta")])
    coord.check_admin(token)
    with pytest.raises(Refused) as e:
        coord.check_admin(token + "x")
    assert e.value.status == 403
    rotated = coord.new_admin_token(rotate=True)
    with pytest.raises(Refused):
        coord.check_admin(token)
    coord.check_admin(rotated)


def test_ban_and_end_through_http(make):
    coord = make()
    token = coord.new_admin_token()
    admin = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(coord)) as c:
        vol = c.post(protocol.JOIN, json={"name": "mallory", "device": "cpu", "api_version": 1})
        h = {"Authorization": f"Bearer {vol.json()['token']}"}
        assert c.post(protocol.LEASE, json={}, headers=h).json()["status"] == "lease"
        assert c.get(protocol.ADMIN_VOLUNTEERS).status_code == 401
        assert c.get(protocol.ADMIN_VOLUNTEERS, headers=h).status_code == 403
        listed = c.get(protocol.ADMIN_VOLUNTEERS, headers=admin).json()
        assert [v["name"] for v in listed] == ["mallory"] and not listed[0]["banned"]
        r = c.post(protocol.ADMIN_BAN.format(who="mallory"), headers=admin)
        assert r.status_code == 200 and "banned" in r.json()["message"]
        r = c.post(protocol.LEASE, json={}, headers=h)
        assert r.status_code == 403 and "banned" in r.json()["detail"]
        assert c.post(protocol.ADMIN_BAN.format(who="nobody"), headers=admin).status_code == 404
        c.post(protocol.ADMIN_UNBAN.format(who="1"), headers=admin)
        assert c.post(protocol.LEASE, json={}, headers=h).status_code == 200
        assert c.post(protocol.ADMIN_END, headers=admin).status_code == 200
        done = c.post(protocol.LEASE, json={}, headers=h).json()
        assert done["status"] == "done" and "owner ended the run" in done["message"]
        assert c.get(protocol.STATUS).json()["finished"]


def test_admin_command_on_the_run_directory(make, capsys):
    from crowdtrain.cli.main import main

    coord = make()
    eve = join(coord, "eve")
    assert "eve" in run_admin(str(coord.run.dir), "list")
    assert "banned" in run_admin(str(coord.run.dir), "ban", "eve")
    with pytest.raises(Refused, match="banned") as e:
        coord.authenticate(eve.token)
    assert e.value.status == 403
    with pytest.raises(CrowdtrainError, match="needs a volunteer"):
        run_admin(str(coord.run.dir), "ban")
    with pytest.raises(CrowdtrainError, match="needs --token"):
        run_admin("http://127.0.0.1:1", "list")
    assert main(["admin", str(coord.run.dir), "end"]) == 0
    assert coord.finished and "ended" in capsys.readouterr().out
    assert main(["invite", str(coord.run.dir), "--uses", "3"]) == 0
    assert "crowdtrain join URL --invite" in capsys.readouterr().out


def test_rate_limiter_with_a_fake_clock():
    now = [0.0]
    rl = RateLimiter(rate=0.5, burst=2, clock=lambda: now[0])
    assert rl.allow("a") == 0 and rl.allow("a") == 0
    assert rl.allow("a") == pytest.approx(2.0)
    assert rl.allow("b") == 0  # keys are independent
    now[0] = 2.0
    assert rl.allow("a") == 0 and rl.allow("a") > 0


def test_joins_from_one_address_are_rate_limited(make):
    coord = make()
    with TestClient(create_app(coord)) as c:
        codes = [c.post(protocol.JOIN, json={"name": f"s{i}", "device": "cpu",
                                             "api_version": 1}).status_code for i in range(12)]
    assert codes[:10] == [200] * 10 and codes[10] == 429


def test_implausible_throughput_is_flagged(make):
    coord = make(inner_steps=5, rounds=10)
    resp = join(coord)
    vol = coord.authenticate(resp.token)
    for i in range(5):
        lease = coord.lease(vol, LeaseRequest()).lease
        fast = i == 4
        blob = payload(lease, coord.shapes, tokens=1000, seed=i,
                       **({"seconds": 0.001} if fast else {}))
        coord.submit(vol, lease.lease_id, blob)
        assert coord.tick()
    notes = [r["reason"] for r in coord.ledger.accepted(4)]
    assert notes[0] and notes[0].startswith("flagged: throughput")
    assert all(r["reason"] is None for r in coord.ledger.accepted(1))
