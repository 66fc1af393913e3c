"""A volunteer's files on its own machine: where they live (per OS), its identity per
coordinator (token kept 0600), the run folders (`RunFolder`: parameters, optimizer state,
device settings, the round in progress), and the shard cache."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from crowdtrain.checkpoint import (
    atomic_write,
    check_tensors_match,
    decode_tensors,
    read_tensor_file,
)
from crowdtrain.errors import CrowdtrainError

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

    def run_folder(self, run_name: str) -> RunFolder:
        return RunFolder(self.run_dir(run_name))

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


class RunFolder:
    """One run's files on the volunteer's machine: the parameters of the round it last synced
    to (`params.safetensors`, with that round), the AdamW state (`optimizer.safetensors`), the
    micro-batch that fit this device (`device.json`), and the round in progress
    (`in-progress.safetensors`, crowdtrain.resume). All written atomically, read with
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
