"""The performance benchmarks keep working: each script's `--quick` mode runs to the end and
prints its figures (bench/efficiency.py, coordinator_load.py, scaling.py, communication.py;
bench/vs_hivemind.py builds a virtualenv and is run by hand). The figures themselves are not
checked: a --quick run is too short to mean anything, and the real ones are in BENCHMARKS.md.

The scripts share one work folder (and so one `tiny` run, made once) and run as subprocesses,
as a person would run them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


def quick(script: str, work: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--work", str(work),
                        *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_efficiency_quick(work):
    out = quick("efficiency.py", work)
    assert re.search(r"over wall time, steady state\s+\d+\.\d+", out), out
    assert "time from the worker's start to its first inner step" in out, out


def test_coordinator_load_quick(work):
    out = quick("coordinator_load.py", work)
    assert re.search(r"N=8 .* accepted 8/8\s+refused 0", out), out


def test_scaling_quick(work):
    out = quick("scaling.py", work)
    assert re.search(r"1M .*coordinator: submit .* worker: round", out), out
    assert "coordinator close" in out, out


def test_communication_quick(work):
    out = quick("communication.py", work)
    assert re.search(r"DDP \(gloo, 2 processes.*held-out \d", out), out
    assert re.search(r"int8/int8 +\d", out) and re.search(r"fp32/fp32 +\d", out), out
    assert "compute utilisation" in out, out
    # the convergence part: DDP, the lone worker, plain DiLoCo, the defaults, overlapped
    for row in ("| data parallel (DDP, gloo, ceiling) | 1 |", "| one worker alone (floor) |",
                "| plain H=4 |", "| defaults H=4 |", "| defaults, overlapped 1 H=4 |"):
        assert row in out, (row, out)
