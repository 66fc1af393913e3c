"""Helpers shared by the swarm tests: a private copy of the tiny run with a swarm schedule,
and well-formed (or deliberately broken) contributions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crowdtrain import compress
from crowdtrain.demo import free_port, wait_until_up
from crowdtrain.protocol import Lease, SubmitStats
from crowdtrain.rundir import Run


def copy_run(src: Run, dst: Path, **swarm) -> Run:
    shutil.copytree(src.dir, dst)
    cfg = json.loads((dst / "run.json").read_text())
    cfg["swarm"].update(swarm)
    (dst / "run.json").write_text(json.dumps(cfg))
    return Run(dst)


def make_delta(shapes: dict, scale: float = 1e-3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}


def payload(lease: Lease, shapes: dict, tokens: int = 1000, seed: int = 0,
            delta: dict | None = None, codec: str = "int8", **stats) -> bytes:
    st = SubmitStats(lease_id=stats.pop("lease_id", lease.lease_id),
                     round=stats.pop("round", lease.round), steps=5, tokens=tokens,
                     mean_loss=stats.pop("mean_loss", 5.0), seconds=stats.pop("seconds", 1.0))
    return compress.to_bytes(delta or make_delta(shapes, seed=seed), codec,
                             meta={"stats": st.model_dump_json()})


def poisoned_payload(lease: Lease, shapes: dict, key: str) -> bytes:
    """A well-formed int8 payload whose scale for `key` is NaN: what a malicious or broken
    client could send, bypassing the encoder's own checks."""
    from safetensors.torch import save

    wire = compress.encode(make_delta(shapes), "int8")
    wire[f"{key}:scale"][0] = float("nan")
    st = SubmitStats(lease_id=lease.lease_id, round=lease.round, steps=5, tokens=1000,
                     mean_loss=5.0, seconds=1.0)
    return save(wire, metadata={"codec": "int8", "block": str(compress.BLOCK),
                                "stats": st.model_dump_json()})


class Swarm:
    def __init__(self, run, tmp_path):
        self.run, self.tmp = run, tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}

    def cli(self, name, *args, env=None):
        log = (self.tmp / f"{name}.log").open("w")
        p = subprocess.Popen([sys.executable, "-m", "crowdtrain.cli", "--log-level", "info",
                              *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})})
        self.procs[name] = p
        return p

    def serve(self, name: str = "coordinator"):
        p = self.cli(name, "serve", self.run.dir, "--port", self.port)
        wait_until_up(self.url, p, self.tmp / f"{name}.log")
        return p

    def join(self, name):
        return self.cli(name, "join", self.url, "--name", name, "--threads", "1", "--quiet",
                        env={"CROWDTRAIN_HOME": str(self.tmp / "home" / name)})

    def log(self, name):
        return (self.tmp / f"{name}.log").read_text()

    def wait(self, name, timeout=240):
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish: {self.log(name)[-2000:]}")

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
