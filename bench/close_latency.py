"""Coordinator latency while a round closes: no request waits for an aggregation.

A real coordinator process (`crowdtrain serve`, `--threads` torch threads) hosts a run of the
`base` shape (110M parameters; fresh weights). N simulated volunteers (httpx, each from its own
loopback address) join, lease round 0 and upload real int8 payloads of that shape; the run
needs all N, so the last upload starts the close: centered clipping over N x 110M, the outer
step, the update and checkpoint 1. From the first volunteer's accepted upload until round 1 is
open, that volunteer sends a lease request and a heartbeat every 50 ms (the lease answers
"wait": its work is in, or the round is closing; the heartbeat goes to its submitted lease),
and their latencies are split into the phases: the other uploads, and the close.

Target (issue 20): p99 latency of lease and heartbeat requests during the close of a round of
20 `base`-sized contributions at most 100 ms.

    python bench/close_latency.py                      # base, 20 contributions, 1 thread
    python bench/close_latency.py --threads 2          # the close on 2 threads (both cores)
    python bench/close_latency.py --quick              # tiny, 4 contributions
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from benchlib import Payloads, base_run, header, load, make_run, params_of  # noqa: E402
from benchlib import percentile as pct  # noqa: E402

from crowdtrain.cli.processes import LocalSwarm, wait_until_up  # noqa: E402
from crowdtrain.run.checkpoint import load_checkpoint  # noqa: E402
from crowdtrain.wire import protocol  # noqa: E402

API = {protocol.API_HEADER: str(protocol.API_VERSION)}


def client(url: str, i: int) -> httpx.Client:
    """A volunteer's connection from its own loopback address (no per-address join limit)."""
    return httpx.Client(base_url=url, headers=API, timeout=httpx.Timeout(600.0),
                        transport=httpx.HTTPTransport(local_address=f"127.0.{i // 250}."
                                                                    f"{2 + i % 250}"))


def join(c: httpx.Client, name: str) -> dict:
    r = c.post(protocol.JOIN, json=protocol.JoinRequest(
        name=name, device="cpu", api_version=protocol.API_VERSION).model_dump())
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['token']}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="base")
    p.add_argument("--contributions", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="the coordinator's torch threads")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.shape, a.contributions = None, 4
    work = a.work or Path(tempfile.mkdtemp(prefix="crowdtrain-latency-"))
    n = a.contributions
    header(f"lease and heartbeat latency while a round of {n} contributions closes "
           f"({a.shape or 'tiny'}, coordinator --threads {a.threads})")
    tiny = base_run(work / "cache", "tiny")
    run = make_run(tiny, work / "run", a.shape, swarm={
        "rounds": 3, "inner_steps": 5, "round_seconds": 3600.0, "min_contributions": n,
        "verify": False},  # random deltas: the aggregation and its timing are measured here
        evaluate_init=False)
    shapes = {k: tuple(v.shape) for k, v in load_checkpoint(run.ckpt_dir, 0).tensors.items()}
    payloads = Payloads(shapes, variants=2)
    train = run.config.train
    samples: list[tuple[str, str, float]] = []  # (phase, kind, seconds)
    phase = ["idle"]
    with LocalSwarm(run.dir, work / "logs") as swarm:
        proc = swarm.cli("coordinator", "--log-level", "info", "serve", run.dir, "--port",
                         swarm.port, "--threads", a.threads)
        wait_until_up(swarm.url, proc, swarm.logfile("coordinator"), 900)
        vols = [client(swarm.url, i) for i in range(n + 1)]
        auths = [join(c, f"sim-{i}") for i, c in enumerate(vols)]
        probe_http = vols[n]  # volunteer 0's second connection, as a worker's heartbeat has
        leases = []
        for c, auth in zip(vols[:n], auths[:n], strict=True):
            r = c.post(protocol.LEASE, headers=auth, json=protocol.LeaseRequest().model_dump())
            leases.append(protocol.LeaseResponse.model_validate(r.json()).lease)
        stop = threading.Event()

        def probing() -> None:
            alive = protocol.ALIVE.format(lease_id=leases[0].lease_id)
            while not stop.is_set():
                for kind, path, body in (("lease", protocol.LEASE,
                                          protocol.LeaseRequest().model_dump()),
                                         ("heartbeat", alive, {"step": 1})):
                    t0 = time.perf_counter()
                    probe_http.post(path, headers=auths[0], json=body)
                    samples.append((phase[0], kind, time.perf_counter() - t0))
                stop.wait(0.05)

        def upload(i: int) -> int:
            lease = leases[i]
            stats = protocol.SubmitStats(
                lease_id=lease.lease_id, round=0, steps=lease.max_steps,
                tokens=lease.max_steps * train.batch_size * train.seq_len, mean_loss=5.0,
                seconds=1.0)
            return vols[i].post(protocol.SUBMIT.format(lease_id=lease.lease_id),
                                content=payloads.make(i, stats),
                                headers={**auths[i],
                                         "Content-Type": "application/octet-stream"}
                                ).status_code

        t_up = time.perf_counter()
        codes = [upload(0)]
        phase[0] = "uploads"
        t = threading.Thread(target=probing, daemon=True)
        t.start()
        with ThreadPoolExecutor(4) as pool:
            codes += list(pool.map(upload, range(1, n - 1)))
        phase[0] = "close"  # the last upload completes the round: the close starts on it
        codes.append(upload(n - 1))
        t_close = time.perf_counter()
        while probe_http.get(protocol.STATUS).json()["round"] < 1:
            time.sleep(0.1)
        close_s = time.perf_counter() - t_close
        phase[0] = "after"
        time.sleep(1)
        stop.set()
        t.join(10)
        upload_s = t_close - t_up
    print(f"{params_of(run) / 1e6:.1f}M parameters x {n} contributions: uploads {upload_s:.1f} s "
          f"(statuses {sorted(set(codes))}), close {close_s:.1f} s (last upload answered -> "
          f"round 1 open); {load()}")
    print("\n| phase | request | n | p50 | p99 | max |\n|---|---|---|---|---|---|")
    worst = 0.0
    for ph in ("uploads", "close"):
        for kind in ("lease", "heartbeat"):
            xs = [s for p_, k, s in samples if p_ == ph and k == kind]
            if xs:
                print(f"| {ph} | {kind} | {len(xs)} | {pct(xs, 50) * 1e3:.1f} ms | "
                      f"{pct(xs, 99) * 1e3:.1f} ms | {max(xs) * 1e3:.1f} ms |")
                if ph == "close":
                    worst = max(worst, pct(xs, 99))
    print(f"\ntarget: p99 of lease and heartbeat requests during the close <= 100 ms: "
          f"{'met' if worst <= 0.1 else 'missed'} ({worst * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
