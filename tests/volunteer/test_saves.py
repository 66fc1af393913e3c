"""Local saves off the critical path (volunteer/files.BackgroundSaves): `put` returns before the
file is written, a newer save of a kind replaces one still waiting, a failing save is reported
and skipped, and `close` writes what is queued."""

from __future__ import annotations

import threading

from crowdtrain.volunteer.files import BackgroundSaves


def test_saves_run_in_the_background_coalesce_and_flush(tmp_path, caplog):
    gate, written = threading.Event(), []

    def slow_write(name: str, value: int) -> None:
        gate.wait(30)
        (tmp_path / name).write_text(str(value))
        written.append((name, value))

    saves = BackgroundSaves()
    saves.put("params", slow_write, "params", 0)  # taken by the thread, held at the gate
    assert not (tmp_path / "params").exists()  # put returned before anything was written
    for v in (1, 2, 3):  # while the first is held, only the newest of these stays queued
        saves.put("params", slow_write, "params", v)
    saves.put("optimizer", slow_write, "optimizer", 9)
    assert not saves.flush(timeout=0.2)  # still held
    gate.set()
    assert saves.flush(timeout=30)
    assert ("params", 1) not in written and ("params", 2) not in written
    assert written[-2:] in ([("params", 3), ("optimizer", 9)], [("optimizer", 9), ("params", 3)])
    assert (tmp_path / "params").read_text() == "3"

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    saves.put("params", full_disk)
    saves.put("optimizer", slow_write, "optimizer", 10)
    saves.close()  # the failure is reported, the next save still happens
    assert "could not save the local params" in caplog.text
    assert (tmp_path / "optimizer").read_text() == "10"
