"""Coordinator rules, called directly (no HTTP): leases, validation, rounds, restarts."""

from __future__ import annotations

import time

import pytest
import torch
from swarm_helpers import copy_run, make_delta, payload, poisoned_payload

from crowdtrain.coordinator.pacing import Pacer
from crowdtrain.coordinator.rules import Coordinator
from crowdtrain.errors import Refused
from crowdtrain.run.checkpoint import list_checkpoints, load_checkpoint
from crowdtrain.wire import codecs
from crowdtrain.wire.outer import apply_update
from crowdtrain.wire.protocol import Alive, JoinRequest, LeaseRequest


@pytest.fixture
def coord(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=5, rounds=3, round_seconds=60)
    c = Coordinator(run, evaluate_rounds=False)
    yield c
    c.close()


@pytest.fixture
def overlapped(tiny_run, tmp_path):
    """The `coord` run with overlapped rounds (`init --overlap`)."""
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=5, rounds=3, round_seconds=60,
                   overlap=True)
    c = Coordinator(run, evaluate_rounds=False)
    yield c
    c.close()


def volunteer(coord, name="alice"):
    resp = coord.join(JoinRequest(name=name, device="cpu", api_version=1))
    return coord.authenticate(resp.token)


def lease(coord, vol):
    r = coord.lease(vol, LeaseRequest())
    assert r.status == "lease", r
    return r.lease


def test_join_stores_only_a_hash_of_the_token(coord):
    resp = coord.join(JoinRequest(name="alice", device="cpu", api_version=1))
    row = coord.ledger.query("SELECT * FROM volunteers")[0]
    assert resp.token not in str(dict(row)) and len(row["token_hash"]) == 64
    assert coord.authenticate(resp.token).name == "alice"
    with pytest.raises(Refused) as e:
        coord.authenticate("not-a-token")
    assert e.value.status == 401


def test_leases_spread_shards_and_follow_the_schedule(coord):
    a, b = volunteer(coord, "a"), volunteer(coord, "b")
    la, lb = lease(coord, a), lease(coord, b)
    assert la.round == lb.round == 0 and la.start_step == 0 and la.max_steps == 5
    assert la.shards != lb.shards and la.seed != lb.seed
    assert 0 < la.seconds < la.deadline_in <= 60


def test_round_closes_when_every_leased_worker_reported_and_is_bit_exact(coord):
    a, b = volunteer(coord, "a"), volunteer(coord, "b")
    la, lb = lease(coord, a), lease(coord, b)
    theta0 = {k: v.clone() for k, v in coord.theta.items()}
    coord.submit(a, la.lease_id, payload(la, coord.shapes, tokens=1000, seed=1))
    assert not coord.tick(), "b still holds an open lease"
    coord.submit(b, lb.lease_id, payload(lb, coord.shapes, tokens=2000, seed=2))
    assert coord.tick() and coord.round == 1
    # theta_1 is exactly theta_0 + dequant(published update 0), as a worker computes it
    blob = coord.run.update_path(0).read_bytes()
    upd, _ = codecs.from_bytes(blob, coord.shapes)
    replay = apply_update(theta0, upd)
    ck = load_checkpoint(coord.run.ckpt_dir, 1)
    assert all(torch.equal(replay[k], ck.tensors[k]) for k in replay)
    assert all(torch.equal(replay[k], coord.theta[k]) for k in replay)
    # the first outer step with Nesterov is -lr * (1 + momentum) * token-weighted mean
    mean = {k: (make_delta(coord.shapes, seed=1)[k] * 1 + make_delta(coord.shapes, seed=2)[k]
                * 2) / 3 for k in coord.shapes}
    k = "model.embed_tokens.weight"
    expect = theta0[k] - 0.7 * 1.9 * mean[k]
    assert torch.allclose(ck.tensors[k], expect, atol=2e-4)
    row = coord.ledger.round_row(0)
    assert row["state"] == "closed" and row["contributions"] == 2 and row["tokens"] == 3000


def test_refusals_are_precise_recorded_and_change_nothing(coord):
    a, b = volunteer(coord, "a"), volunteer(coord, "b")
    la, lb = lease(coord, a), lease(coord, b)
    good = payload(la, coord.shapes)
    cases = [
        (a, 999, good, 404, "unknown lease 999"),
        (b, la.lease_id, good, 403, "belongs to another volunteer"),
        (a, la.lease_id, b"garbage", 422, "invalid payload"),
        (a, la.lease_id, poisoned_payload(la, coord.shapes, "model.norm.weight"), 422,
         "model.norm.weight"),
        (a, la.lease_id, payload(la, coord.shapes, delta={
            k: v for k, v in make_delta(coord.shapes).items() if k != "model.norm.weight"}),
         422, "missing"),
        (a, la.lease_id, payload(la, coord.shapes, round=5), 422, "not lease"),
        (a, la.lease_id, payload(la, coord.shapes, codec="fp16"), 422, "not this run's 'int8'"),
        (a, la.lease_id, payload(la, coord.shapes, tokens=0), 422, "no tokens"),
    ]
    for vol, lid, blob, status, reason in cases:
        with pytest.raises(Refused) as e:
            coord.submit(vol, lid, blob)
        assert e.value.status == status and reason in e.value.reason, (reason, e.value.reason)
    assert coord.round == 0 and coord.ledger.accepted(0) == []
    coord.submit(a, la.lease_id, good)
    with pytest.raises(Refused, match="already has an accepted") as e:
        coord.submit(a, la.lease_id, good)
    with pytest.raises(Refused, match="replayed payload"):
        coord.submit(b, lb.lease_id, good)
    refused = [r for r in coord.ledger.contributions() if r["status"] == "refused"]
    assert len(refused) == len(cases) + 2 and all(r["reason"] for r in refused)
    # every upload was spooled to disk and checked from there: the accepted one became the
    # stored contribution, byte for byte; nothing refused was left behind
    stored = coord.run.dir / coord.ledger.accepted(0)[0]["path"]
    assert stored.read_bytes() == good
    assert list(coord.run.spool_dir.iterdir()) == []


def test_a_half_received_upload_does_not_survive_a_restart(coord, tiny_run):
    path, f = coord.spool()
    with f:
        f.write(b"the first half of an upload when the coordinator was killed")
    assert path.exists()
    again = Coordinator(coord.run, evaluate_rounds=False)
    assert list(again.run.spool_dir.iterdir()) == []


def test_late_contribution_is_applied_in_the_next_round_at_the_stale_weight(coord):
    """The staleness rule: work whose round closed while its lease was still open goes into
    the next round at `stale_weight` of its weight, with the reason in the ledger."""
    a, b = volunteer(coord, "a"), volunteer(coord, "b")
    la, lb = lease(coord, a), lease(coord, b)
    coord.submit(a, la.lease_id, payload(la, coord.shapes))
    coord.ledger.extend_round(0, time.time() - 1)  # the deadline passes; b never reported
    assert coord.tick() and coord.round == 1
    r = coord.submit(b, lb.lease_id, payload(lb, coord.shapes, tokens=1000, seed=3))
    assert r.accepted and r.round == 1
    row = coord.ledger.accepted(1)[0]
    assert row["lease_id"] == lb.lease_id and row["weight"] == 0.5 * 1000
    assert row["reason"].startswith("late: trained for round 0, which closed before it arrived")
    assert [x["lease_id"] for x in coord.ledger.accepted(0)] == [la.lease_id]


def test_work_two_rounds_late_or_with_stale_weight_0_is_refused_as_stale(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=5, rounds=4, round_seconds=60,
                   stale_weight=0.0)
    coord = Coordinator(run, evaluate_rounds=False)
    try:
        a, b = volunteer(coord, "a"), volunteer(coord, "b")
        la, lb = lease(coord, a), lease(coord, b)
        coord.submit(a, la.lease_id, payload(la, coord.shapes))
        coord.ledger.extend_round(0, time.time() - 1)
        assert coord.tick() and coord.round == 1
        with pytest.raises(Refused, match="stale: round 0 closed") as e:
            coord.submit(b, lb.lease_id, payload(lb, coord.shapes, seed=3))
        assert e.value.status == 409
        refusal = coord.ledger.latest_refusals()[0]
        assert refusal["reason"].startswith("stale: round 0 closed")
    finally:
        coord.close()
    coord = Coordinator(copy_run(tiny_run, tmp_path / "run2", inner_steps=5, rounds=4,
                                 round_seconds=60), evaluate_rounds=False)
    try:
        a, b = volunteer(coord, "a"), volunteer(coord, "b")
        la, lb = lease(coord, a), lease(coord, b)
        for _ in range(2):  # two rounds close without b
            coord.submit(a, la.lease_id, payload(la, coord.shapes, seed=coord.round + 5))
            coord.ledger.extend_round(coord.round, time.time() - 1)
            assert coord.tick()
            if coord.round < 2:
                la = lease(coord, a)
        assert coord.round == 2
        with pytest.raises(Refused, match="stale: round 0 closed"):
            coord.submit(b, lb.lease_id, payload(lb, coord.shapes, seed=3))
    finally:
        coord.close()


def test_a_volunteer_that_sent_its_work_gets_a_lease_on_the_next_round_at_once(overlapped):
    """Overlapped rounds: after sending round r's work (or while uploading it) a worker that
    asks `ahead` gets round r+1's lease before round r closes; its work goes into round r+1;
    nobody gets two rounds ahead."""
    coord = overlapped
    a, b = volunteer(coord, "a"), volunteer(coord, "b")
    la, lb = lease(coord, a), lease(coord, b)
    assert not la.ahead
    # still uploading round 0's work: it counts as sent
    r = coord.lease(a, LeaseRequest(ahead=True, sending=la.lease_id))
    assert r.status == "lease" and r.lease.ahead and r.lease.round == 1
    assert r.lease.start_step == 5 and r.lease.max_steps == 5  # the schedule one round on
    assert coord.ledger.lease(la.lease_id)["state"] == "open"  # not voided by the new lease
    coord.submit(a, la.lease_id, payload(la, coord.shapes))
    a1 = r.lease
    assert coord.lease(b, LeaseRequest(ahead=True)).lease.round == 0  # b has not sent
    lb = coord.ledger.leases_of_round(0, "open")[0]  # b's lease again (a restarted worker's)
    assert not coord.tick() and coord.round == 0  # b's lease is open
    done = coord.submit(a, a1.lease_id, payload(a1, coord.shapes, seed=7))
    assert done.round == 1 and [x["lease_id"] for x in coord.ledger.accepted(1)] == [a1.lease_id]
    w = coord.lease(a, LeaseRequest(ahead=True))  # rounds 0 and 1 sent: wait for 0 to close
    assert w.status == "wait" and "rounds 0 and 1 are in" in w.message
    lb_lease = coord.lease(b, LeaseRequest(resume=lb["id"])).lease
    coord.submit(b, lb_lease.lease_id, payload(lb_lease, coord.shapes, seed=3))
    assert coord.tick() and coord.round == 1
    assert len(coord.ledger.accepted(0)) == 2
    # round 1 opens with a's work in, but b (round 0's other contributor) has not leased yet:
    # it must not close on a's work alone (min_contributions is 1)
    assert not coord.tick() and coord.round == 1
    lb1 = lease(coord, b)
    assert lb1.round == 1 and not coord.tick()
    coord.submit(b, lb1.lease_id, payload(lb1, coord.shapes, seed=9))
    assert coord.tick() and coord.round == 2
    assert coord.ledger.round_row(1)["contributions"] == 2


def test_a_round_opened_with_work_sent_ahead_closes_without_who_went_silent(overlapped):
    coord = overlapped
    a, b = volunteer(coord, "a"), volunteer(coord, "b")
    la, lb = lease(coord, a), lease(coord, b)
    coord.submit(a, la.lease_id, payload(la, coord.shapes))
    a1 = coord.lease(a, LeaseRequest(ahead=True)).lease
    coord.submit(a, a1.lease_id, payload(a1, coord.shapes, seed=7))
    coord.submit(b, lb.lease_id, payload(lb, coord.shapes, seed=3))
    assert coord.tick() and coord.round == 1 and not coord.tick()  # b may still lease
    with coord.ledger.tx() as db:  # b's last request was long ago: it left
        db.execute("UPDATE volunteers SET last_seen = ? WHERE id = ?", (time.time() - 60, b.id))
    assert coord.tick() and coord.round == 2


def test_stop_and_wait_runs_and_workers_get_no_lease_ahead(tiny_run, tmp_path):
    coord = Coordinator(copy_run(tiny_run, tmp_path / "run", inner_steps=5, rounds=3,
                                 round_seconds=60, overlap=False), evaluate_rounds=False)
    try:
        a, b = volunteer(coord, "a"), volunteer(coord, "b")
        la, _ = lease(coord, a), lease(coord, b)
        coord.submit(a, la.lease_id, payload(la, coord.shapes))
        r = coord.lease(a, LeaseRequest(ahead=True))
        assert r.status == "wait" and "waiting for the round to close" in r.message
    finally:
        coord.close()


def test_slower_volunteers_get_time_budgets_that_end_with_the_fastest(overlapped):
    """Overlapped runs pace a round: every lease's training ends when the fastest volunteer
    is expected to finish the round's steps, so a slower one trains fewer and never holds the
    round back."""
    coord = overlapped
    a, b = volunteer(coord, "a"), volunteer(coord, "b")
    cfg = coord.run.config.train
    tokens = 5 * cfg.batch_size * cfg.seq_len
    first = coord.lease(a, LeaseRequest(tokens_per_s=tokens / 10.0)).lease  # 10 s a round
    assert first.seconds > 50  # one speed known: the round's deadline is the budget
    slow = coord.lease(b, LeaseRequest(tokens_per_s=tokens / 40.0)).lease  # 40 s a round
    assert slow.seconds == pytest.approx(10 * 1.15, abs=0.5)  # ends with the fastest
    fast = coord.lease(a, LeaseRequest(tokens_per_s=tokens / 10.0)).lease
    assert fast.seconds <= slow.seconds
    lone = Pacer(overlap=True, round_seconds=60.0)  # pacing needs two volunteers' speeds
    lone.heard(1, 100.0, time.time())
    assert lone.end(0, tokens, time.time()) is None


def test_an_unpaced_overlapped_round_ends_its_leases_once_its_first_work_is_in(overlapped,
                                                                             tiny_run,
                                                                             tmp_path):
    """Round 0 of an overlapped run cannot be paced (no volunteer's speed is known yet): once
    its first contribution is in, the heartbeat asks every other lease of it to send the steps
    done (`finish`), instead of the slowest holding everyone for its whole H. Paced rounds and
    stop-and-wait runs never ask."""
    a, b = volunteer(overlapped, "a"), volunteer(overlapped, "b")
    la, lb = lease(overlapped, a), lease(overlapped, b)
    assert not overlapped.pacer.paced(0)
    assert not overlapped.alive(b, lb.lease_id, Alive(step=1)).finish
    overlapped.submit(a, la.lease_id, payload(la, overlapped.shapes))
    got = overlapped.alive(b, lb.lease_id, Alive(step=2))
    assert got.ok and got.finish
    # a paced round (both speeds known when its second lease was given): no finish
    cfg = overlapped.run.config.train
    tokens = 5 * cfg.batch_size * cfg.seq_len
    c, d = volunteer(overlapped, "c"), volunteer(overlapped, "d")
    overlapped.submit(b, lb.lease_id, payload(lb, overlapped.shapes, seed=2))
    assert overlapped.tick() and overlapped.round == 1
    lc = overlapped.lease(c, LeaseRequest(tokens_per_s=tokens / 10.0)).lease
    ld = overlapped.lease(d, LeaseRequest(tokens_per_s=tokens / 40.0)).lease
    assert lc.round == ld.round == 1 and overlapped.pacer.paced(1)
    overlapped.submit(c, lc.lease_id, payload(lc, overlapped.shapes, seed=4))
    got = overlapped.alive(d, ld.lease_id, Alive(step=1))
    assert got.ok and not got.finish
    # stop-and-wait: the round waits for every lease, as before
    coord = Coordinator(copy_run(tiny_run, tmp_path / "saw", inner_steps=5, rounds=3,
                                 round_seconds=60), evaluate_rounds=False)
    try:
        e, f = volunteer(coord, "e"), volunteer(coord, "f")
        le, lf = lease(coord, e), lease(coord, f)
        coord.submit(e, le.lease_id, payload(le, coord.shapes))
        got = coord.alive(f, lf.lease_id, Alive(step=1))
        assert got.ok and not got.finish
    finally:
        coord.close()


def test_deadline_without_enough_contributions_extends_the_round(coord):
    a = volunteer(coord)
    lease(coord, a)
    coord.ledger.extend_round(0, time.time() - 1)
    assert not coord.tick() and coord.round == 0
    assert coord.ledger.round_row(0)["deadline"] > time.time() + 30


def test_weight_is_capped_by_the_lease(coord):
    a = volunteer(coord)
    la = lease(coord, a)
    coord.submit(a, la.lease_id, payload(la, coord.shapes, tokens=10**9))
    cfg = coord.run.config.train
    assert coord.ledger.accepted(0)[0]["weight"] == 5 * cfg.batch_size * cfg.seq_len


def test_restart_resumes_round_theta_and_momentum(coord, tiny_run):
    a = volunteer(coord)
    for _ in range(2):
        la = lease(coord, a)
        coord.submit(a, la.lease_id, payload(la, coord.shapes, seed=la.round))
        assert coord.tick()
    la = lease(coord, a)
    coord.submit(a, la.lease_id, payload(la, coord.shapes, seed=9))  # pending in round 2
    theta, mom = coord.theta, coord.momentum
    coord.close()
    again = Coordinator(coord.run, evaluate_rounds=False)
    try:
        assert again.round == 2 and len(again.ledger.accepted(2)) == 1
        assert all(torch.equal(theta[k], again.theta[k]) for k in theta)
        assert all(torch.equal(mom[k], again.momentum[k]) for k in mom)
        assert again.tick() and again.round == 3 and again.finished
        assert again.lease(a, LeaseRequest()).status == "done"
    finally:
        again.close()


def test_old_checkpoints_are_pruned_by_retention(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "r", inner_steps=1, rounds=12, keep_last=2,
                   keep_every=5)
    c = Coordinator(run, evaluate_rounds=False)
    try:
        a = volunteer(c)
        for _ in range(12):
            la = lease(c, a)
            c.submit(a, la.lease_id, payload(la, c.shapes, seed=la.round))
            assert c.tick()
        assert list_checkpoints(run.ckpt_dir) == [0, 5, 10, 11, 12]
        assert len(list(run.updates_dir.iterdir())) == 12
        assert c.lease(a, LeaseRequest()).status == "done"
    finally:
        c.close()


def test_disk_full_while_checkpointing_keeps_state_and_resumes(coord, monkeypatch):
    import builtins
    import errno

    from crowdtrain.run import checkpoint

    class FullDisk:
        """A real file whose writes fail as on a full disk."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, mode="r", *args, **kw):
        f = builtins.open(path, mode, *args, **kw)
        return FullDisk(f) if "ckpt-" in str(path) and "w" in mode else f

    a = volunteer(coord)
    la = lease(coord, a)
    coord.submit(a, la.lease_id, payload(la, coord.shapes))
    theta = {k: v.clone() for k, v in coord.theta.items()}
    monkeypatch.setattr(checkpoint, "open", full_open, raising=False)
    with pytest.raises(OSError, match="No space left"):
        coord.tick()
    assert coord.round == 0 and list_checkpoints(coord.run.ckpt_dir) == [0]
    assert all(torch.equal(theta[k], coord.theta[k]) for k in theta)
    assert coord.ledger.round_row(0)["state"] == "open" and len(coord.ledger.accepted(0)) == 1
    assert not [p for p in coord.run.ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    assert "No space left on device" in coord.status().close_failing  # said while it lasts
    monkeypatch.undo()  # space is back: the same round closes with the same contribution
    assert coord.tick() and coord.round == 1 and list_checkpoints(coord.run.ckpt_dir) == [0, 1]
    assert coord.status().close_failing is None


def test_a_poisoned_contribution_is_left_out_with_its_reason(coord):
    vols = [volunteer(coord, f"v{i}") for i in range(4)]
    leases = [lease(coord, v) for v in vols]
    honest = [make_delta(coord.shapes, seed=i) for i in range(3)]
    evil = {k: v * 100 for k, v in make_delta(coord.shapes, seed=9).items()}
    theta0 = {k: v.clone() for k, v in coord.theta.items()}
    for v, ls, d in zip(vols, leases, [*honest, evil], strict=True):
        coord.submit(v, ls.lease_id, payload(ls, coord.shapes, tokens=1000, delta=d))
    assert coord.tick()
    rows = coord.ledger.accepted(0)
    assert [r["excluded"] for r in rows] == [0, 0, 0, 1]
    assert "refused" in rows[3]["reason"] and "round median" in rows[3]["reason"]
    credits = {v["name"]: v["credit_tokens"] for v in coord.ledger.volunteers()}
    assert credits == {"v0": 1000, "v1": 1000, "v2": 1000, "v3": 0}
    assert coord.ledger.round_row(0)["contributions"] == 3
    # the update is the honest mean's (first Nesterov step: -0.7 * 1.9 * mean)
    k = "model.embed_tokens.weight"
    mean = sum(d[k] for d in honest) / 3
    assert torch.allclose(coord.theta[k], theta0[k] - 0.7 * 1.9 * mean, atol=2e-4)


def test_a_refused_volunteer_sits_out_the_round_and_does_not_hold_it_open(coord):
    a, b = volunteer(coord, "a"), volunteer(coord, "b")
    la, lb = lease(coord, a), lease(coord, b)
    with pytest.raises(Refused):
        coord.submit(b, lb.lease_id, poisoned_payload(lb, coord.shapes, "model.norm.weight"))
    r = coord.lease(b, LeaseRequest())  # asks again instead of retrying its own lease
    assert r.status == "wait" and "was refused" in r.message and "from round 1" in r.message
    coord.submit(a, la.lease_id, payload(la, coord.shapes))
    assert coord.tick() and coord.round == 1  # closed at once: b's lease no longer counts
    assert coord.lease(b, LeaseRequest()).status == "lease"  # welcome back next round


def test_an_anonymous_volunteer_is_anonymous_on_the_live_status_too(coord):
    volunteer(coord, "alice")
    coord.join(JoinRequest(name="bob", device="cpu", api_version=1, anonymous=True))
    assert [v.name for v in coord.status().volunteers] == ["alice", "anonymous"]


def test_a_growing_h_schedule_drives_leases_and_checkpoint_steps(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "grow", inner_steps=10, rounds=4, round_seconds=60,
                   inner_steps_growth=4.0)
    c = Coordinator(run, evaluate_rounds=False)
    try:
        a = volunteer(c)
        seen, starts = [], []
        for _ in range(4):
            la = lease(c, a)
            seen.append(la.max_steps)
            starts.append(la.start_step)
            c.submit(a, la.lease_id, payload(la, c.shapes, seed=len(seen)))
            assert c.tick()
        assert seen == [run.config.swarm.round_steps(r) for r in range(4)]
        assert seen[0] < 10 < seen[-1] and sum(seen) == 40
        assert starts == [sum(seen[:r]) for r in range(4)]  # the inner lr schedule's position
        assert load_checkpoint(run.ckpt_dir, 4).meta["steps"] == 40
        assert c.info().schedule.inner_steps_growth == 4.0
    finally:
        c.close()


def test_a_silent_lease_is_given_up_and_the_round_closes_without_it(coord):
    from crowdtrain.wire.protocol import LEASE_SILENCE_SECONDS, Alive

    a, b, c = volunteer(coord, "a"), volunteer(coord, "b"), volunteer(coord, "c")
    la, lb, _ = lease(coord, a), lease(coord, b), lease(coord, c)
    assert coord.alive(a, la.lease_id, Alive(step=1)).ok
    assert coord.alive(b, lb.lease_id, Alive(step=1)).ok
    with pytest.raises(Refused) as e:
        coord.alive(a, lb.lease_id, Alive(step=1))
    assert e.value.status == 403
    coord.submit(a, la.lease_id, payload(la, coord.shapes))
    assert not coord.alive(a, la.lease_id, Alive(step=5)).ok  # submitted: no longer open
    assert not coord.tick()  # b is training (alive); c never sent a heartbeat (older worker)
    coord.ledger.lease_alive(lb.lease_id, time.time() - LEASE_SILENCE_SECONDS - 1)  # b dies
    coord.ledger.expire_leases(0, c.id)  # c's lease ends some other way
    assert coord.tick() and coord.round == 1  # closed on a's report, not at the deadline
    assert coord.ledger.lease(lb.lease_id)["state"] == "expired"
    assert not coord.alive(b, lb.lease_id, Alive(step=9)).ok
    with pytest.raises(Refused, match="stale"):  # b's late upload changes nothing
        coord.submit(b, lb.lease_id, payload(lb, coord.shapes, seed=4))


def fall_silent(coord, vol, held):
    """The worker training `held` sends a heartbeat, then dies: the beat is older than the
    coordinator's silence allowance."""
    from crowdtrain.wire.protocol import LEASE_SILENCE_SECONDS, Alive

    coord.alive(vol, held.lease_id, Alive(step=1))
    coord.ledger.lease_alive(held.lease_id, time.time() - LEASE_SILENCE_SECONDS - 1)


def test_a_silent_lease_cannot_submit_in_its_open_round(coord):
    a, b = volunteer(coord, "a"), volunteer(coord, "b")
    _, lb = lease(coord, a), lease(coord, b)
    fall_silent(coord, b, lb)
    assert not coord.tick() and coord.ledger.lease(lb.lease_id)["state"] == "expired"
    with pytest.raises(Refused, match="given up: no heartbeat") as e:
        coord.submit(b, lb.lease_id, payload(lb, coord.shapes))
    assert e.value.status == 409 and coord.round == 0


def test_the_workers_heartbeat_keeps_its_lease_alive_and_hears_when_it_closes(coord):
    from swarm_helpers import serving

    from crowdtrain.volunteer.client import Client, Heartbeat

    with serving(coord) as port:
        client = Client(f"http://127.0.0.1:{port}", retry_for=10)
        client.token = coord.join(JoinRequest(name="hb", device="cpu", api_version=1)).token
        r = client.call("POST", "/v1/lease", json_body={})
        lid = r.json()["lease"]["lease_id"]
        with Heartbeat(client, lid, every=0.05) as beat:
            beat.step = 3
            end = time.monotonic() + 10
            while coord.ledger.lease(lid)["alive_at"] is None and time.monotonic() < end:
                time.sleep(0.02)
            assert coord.ledger.lease(lid)["alive_at"] is not None and not beat.closed
            coord.ledger.expire_leases(0)  # the coordinator ends the lease (say, round closed)
            while not beat.closed and time.monotonic() < end:
                time.sleep(0.02)
            assert beat.closed  # so the worker stops training work nobody will take
        client.close()


def test_a_restarted_worker_gets_its_own_lease_back_while_its_round_is_open(coord):
    a, b = volunteer(coord, "a"), volunteer(coord, "b")
    la, lb = lease(coord, a), lease(coord, b)
    # b dies: silent past the allowance, its lease is given up, the round stays open for a
    fall_silent(coord, b, lb)
    assert not coord.tick() and coord.ledger.lease(lb.lease_id)["state"] == "expired"
    # b restarts and asks for its lease back: the same batches, schedule and budget
    back = coord.lease(b, LeaseRequest(resume=lb.lease_id)).lease
    assert (back.lease_id, back.seed, back.shards, back.start_step, back.max_steps) == (
        lb.lease_id, lb.seed, lb.shards, lb.start_step, lb.max_steps)
    assert coord.ledger.lease(lb.lease_id)["state"] == "open"
    assert len(coord.ledger.leases_of_round(0)) == 2  # no new lease was made
    coord.submit(b, lb.lease_id, payload(lb, coord.shapes, seed=2))  # accepted
    # a cannot take b's lease: asking for it gets a's own fresh one, and a's old one is void
    other = coord.lease(a, LeaseRequest(resume=lb.lease_id)).lease
    assert other.lease_id not in (la.lease_id, lb.lease_id)
    assert coord.ledger.lease(la.lease_id)["state"] == "expired"
    # a submitted lease is not handed back: the worker waits for the round to close
    assert coord.lease(b, LeaseRequest(resume=lb.lease_id)).status == "wait"
    coord.submit(a, other.lease_id, payload(other, coord.shapes, seed=3))
    assert coord.tick() and coord.round == 1
    # a lease of a closed round is not handed back: a fresh lease on the open round
    fresh = coord.lease(a, LeaseRequest(resume=other.lease_id)).lease
    assert fresh.round == 1 and fresh.lease_id != other.lease_id


def test_an_int4_run_aggregates_4_bit_contributions_exactly_and_refuses_int8(tiny_run,
                                                                            tmp_path):
    run = copy_run(tiny_run, tmp_path / "run4", inner_steps=5, rounds=3, round_seconds=60,
                   codec="int4", outer_lr=1.0, outer_momentum=0.0)
    coord = Coordinator(run, evaluate_rounds=False)
    try:
        a, b = volunteer(coord, "a"), volunteer(coord, "b")
        la, lb = lease(coord, a), lease(coord, b)
        with pytest.raises(Refused, match="not this run's 'int4'"):
            coord.submit(a, la.lease_id, payload(la, coord.shapes, codec="int8"))
        # a refused payload bars a from the round (and voids its lease): b alone now
        assert coord.lease(a, LeaseRequest()).status == "wait"
        blob = payload(lb, coord.shapes, seed=2, codec="int4")
        assert len(blob) < 0.6 * coord.wire_params
        theta0 = {k: v.clone() for k, v in coord.theta.items()}
        coord.submit(b, lb.lease_id, blob)
        assert coord.tick() and coord.round == 1
        # plain averaging of one contribution: theta_1 = theta_0 - its decoded 4-bit delta,
        # to the int8 quantisation of the published update
        sent, _ = codecs.from_bytes(blob, coord.shapes)
        k = "model.embed_tokens.weight"
        step = float(sent[k].abs().max()) / 127
        assert torch.allclose(coord.theta[k], theta0[k] - sent[k], atol=step * 0.51)
    finally:
        coord.close()


def test_a_sparse_run_takes_only_payloads_made_with_its_k_and_bits(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "runs", inner_steps=5, rounds=3, round_seconds=60,
                   codec="sparse", sparse_density=0.03, sparse_bits=4, outer_lr=1.0,
                   outer_momentum=0.0)
    coord = Coordinator(run, evaluate_rounds=False)
    try:
        opts = run.config.swarm.codec_options()
        assert opts == {"k": 123, "bits": 4}
        # the upload limit is the run's sparse payload (+ header room), far below int8's
        int8 = sum(codecs.payload_bytes(v.numel(), "int8") for v in coord.theta.values())
        assert coord.wire_bytes == sum(codecs.payload_bytes(v.numel(), "sparse", **opts)
                                       for v in coord.theta.values()) < int8 / 5
        assert coord.upload_limit == coord.wire_bytes + (1 << 20)
        a, b, c = volunteer(coord, "a"), volunteer(coord, "b"), volunteer(coord, "c")
        la, lb, lc = lease(coord, a), lease(coord, b), lease(coord, c)
        for who, ls, bad in ((a, la, {}), (b, lb, {**opts, "bits": 2})):  # defaults; 2 bits
            with pytest.raises(Refused) as e:
                coord.submit(who, ls.lease_id, payload(ls, coord.shapes, codec="sparse",
                                                       codec_options=bad))
            assert e.value.status == 422
            assert "this run's are block 4096, k 123, bits 4" in e.value.reason, e.value.reason
        refusals = coord.status().refusals
        assert len(refusals) == 2 and all("k 123" in r.reason for r in refusals)
        # a refused payload bars its volunteer from the round (and voids its lease)
        assert coord.lease(a, LeaseRequest()).status == coord.lease(b, LeaseRequest()).status \
            == "wait"
        blob = payload(lc, coord.shapes, seed=2, codec="sparse", codec_options=opts)
        theta0 = {k: v.clone() for k, v in coord.theta.items()}
        assert coord.submit(c, lc.lease_id, blob).accepted
        assert coord.tick() and coord.round == 1
        sent, _ = codecs.from_bytes(blob, coord.shapes)  # what c sent, to the int8 update
        k = "model.embed_tokens.weight"
        step = float(sent[k].abs().max()) / 127
        assert torch.allclose(coord.theta[k], theta0[k] - sent[k], atol=step * 0.51)
    finally:
        coord.close()


def test_a_round_covers_every_shard_however_often_workers_restart(coord):
    import json

    names = [s.name for s in coord.run.index.train]
    assert len(names) >= 2
    vols = [volunteer(coord, f"v{i}") for i in range(len(names))]
    for v in vols:
        lease(coord, v)
    for _ in range(2):  # v0 dies and comes back twice without a snapshot: its lease is
        lease(coord, vols[0])  # voided and replaced each time
    open_leases = coord.ledger.leases_of_round(0, "open")
    assert len(open_leases) == len(names)
    assert sorted(n for r in open_leases for n in json.loads(r["shards"])) == sorted(names)


def test_a_lease_voided_while_its_upload_is_checked_is_not_accepted(coord, monkeypatch):
    """The upload's check runs outside the coordinator's lock (it can take seconds): a new
    lease (or a resume) that voids the lease meanwhile must win, and one lease never gets
    two accepted contributions."""
    import crowdtrain.coordinator.rules as cmod

    a = volunteer(coord, "a")
    first = lease(coord, a)
    real_check, newer = cmod.check_payload_file, {}

    def check_while_a_restarts(*args, **kw):
        newer["lease"] = coord.lease(a, LeaseRequest()).lease  # voids `first`
        return real_check(*args, **kw)

    monkeypatch.setattr(cmod, "check_payload_file", check_while_a_restarts)
    with pytest.raises(Refused, match="given up|stale") as e:
        coord.submit(a, first.lease_id, payload(first, coord.shapes, seed=1))
    assert e.value.status == 409
    monkeypatch.setattr(cmod, "check_payload_file", real_check)
    second = newer["lease"]
    coord.submit(a, second.lease_id, payload(second, coord.shapes, seed=2))
    with pytest.raises(Refused, match="already has an accepted"):
        coord.submit(a, second.lease_id, payload(second, coord.shapes, seed=3))
    assert [r["lease_id"] for r in coord.ledger.accepted(0)] == [second.lease_id]


def test_a_refusal_the_volunteer_did_not_cause_lets_it_lease_again_in_the_round(coord):
    a = volunteer(coord, "a")
    first = lease(coord, a)
    second = lease(coord, a)  # e.g. a second process under the same identity: voids `first`
    with pytest.raises(Refused, match="newer lease replaced it") as e:
        coord.submit(a, first.lease_id, payload(first, coord.shapes))
    assert e.value.status == 409
    refused = [r for r in coord.ledger.contributions() if r["status"] == "refused"]
    assert [r["blameless"] for r in refused] == [1]
    third = lease(coord, a)  # not its fault: it may lease again in the same round
    assert third.round == 0 and third.lease_id not in (first.lease_id, second.lease_id)
    coord.submit(a, third.lease_id, payload(third, coord.shapes))
    assert coord.tick() and coord.round == 1


def test_a_round_short_of_contributions_closes_after_its_extensions_unchanged(tiny_run,
                                                                            tmp_path):
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=5, rounds=2, round_seconds=60,
                   min_contributions=2, max_extensions=2)
    coord = Coordinator(run, evaluate_rounds=False)
    try:
        theta0 = {k: v.clone() for k, v in coord.theta.items()}
        a = volunteer(coord, "a")
        la = lease(coord, a)
        with pytest.raises(Refused):  # every volunteer of round 0 is refused
            coord.submit(a, la.lease_id, poisoned_payload(la, coord.shapes, "model.norm.weight"))
        st = coord.status()
        assert st.round_extensions == 0 and "0 of 2 contribution(s) needed" in st.round_waiting
        for ext in (1, 2):  # the deadline passes: extended, and the status says so
            coord.ledger.extend_round(0, time.time() - 1)
            with coord.ledger.tx() as db:
                db.execute("UPDATE rounds SET extensions = ? WHERE round = 0", (ext - 1,))
            assert not coord.tick() and coord.round == 0
            st = coord.status()
            assert st.round_extensions == ext and f"extended {ext} of 2" in st.round_waiting
        assert "then it closes with what it has" in st.round_waiting
        with coord.ledger.tx() as db:
            db.execute("UPDATE rounds SET deadline = ? WHERE round = 0", (time.time() - 1,))
        assert coord.tick() and coord.round == 1  # closed with nothing: the model stays
        ck = load_checkpoint(run.ckpt_dir, 1)
        assert all(torch.equal(ck.tensors[k], theta0[k]) for k in theta0)
        assert ck.meta["contributions"] == 0 and ck.meta["steps"] == 0
        assert coord.ledger.round_row(0)["state"] == "closed"
        coord.close()  # a restart after an empty first round (no outer momentum yet)
        coord = Coordinator(run, evaluate_rounds=False)
        assert coord.round == 1 and coord.momentum is None
        # round 1 gets one contribution of the two needed: it closes with what it has
        lb = lease(coord, a)
        coord.submit(a, lb.lease_id, payload(lb, coord.shapes))
        with coord.ledger.tx() as db:
            db.execute("UPDATE rounds SET deadline = ?, extensions = 2 WHERE round = 1",
                       (time.time() - 1,))
        assert coord.tick() and coord.finished  # the run reached its last round
        assert not all(torch.equal(coord.theta[k], theta0[k]) for k in theta0)
        assert coord.status().round_waiting is None
    finally:
        coord.close()


def test_no_request_waits_for_a_round_to_close(tiny_run, tmp_path):
    """While a round's contributions are merged (the close started by a tick, as the server's
    ticker does, held here at the start of the aggregation until the test releases it),
    leases, heartbeats, status and the artifacts answer at once; a contribution to the
    closing round goes into the next round at the stale weight, and the round then closes
    with exactly the contributions it had."""
    import threading

    entered, release = threading.Event(), threading.Event()

    class HeldClose(Coordinator):
        def _aggregate(self, rnd, rows):
            entered.set()
            assert release.wait(60)
            return super()._aggregate(rnd, rows)

    run = copy_run(tiny_run, tmp_path / "run", inner_steps=5, rounds=3, round_seconds=60)
    c = HeldClose(run, evaluate_rounds=False)
    try:
        a, b, late = volunteer(c, "a"), volunteer(c, "b"), volunteer(c, "late")
        la, lb, ll = lease(c, a), lease(c, b), lease(c, late)
        c.submit(a, la.lease_id, payload(la, c.shapes, seed=1))
        c.submit(b, lb.lease_id, payload(lb, c.shapes, seed=2))
        c.ledger.extend_round(0, time.time() - 1)  # due: the server's ticker closes it
        closer = threading.Thread(target=c.tick)
        closer.start()
        assert entered.wait(30)
        # the aggregation is held: every request below would hang if it took the close's lock
        done = threading.Event()
        seen = {}

        def requests():
            seen["lease"] = c.lease(volunteer(c, "newcomer"), LeaseRequest())
            seen["alive"] = c.alive(late, ll.lease_id, Alive(step=1))
            seen["status"] = c.status()
            seen["artifacts"] = c.artifacts()
            seen["late"] = c.submit(late, ll.lease_id, payload(ll, c.shapes, seed=3))
            done.set()

        threading.Thread(target=requests, daemon=True).start()
        assert done.wait(30), "a request waited for the aggregation"
        assert seen["lease"].status == "wait" and "closing" in seen["lease"].message
        assert seen["status"].round == 0 and seen["artifacts"].round == 0
        assert seen["late"].round == 1 and c.round == 0
        release.set()
        closer.join(60)
        assert c.round == 1 and c.ledger.round_row(0)["contributions"] == 2
        late_row = c.ledger.accepted(1)[0]
        assert late_row["lease_id"] == ll.lease_id and late_row["reason"].startswith("late")
        assert c.lease(late, LeaseRequest()).status == "lease"  # new work for round 1
    finally:
        release.set()
        c.close()


def test_volunteers_waiting_for_a_close_poll_less_often_in_a_large_round(coord):
    # every volunteer whose work is in asks again after retry_after: 0.5 s in a small round;
    # in a large one, the round's leases / WAIT_POLLS_PER_SECOND, so their polling together
    # stays bounded while the close needs the core
    from crowdtrain.coordinator.rules import WAIT_POLLS_PER_SECOND

    small = volunteer(coord, "first")
    la = lease(coord, small)
    coord.submit(small, la.lease_id, payload(la, coord.shapes))
    waiting = coord.lease(small, LeaseRequest())
    assert waiting.status == "wait" and waiting.retry_after == 0.5
    for i in range(99):  # a round of 100 volunteers
        lease(coord, volunteer(coord, f"v{i}"))
    waiting = coord.lease(small, LeaseRequest())
    assert waiting.status == "wait" and "is in" in waiting.message
    assert waiting.retry_after == pytest.approx(100 / WAIT_POLLS_PER_SECOND) and \
        waiting.retry_after > 2
