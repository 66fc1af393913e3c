"""A volunteer's files on its own machine: where they live (per OS), its identities per
coordinator (one per `--name`, tokens kept 0600), the lock that keeps two processes from
being one volunteer at once, the run folders (`RunFolder`: parameters, optimizer state,
device settings, the round in progress, one per volunteer), and the shard cache.

Several volunteers may share one machine and one home folder: each `--name` is a volunteer of
its own, with its own identity, lock and run folder; the caches (shards, bases, teachers) are
content-addressed and written atomically, so they are shared safely."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.checkpoint import (
    atomic_write,
    check_tensors_match,
    decode_tensors,
    read_tensor_file,
)

log = logging.getLogger(__name__)


def user_home() -> Path:
    """Where a volunteer's identity, caches and optimizer state live (per OS conventions)."""
    if env := os.environ.get("CROWDTRAIN_HOME"):
        return Path(env)
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home())) / "crowdtrain"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "crowdtrain"
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "crowdtrain"


def safe_name(text: str) -> str:
    """`text` as one path component (letters, digits, `-_.`; anything else `_`)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:100] or "_"


class LocalState:
    """A volunteer's files: identities per coordinator and name, the shard cache, and each
    volunteer's run folders."""

    def __init__(self, home: Path, url: str):
        self.home = home
        self.url = url.rstrip("/")
        self.shards = home / "shards"
        self.identities = home / "identities.json"
        self._lock = None

    def run_folder(self, run_name: str, volunteer: str) -> RunFolder:
        """`volunteer`'s folder for `run_name` on this coordinator (two coordinators whose
        runs share a name, or two volunteers on one machine, never share one)."""
        url = hashlib.sha256(self.url.encode()).hexdigest()[:8]
        d = self.home / "runs" / f"{safe_name(run_name)}-{url}" / safe_name(volunteer)
        d.mkdir(parents=True, exist_ok=True)
        return RunFolder(d)

    def _all_identities(self) -> dict:
        if not self.identities.is_file():
            return {}
        try:
            data = json.loads(self.identities.read_text())
        except (OSError, ValueError):
            log.warning("ignoring unreadable %s", self.identities)
            return {}
        return data if isinstance(data, dict) else {}

    def _mine(self, data: dict) -> dict[str, dict]:
        """This coordinator's identities by name (an older single identity counts too)."""
        mine = data.get(self.url)
        if isinstance(mine, dict) and "token" in mine:  # written by an older crowdtrain
            mine = {str(mine.get("name")): mine}
        return {k: v for k, v in mine.items() if isinstance(v, dict) and "token" in v} \
            if isinstance(mine, dict) else {}

    def default_name(self, fallback: str) -> str:
        """The name a `join` without `--name` uses: the only identity this machine has on
        this coordinator, else `fallback`."""
        mine = self._mine(self._all_identities())
        return next(iter(mine)) if len(mine) == 1 else fallback

    def identity(self, name: str) -> dict | None:
        return self._mine(self._all_identities()).get(name)

    def save_identity(self, ident: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        data = self._all_identities()
        mine = self._mine(data)
        mine[ident["name"]] = ident
        data[self.url] = mine
        atomic_write(self.identities, json.dumps(data, indent=1).encode())
        try:
            os.chmod(self.identities, 0o600)
        except OSError:
            pass

    def claim(self, name: str) -> None:
        """Hold the lock of volunteer `name` on this coordinator for this process's life, or
        stop with one line: two processes as one volunteer would void each other's leases."""
        key = hashlib.sha256(f"{self.url}\n{name}".encode()).hexdigest()[:16]
        locks = self.home / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            pid = (locks / f"{key}.pid").read_text().strip() \
                if (locks / f"{key}.pid").is_file() else "?"
            raise CrowdtrainError(
                f"another `crowdtrain join` (pid {pid}) on this machine already contributes to "
                f"{self.url} as {name!r}: to add this machine's other devices to that "
                "volunteer, stop it and join once with --nproc N; to contribute as a second "
                "volunteer, join with another --name") from None
        (locks / f"{key}.pid").write_text(str(os.getpid()))
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class RunFolder:
    """One run's files on the volunteer's machine: the parameters of the round it last synced
    to (`params.safetensors`, with that round), the AdamW state (`optimizer.safetensors`), the
    micro-batch that fit this device (`device.json`), and the round in progress
    (`in-progress.safetensors`, crowdtrain.volunteer.resume). All written atomically, read with
    safetensors or JSON only, and a damaged file is reported and ignored, never fatal."""

    def __init__(self, path: Path):
        self.path = path
        self.params = path / "params.safetensors"
        self.optimizer = path / "optimizer.safetensors"
        self.device = path / "device.json"
        self.in_progress = path / "in-progress.safetensors"

    def load_params(self, expected: dict) -> tuple[dict | None, int | None]:
        """(tensors, round) of the saved parameters if they fit `expected`; (None, None)."""
        if not self.params.is_file():
            return None, None
        try:
            tensors, meta = read_tensor_file(self.params, "local parameters")
            check_tensors_match(tensors, expected, "local parameters")
            return tensors, int(meta["round"])
        except (CrowdtrainError, KeyError, ValueError, OSError) as e:
            log.warning("ignoring local parameters (%s); will download the model", e)
            return None, None

    def save_params(self, theta: dict, rnd: int) -> None:
        from safetensors.torch import save as st_save

        atomic_write(self.params, st_save(theta, metadata={"round": str(rnd)}))

    def load_optimizer(self) -> dict | None:
        """The saved AdamW tensors, or None (none saved, or unreadable: reported)."""
        if not self.optimizer.is_file():
            return None
        try:
            return decode_tensors(self.optimizer.read_bytes(), "optimizer")
        except CrowdtrainError as e:
            log.warning("ignoring saved optimizer state (%s)", e)
            return None

    def save_optimizer(self, tensors: dict) -> None:
        from safetensors.torch import save as st_save

        atomic_write(self.optimizer, st_save(tensors))

    def micro_batch(self, device: str) -> int | None:
        """The micro-batch that fit `device` last time (halved on out-of-memory)."""
        try:
            d = json.loads(self.device.read_text())
            if d.get("device") == device and int(d["micro_batch"]) >= 1:
                return int(d["micro_batch"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def remember_micro_batch(self, device: str, micro_batch: int) -> None:
        if micro_batch != self.micro_batch(device):
            atomic_write(self.device, json.dumps(
                {"device": device, "micro_batch": micro_batch}).encode())


class BackgroundSaves:
    """Local saves (parameters, AdamW state) written by one background thread, off the
    critical path of a round: `put(kind, fn, *args)` returns at once; a newer save of the same
    kind replaces one still waiting (only the latest state matters for a resume); `flush()`
    waits for what is queued. A failed save (a full disk) is reported and skipped: these files
    only spare a restarted worker a download and its optimizer warm-up. Each file is written
    atomically, so a kill mid-save leaves the previous version."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[Callable, tuple]] = {}
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="local-saves")
        self._thread.start()

    def put(self, kind: str, fn: Callable, *args: object) -> None:
        with self._cv:
            self._pending[kind] = (fn, args)
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                kind = next(iter(self._pending))
                fn, args = self._pending.pop(kind)
                self._busy = True
            try:
                fn(*args)
            except (OSError, CrowdtrainError) as e:
                log.warning("could not save the local %s (%s); a restart will fetch it anew",
                            kind, e)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued save is written; False if `timeout` passed first."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self.flush()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
