"""Starting a volunteer: one process, `--nproc N` processes spawned here, or this process as
one rank under torchrun (`crowdtrain.worker`). Rank 0 runs the `Worker`; the other ranks
`follow` it (crowdtrain.volunteer.ranks carries the messages)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket

from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.train import check_batch_splits
from crowdtrain.volunteer import ranks as rk
from crowdtrain.volunteer.client import Client
from crowdtrain.volunteer.config import WorkerConfig, WorkerSummary
from crowdtrain.volunteer.follower import follow
from crowdtrain.volunteer.worker import Worker
from crowdtrain.wire import protocol


def run_worker(cfg: WorkerConfig) -> WorkerSummary:
    """One volunteer: a single process, `cfg.nproc` processes, or this rank under torchrun."""
    group = rk.from_env(cfg.device)
    if group is None and cfg.nproc > 1:
        return launch_ranks(cfg)
    try:
        if group is None:
            return Worker(cfg).run()
        return Worker(cfg, group).run() if group.leader else follow(cfg, group)
    finally:
        if group is not None:
            rk.shutdown()


def launch_ranks(cfg: WorkerConfig) -> WorkerSummary:
    """Run `cfg.nproc` ranks of one volunteer as processes on this machine; rank 0's summary.
    A failure in any rank stops them all and comes back as one CrowdtrainError line."""
    import torch.multiprocessing as mp

    _check_batch_splits(cfg)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as s:  # a free port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    results = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(_rank_main, args=(cfg, results), nprocs=cfg.nproc, join=True,
                           start_method="spawn")
    except mp.ProcessRaisedException as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise CrowdtrainError(f"a worker process failed: {lines[-1] if lines else e}") from None
    except mp.ProcessExitedException as e:
        raise CrowdtrainError(f"a worker process died: {e}") from None
    return WorkerSummary(**results.get()) if not results.empty() else WorkerSummary()


def _check_batch_splits(cfg: WorkerConfig) -> None:
    """Before any rank starts (each imports torch and joins): the run's batch must split
    evenly across the processes, as the inner loop requires; the run's settings come from
    the coordinator's /v1/info."""
    client = Client(cfg.url, cfg.retry_for)
    try:
        info = protocol.RunInfo.model_validate(client.call("GET", protocol.INFO).json())
    finally:
        client.close()
    check_batch_splits(int(info.train.get("batch_size", 1)), cfg.nproc)


def _rank_main(rank: int, cfg: WorkerConfig, results) -> None:
    if rank > 0:  # Ctrl-C is rank 0's to handle: it finishes the round, then releases us
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    group = rk.init(rank, cfg.nproc, cfg.device)
    try:
        if group.leader:
            results.put(dataclasses.asdict(Worker(cfg, group).run()))
        else:
            follow(cfg, group)
    finally:
        rk.shutdown()
