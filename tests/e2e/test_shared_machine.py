"""Several volunteer processes on one machine, sharing one home folder (real processes): each
`--name` is a volunteer of its own; a second process under a name already running stops at
start with one line instead of voiding the first one's leases."""

from __future__ import annotations

import time

import pytest
from swarm_helpers import Swarm, copy_run

pytestmark = pytest.mark.slow


def join_shared(s: Swarm, proc: str, name: str, home) -> None:
    s.cli(proc, "join", s.url, "--name", name, "--threads", 1, "--quiet",
          env={"CROWDTRAIN_HOME": str(home)})


def test_two_names_on_one_machine_are_two_volunteers(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=10, rounds=3, round_seconds=60,
                   min_contributions=2)
    home = tmp_path / "shared-home"
    with Swarm(run, tmp_path) as s:
        s.serve()
        join_shared(s, "p1", "alice-bar", home)
        join_shared(s, "p2", "bob-bar", home)
        for p in ("p1", "p2"):
            assert s.wait(p) == 0, s.log(p)
            assert "3 rounds, 3 accepted, 0 refused" in s.log(p), s.log(p)
        st = s.status()
    assert st.finished and st.round == 3
    assert [r.contributions for r in st.rounds if r.state == "closed"] == [2, 2, 2]
    board = {v.name: v for v in st.volunteers}
    assert set(board) == {"alice-bar", "bob-bar"}
    assert all(v.accepted == 3 and v.refused == 0 for v in board.values())
    # each volunteer has its own identity and its own run folder in the shared home
    folders = sorted(p.name for p in (home / "runs").glob("*/*") if p.is_dir())
    assert folders == ["alice-bar", "bob-bar"]


def test_a_second_process_under_a_running_name_stops_with_one_line(tiny_run, tmp_path):
    # rounds long enough that the first process is still training when the second starts
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=150, rounds=3, round_seconds=60)
    home = tmp_path / "shared-home"
    with Swarm(run, tmp_path) as s:
        s.serve()
        join_shared(s, "first", "alice", home)
        end = time.time() + 120
        while not any(v.name == "alice" for v in s.status().volunteers):
            assert time.time() < end and s.alive("first"), s.log("first")
            time.sleep(0.2)
        join_shared(s, "second", "alice", home)
        assert s.wait("second") == 2
        lines = [ln for ln in s.log("second").splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "already contributes" in lines[0] and "'alice'" in lines[0]
        assert "--nproc" in lines[0] and "--name" in lines[0]
        assert "Traceback" not in s.log("second")
        assert s.wait("first") == 0, s.log("first")
        assert "3 rounds, 3 accepted, 0 refused" in s.log("first"), s.log("first")
        st = s.status()
    assert st.finished and [v.name for v in st.volunteers] == ["alice"]
    assert sum(r.refused for r in st.rounds) == 0
