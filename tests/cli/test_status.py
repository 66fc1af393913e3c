"""`crowdtrain status` (crowdtrain/cli/status.py): rendering a Status for a terminal, fetching
it from a live coordinator, and the one-line errors when that fails."""

from __future__ import annotations

import time

import pytest
from rich.console import Console
from swarm_helpers import copy_run, serving

from crowdtrain.cli.status import fetch_status, render_status
from crowdtrain.coordinator.rules import Coordinator
from crowdtrain.errors import CrowdtrainError
from crowdtrain.wire.protocol import Refusal, RoundSummary, Status, VolunteerSummary

NOW = 1_700_000_000.0


def sample_status(finished: bool = False) -> Status:
    rounds = [RoundSummary(round=r, state="closed", opened_at=NOW - 100 + 10 * r,
                           closed_at=NOW - 92 + 10 * r, contributions=2, refused=int(r == 1),
                           tokens=4096, train_loss=5.0 - 0.2 * r, val_loss=5.3 - 0.2 * r,
                           bytes_in=2_020_000, bytes_out=2_100_000) for r in range(3)]
    rounds.append(RoundSummary(round=3, state="open", opened_at=NOW - 70, closed_at=None,
                               contributions=0, refused=0, tokens=0, train_loss=None,
                               val_loss=4.71, bytes_in=0, bytes_out=0))
    vols = [VolunteerSummary(name="alice", device="cpu", last_seen=NOW - 3, rounds=3,
                             tokens=6144, accepted=3, refused=0, tokens_per_s=812.5),
            VolunteerSummary(name="bob builder", device="cuda:0", last_seen=NOW - 42, rounds=3,
                             tokens=6144 + 10, accepted=3, refused=1, tokens_per_s=2048.0),
            VolunteerSummary(name="quiet.one", device=None, last_seen=None, rounds=0, tokens=0,
                             accepted=0, refused=0, tokens_per_s=None)]
    refusals = [Refusal(round=1, volunteer="bob builder", at=NOW - 80,
                        reason="lease 7 belongs to round 0, the open round is 1: fetch the "
                               "update and take a new lease")]
    return Status(api_version=1, run_name="shakespeare-tiny", round=3, finished=finished,
                  params=1_234_567, payload_bytes=1_250_000, full_model_bytes=4 * 1_234_567,
                  rounds=rounds, volunteers=vols, initial_val_loss=5.3, refusals=refusals,
                  round_deadline=None if finished else NOW + 25)


def text_of(renderable) -> str:
    console = Console(record=True, width=160)
    console.print(renderable)
    return console.export_text()


def test_render_status_shows_rounds_volunteers_and_refusals():
    out = text_of(render_status(sample_status(), now=NOW))
    assert "shakespeare-tiny" in out and "round 3" in out
    assert "1,234,567 params" in out and "1.01 bytes/param" in out
    for col in ("round", "state", "contributions", "refused", "tokens", "train loss",
                "held-out loss", "MB in", "MB out", "duration", "tokens/s"):
        assert col in out, col
    cells = [line.strip("│ ").split() for line in out.splitlines()]
    rows: dict[str, str] = {}
    for c in cells:  # the rounds table comes first (the others also have rows "1", "2", ...)
        if c and c[0] in {"0", "1", "2", "3"}:
            rows.setdefault(c[0], " ".join(c))
    assert set(rows) == {"0", "1", "2", "3"}
    assert "closed" in rows["0"] and "4,096" in rows["0"] and "512" in rows["0"]  # 4096 / 8 s
    assert "5.100" in rows["1"] and "2.0" in rows["1"] and "8.0 s" in rows["1"]
    assert "open" in rows["3"] and "4.710" in rows["3"]
    for name in ("alice", "bob builder", "quiet.one"):
        assert name in out
    lines = out.splitlines()
    at = {n: next(i for i, ln in enumerate(lines) if n in ln and "ago" in ln or
                  n in ln and "never" in ln) for n in ("alice", "bob builder", "quiet.one")}
    assert at["bob builder"] < at["alice"] < at["quiet.one"]  # leaderboard order by tokens
    assert "3s ago" in lines[at["alice"]] and "42s ago" in lines[at["bob builder"]]
    assert "never" in lines[at["quiet.one"]]
    assert "fetch the update and take a new lease" in " ".join(out.split())
    assert "recent refusals" in out


def test_render_status_of_a_finished_and_of_an_empty_run():
    out = text_of(render_status(sample_status(finished=True), now=NOW))
    assert "finished after 3 rounds" in out and "final model" in out
    empty = Status(api_version=1, run_name="fresh", round=0, finished=False, params=10,
                   payload_bytes=12, full_model_bytes=40, rounds=[], volunteers=[],
                   initial_val_loss=None)
    out = text_of(render_status(empty))
    assert "fresh" in out and "no rounds yet" in out and "no volunteers yet" in out
    assert "no refused contributions" in out


def test_status_round_trips_through_json():
    st = sample_status()
    assert Status.model_validate_json(st.model_dump_json()) == st
    assert Status.model_validate_json(st.model_dump_json(indent=1)) == st


def test_fetch_status_from_an_unreachable_coordinator_fails_fast():
    t = time.monotonic()
    with pytest.raises(CrowdtrainError) as e:
        fetch_status("http://127.0.0.1:1", timeout=2)
    assert time.monotonic() - t < 5
    msg = str(e.value)
    assert "\n" not in msg and "cannot reach the coordinator at http://127.0.0.1:1" in msg
    assert "crowdtrain serve" in msg
    with pytest.raises(CrowdtrainError, match="not an http"):
        fetch_status("127.0.0.1:8470")


@pytest.fixture
def live(tiny_run, tmp_path):
    """A real coordinator over real HTTP (uvicorn in a thread), no worker."""
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=5, rounds=2, round_seconds=60)
    coord = Coordinator(run, evaluate_rounds=False)
    with serving(coord) as port:
        yield f"http://127.0.0.1:{port}", run


def test_fetch_status_from_a_live_coordinator(live):
    url, run = live
    st = fetch_status(url + "/")
    assert st.run_name == run.config.name and st.round == 0 and not st.finished
    assert [r.state for r in st.rounds] == ["open"] and st.volunteers == []
    assert run.config.name in text_of(render_status(st))
    with pytest.raises(CrowdtrainError, match="HTTP 404") as e:
        fetch_status(url + "/not-a-coordinator")
    assert "\n" not in str(e.value)


def test_status_command_prints_json_that_round_trips(live, capsys):
    from crowdtrain.cli.main import main

    url, _ = live
    assert main(["status", url, "--json"]) == 0
    out = capsys.readouterr().out
    st = Status.model_validate_json(out)
    assert st.model_dump_json(indent=1) == out.strip()
    assert st.run_name and st.round == 0
    assert main(["status", url]) == 0
    assert f"round {st.round}" in capsys.readouterr().out.lower()
    assert main(["status", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_a_failing_close_is_shown_and_stops_the_demo(monkeypatch, tmp_path):
    # the coordinator retries a failing close every 10 s: `status` says why, and the demo,
    # rather than wait for ever, stops with that reason once it has lasted CLOSE_PATIENCE
    import subprocess
    import sys

    from crowdtrain.cli import demo
    from crowdtrain.errors import CrowdtrainError

    failing = sample_status().model_copy(
        update={"close_failing": "OSError: [Errno 28] No space left on device"})
    out = text_of(render_status(failing, now=NOW))
    assert "closing the round fails (retrying): OSError: [Errno 28] No space left" in out
    assert "closing the round fails" not in text_of(render_status(sample_status(), now=NOW))

    polls = []
    monkeypatch.setattr(demo, "get_status", lambda url: polls.append(url) or failing)
    monkeypatch.setattr(demo, "CLOSE_PATIENCE", 1.5)
    swarm = demo.Swarm(tmp_path, tmp_path / "run", demo.DemoConfig(workers=1, port=9))
    alive = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
             for _ in range(2)]  # a coordinator and a worker that are still running
    swarm.procs, swarm.logs = alive, [tmp_path / "coordinator.log", tmp_path / "w.log"]
    try:
        with pytest.raises(CrowdtrainError, match=r"cannot close round 3: OSError: .*No space"):
            swarm.follow(lambda line: None)
    finally:
        for p in alive:
            p.kill()
            p.wait()
    assert 2 <= len(polls) <= 5  # it waited through a few polls, not on the first one
