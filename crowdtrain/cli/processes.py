"""A swarm of real processes on this machine: one coordinator (`crowdtrain serve`) and any
number of volunteers (`crowdtrain join`, or any other command such as an attacker script),
talking HTTP on loopback. Each process logs to `<log_dir>/<name>.log` and, for volunteers,
keeps its identity and caches in `<log_dir>/home/<name>` (so a killed volunteer restarted
under the same name resumes as the same volunteer).

Used by `crowdtrain demo`'s tests, the end-to-end tests and the reliability benchmarks
(bench/chaos.py, bench/poisoning.py --processes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from crowdtrain.errors import CrowdtrainError
from crowdtrain.wire import protocol


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_command(*args: str) -> list[str]:
    """argv running the `crowdtrain` command of this interpreter's package."""
    return [sys.executable, "-m", "crowdtrain", *args]


def tail(path: Path, n: int = 5) -> str:
    """The last `n` lines of a log file on one line (empty if unreadable)."""
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until the coordinator at `url` answers /v1/info; a clear error if it exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise CrowdtrainError(f"the coordinator exited with code {proc.returncode}: "
                                  f"{tail(log)}")
        try:
            if httpx.get(url + protocol.INFO, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise CrowdtrainError(f"the coordinator did not answer within {timeout:.0f}s: {tail(log)}")


def get_status(url: str) -> protocol.Status:
    return protocol.Status.model_validate(httpx.get(url + protocol.STATUS, timeout=10).json())


class LocalSwarm:
    """Processes of one run, by name. `serve` starts (or restarts) the coordinator, `join` a
    volunteer, `spawn` any command; `kill` sends SIGKILL; `stop` ends them all."""

    def __init__(self, run_dir: str | os.PathLike, log_dir: str | os.PathLike,
                 port: int | None = None) -> None:
        self.run_dir, self.log_dir = Path(run_dir), Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}

    def logfile(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log(self, name: str) -> str:
        return self.logfile(name).read_text(errors="replace")

    def home(self, name: str) -> Path:
        return self.log_dir / "home" / name

    def run_folder(self, name: str, run_name: str) -> Path:
        """Volunteer `name`'s own folder for run `run_name` (crowdtrain.volunteer.files)."""
        from crowdtrain.volunteer.files import LocalState

        return LocalState(self.home(name), self.url).run_folder(run_name, name).path

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        """Start `argv` as process `name`, appending its output to `<name>.log`."""
        with self.logfile(name).open("a") as log:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, **(env or {})})
        self.procs[name] = p
        return p

    def cli(self, name: str, *args: object, env: dict | None = None) -> subprocess.Popen:
        return self.spawn(name, cli_command("--log-level", "info", *map(str, args)), env)

    def serve(self, name: str = "coordinator", *args: object) -> subprocess.Popen:
        p = self.cli(name, "serve", self.run_dir, "--port", self.port, *args)
        wait_until_up(self.url, p, self.logfile(name))
        return p

    def join(self, name: str, *args: object, threads: int = 1) -> subprocess.Popen:
        return self.cli(name, "join", self.url, "--name", name, "--threads", threads,
                        "--quiet", *args, env={"CROWDTRAIN_HOME": str(self.home(name))})

    def alive(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def kill(self, name: str) -> None:
        """SIGKILL (no cleanup, as a power cut), then reap."""
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()

    def wait(self, name: str, timeout: float = 240) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CrowdtrainError(f"{name} did not finish within {timeout:.0f}s: "
                                  f"{self.log(name)[-2000:]}") from None

    def status(self) -> protocol.Status:
        return get_status(self.url)

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
