"""Helpers shared by the swarm tests: a private copy of the tiny run with a swarm schedule,
well-formed (or deliberately broken) contributions, and a coordinator served over real HTTP."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from pathlib import Path

import torch

from crowdtrain.cli.processes import LocalSwarm
from crowdtrain.run.folder import Run
from crowdtrain.wire import codecs
from crowdtrain.wire.protocol import Lease, SubmitStats


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
            delta: dict | None = None, codec: str = "int8", codec_options: dict | None = None,
            **stats) -> bytes:
    """A contribution for `lease` in `codec` (`codec_options`: to_bytes's block, k, bits)."""
    st = SubmitStats(lease_id=stats.pop("lease_id", lease.lease_id),
                     round=stats.pop("round", lease.round), steps=stats.pop("steps", 5),
                     tokens=tokens,
                     mean_loss=stats.pop("mean_loss", 5.0), seconds=stats.pop("seconds", 1.0))
    return codecs.to_bytes(delta or make_delta(shapes, seed=seed), codec,
                           meta={"stats": st.model_dump_json()}, **(codec_options or {}))


def poisoned_payload(lease: Lease, shapes: dict, key: str) -> bytes:
    """A well-formed int8 payload whose scale for `key` is NaN: what a malicious or broken
    client could send, bypassing the encoder's own checks."""
    from safetensors.torch import save

    wire = codecs.encode(make_delta(shapes), "int8")
    wire[f"{key}:scale"][0] = float("nan")
    st = SubmitStats(lease_id=lease.lease_id, round=lease.round, steps=5, tokens=1000,
                     mean_loss=5.0, seconds=1.0)
    return save(wire, metadata={"codec": "int8", "block": str(codecs.BLOCK),
                                "stats": st.model_dump_json()})


class Swarm(LocalSwarm):
    """The run's processes, logging to the test's tmp_path (see crowdtrain.cli.processes)."""

    def __init__(self, run: Run, tmp_path: Path):
        super().__init__(run.dir, tmp_path)
        self.run, self.tmp = run, tmp_path


def run_to_end(run: Run, tmp_path: Path, names=("ann", "ben"), serve_args=(),
               join_args: dict[str, tuple] | None = None):
    """Serve `run` (`crowdtrain serve` + `serve_args`) and let one `crowdtrain join` process
    per name (+ its `join_args`) train it to its last round; every volunteer must exit 0
    saying so. Returns the
    stopped swarm (its logs and homes stay) and the coordinator's last status."""
    from crowdtrain.cli.processes import get_status

    s = Swarm(run, tmp_path)
    try:
        s.serve("coordinator", *serve_args)
        for name in names:
            s.join(name, *(join_args or {}).get(name, ()))
        for name in names:
            assert s.wait(name) == 0, s.log(name)
            assert f"the run finished at round {run.config.swarm.rounds}" in s.log(name)
        status = get_status(s.url)
    finally:
        s.stop()
    return s, status


@contextlib.contextmanager
def serving(coord):
    """A real HTTP server (uvicorn in a thread) over `coord`; yields its port. Its records go
    to the root logger (log_config=None), so caplog sees them."""
    import uvicorn

    from crowdtrain.cli.processes import free_port
    from crowdtrain.coordinator.server import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(coord), host="127.0.0.1", port=port,
                                           log_level="warning", log_config=None))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    end = time.monotonic() + 30
    while not server.started and t.is_alive() and time.monotonic() < end:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        t.join(timeout=15)
