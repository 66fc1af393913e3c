"""The run's immutable files as a content-addressed public folder any web server can serve.

Every file a volunteer downloads and nobody ever changes (the checkpoint of the open round, the
rounds' updates, the train shards and their loss masks, a LoRA run's base, a distillation run's
teacher) is announced here by its sha256 and linked into `RUN_DIR/public/<sha256>` (a hard link
where the file system has them, else a copy written atomically). A static web server, a CDN or
a bucket synced from that folder serves them to volunteers as `{public_url}/{sha256}`
(`crowdtrain serve --public-url URL`, docs/DEPLOY.md); without one the coordinator serves the
same files itself (`GET /v1/blobs/{sha256}`, with HTTP range requests either way).

A file is announced only once it is complete in the folder, so a worker never asks a web server
or CDN for a name that does not exist yet (a CDN would cache the 404). Checkpoints are large and
only the latest is needed: older ones leave the folder once `keep_models` newer ones exist.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from crowdtrain.errors import Refused

PUBLIC_DIR = "public"  # in the run directory


class PublicFolder:
    """sha256 -> file: what the coordinator has announced, linked into `folder`."""

    def __init__(self, folder: Path, keep_models: int = 2):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep_models = keep_models
        self._files: dict[str, Path] = {}
        self._models: list[str] = []  # announced checkpoints, oldest first
        self._lock = threading.Lock()

    def add(self, path: Path, sha256: str, model: bool = False) -> None:
        """Announce `path` under `sha256` (its content's hash, checked by whoever wrote it)."""
        dest = self.folder / sha256
        if not dest.is_file():
            tmp = self.folder / f".{sha256}.tmp"
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)
            except OSError:  # no hard links here (another file system, or not supported)
                shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        with self._lock:
            self._files[sha256] = dest
            if model and sha256 not in self._models:
                self._models.append(sha256)
                while len(self._models) > self.keep_models:
                    old = self._models.pop(0)
                    self._files.pop(old, None)
                    (self.folder / old).unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        """The announced file with this sha256; 404 for any other name."""
        with self._lock:
            p = self._files.get(sha256)
        if p is None or not p.is_file():
            raise Refused(404, f"no announced file with sha256 {sha256[:16]}...; ask "
                               "/v1/artifacts what exists")
        return p

    def announced(self) -> set[str]:
        with self._lock:
            return set(self._files)
