"""A volunteer's files on its own machine: where they live (per OS), its identity per
coordinator (token kept 0600), the run folders with parameters and optimizer state, and the
shard cache."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from crowdtrain.checkpoint import atomic_write


def user_home() -> Path:
    """Where a volunteer's identity, caches and optimizer state live (per OS conventions)."""
    if env := os.environ.get("CROWDTRAIN_HOME"):
        return Path(env)
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home())) / "crowdtrain"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "crowdtrain"
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "crowdtrain"


class LocalState:
    """A volunteer's files: identity per coordinator, shard cache, parameters and optimizer."""

    def __init__(self, home: Path, url: str):
        self.home = home
        self.url = url.rstrip("/")
        self.shards = home / "shards"
        self.identities = home / "identities.json"

    def run_dir(self, run_name: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{run_name}")
        d = self.home / "runs" / safe
        d.mkdir(parents=True, exist_ok=True)
        return d

    def identity(self) -> dict | None:
        if not self.identities.is_file():
            return None
        try:
            return json.loads(self.identities.read_text()).get(self.url)
        except json.JSONDecodeError:
            return None

    def save_identity(self, ident: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        all_ids = {}
        if self.identities.is_file():
            try:
                all_ids = json.loads(self.identities.read_text())
            except json.JSONDecodeError:
                all_ids = {}
        all_ids[self.url] = ident
        atomic_write(self.identities, json.dumps(all_ids, indent=1).encode())
        try:
            os.chmod(self.identities, 0o600)
        except OSError:
            pass
