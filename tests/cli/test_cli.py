"""The `crowdtrain` command as a user runs it: real subprocesses, help, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

COMMANDS = ["init", "train", "export", "generate", "serve", "join", "demo", "status"]


def crowdtrain(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "crowdtrain", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_one_line_error(r, pattern):
    import re

    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_help_for_every_command(capsys):
    r = crowdtrain("--help")  # one real process: what a user types
    assert r.returncode == 0
    for c in COMMANDS:
        assert c in r.stdout
        with pytest.raises(SystemExit) as done:  # the rest in this process (argparse exits)
            run_main(capsys, c, "--help")
        out = capsys.readouterr().out
        assert done.value.code == 0 and "usage: crowdtrain " + c in out, out


def run_main(capsys, *args):
    """The CLI's `main()` in this process (same code path, no interpreter start-up)."""
    from crowdtrain.cli.main import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_bad_inputs_print_one_line(tmp_path, corpus, capsys):
    # one real process, to see exactly what a user sees
    assert_one_line_error(crowdtrain("init", tmp_path / "r", "--data", tmp_path / "nope.txt"),
                          "data file not found")
    (tmp_path / "empty.txt").write_text("")
    empty = tmp_path / "empty.txt"
    assert_one_line_error(run_main(capsys, "init", tmp_path / "r", "--data", empty),
                          "corpus is empty")
    assert_one_line_error(run_main(capsys, "init", tmp_path / "r", "--data", corpus,
                                   "--preset", "xl"), "unknown preset 'xl'")
    assert_one_line_error(run_main(capsys, "train", tmp_path), "not a crowdtrain run")
    assert_one_line_error(run_main(capsys, "export", tmp_path, tmp_path / "o"),
                          "not a crowdtrain run")
    assert_one_line_error(run_main(capsys, "generate", tmp_path, "hi"), "no config.json")
    assert_one_line_error(run_main(capsys, "init", tmp_path / "r", "--data", corpus,
                                   "--preset", "tiny", "--lr", "5"), "invalid training setting.*lr")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_init_says_what_a_contribution_costs_in_the_run_s_codec():
    from crowdtrain.cli.commands import contribution_line
    from crowdtrain.run.folder import SwarmConfig

    numels = [4096 * 1000, 4096 * 500 + 100, 768]  # as the coordinator counts: per parameter
    line = contribution_line(SwarmConfig(codec="sparse"), numels)
    # 41 of each 4096 (fewer in a short last chunk): 2-byte offsets, 2-bit levels, a scale:
    # 96,250 + 48,222 + 97 bytes
    assert "~144.6 kB (sparse 1%, 2 bits: ~0.1s at 10 Mbit/s up)" in line, line
    assert "int8 would be ~6.2 MB (43x)" in line, line
    line = contribution_line(SwarmConfig(codec="sparse", sparse_density=0.03, sparse_bits=4),
                             numels)
    assert "(sparse 3%, 4 bits" in line, line
    assert contribution_line(SwarmConfig(), numels) == (
        "each round every volunteer uploads ~6.2 MB (int8: ~5.0s at 10 Mbit/s up)")


@pytest.mark.slow
def test_init_train_export_generate(tmp_path, corpus):
    run = tmp_path / "run"
    r = crowdtrain("init", run, "--data", corpus, "--preset", "tiny", "-q", "--codec", "int4")
    assert r.returncode == 0, r.stderr
    assert "created run" in r.stdout and "int4" in r.stdout
    assert "each round every volunteer uploads ~" in r.stdout and "int8 would be" in r.stdout
    assert json.loads((run / "run.json").read_text())["swarm"]["codec"] == "int4"
    assert_one_line_error(crowdtrain("init", run, "--data", corpus), "already holds a run")
    r = crowdtrain("train", run, "--steps", "60", "--threads", "1", "-q", "--eval-every", "30")
    assert r.returncode == 0, r.stderr
    assert "60 steps" in r.stdout and "saved checkpoint round 1" in r.stdout
    r = crowdtrain("export", run, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    r = crowdtrain("generate", tmp_path / "out", "ROMEO:", "--max-tokens", "10")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr


@pytest.mark.slow
def test_demo_runs_a_swarm_and_prints_text(tmp_path):
    r = crowdtrain("demo", "--preset", "tiny", "--workers", "2", "--rounds", "2",
                   "--inner-steps", "10", "--out", tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "round 2/2 closed: 2 contributions" in r.stdout
    assert "--- sample ---\nROMEO:" in r.stdout
    assert (tmp_path / "model" / "model.safetensors").is_file()
