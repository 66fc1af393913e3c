"""A run folder made by an older crowdtrain (tests/data/run-v0.1-25178b3, made before the
package was split into subpackages) is served, joined, exported and verified by today's code
(real processes). It stays for good: the run folder must keep reading it, or migrate it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from swarm_helpers import Swarm

from crowdtrain.publish.export import export_model
from crowdtrain.publish.verify import verify_model
from crowdtrain.run.folder import Run

pytestmark = pytest.mark.slow

LEGACY = Path(__file__).resolve().parents[1] / "data" / "run-v0.1-25178b3"


def test_a_run_folder_made_by_the_old_code_is_served_joined_and_verified(tmp_path):
    shutil.copytree(LEGACY, tmp_path / "run")
    run = Run(tmp_path / "run")
    assert run.config.swarm.rounds == 3 and not run.ledger_path.exists()
    with Swarm(run, tmp_path) as s:
        s.serve()
        s.join("newcomer")
        assert s.wait("newcomer") == 0, s.log("newcomer")
        assert "3 rounds, 3 accepted, 0 refused" in s.log("newcomer")
        st = s.status()
    assert st.finished and [r.contributions for r in st.rounds if r.state == "closed"] == [1] * 3
    out = export_model(Run(run.dir), tmp_path / "export")
    report = verify_model(out, run.dir)
    assert report.ok, report
