"""Coordinator load: N simulated volunteers against one coordinator process (`crowdtrain
serve`, one torch thread unless --coordinator-threads), submitting real int8 payloads for
models of 1M, 10M and 100M parameters.

Each simulated volunteer is an asyncio httpx client with its own loopback source address
(127.0.x.y, as volunteers come from their own addresses): it joins, then for each round asks
for a lease, "trains" for a random 0..--spread seconds, and uploads a well-formed int8 payload
(a random delta of the model's shapes, quantized by crowdtrain.wire.codecs, with the lease's
stats), then polls for the next lease as the real worker does. The run needs all N
contributions per round (min_contributions = N), so every round aggregates N deltas with the
run's default robust aggregation, block by block from the files on disk.

Per (model, N): accepted contributions/s (over the whole run, round closes included), MB/s
ingested (during the rounds' upload phases), p50/p99 submit latency, every refusal by status
and reason, the round-close time (last contribution in -> next round open, from the ledger),
and the coordinator's memory: RSS at rest, peak RSS (VmHWM) and its growth over rest, next to
N x payload (what holding every upload would cost) and N x block (what block-wise
aggregation needs: 16 bytes x `aggregation.block_for(N)` elements per contribution).

Targets: 100 concurrent workers on a 10M model with no refusal but the intended ones; peak
memory growing with N x block size, not N x model size.

--previous IMPL[,IMPL] runs every configuration once more per IMPL in the same invocation,
side by side: first with a coordinator whose crowdtrain.coordinator.aggregation module is IMPL
("reference": the
original implementation, tests/coordinator/reference_aggregation.py, which the 190 s close of
100 x 10M was measured with; or a commit, whose aggregation.py `git show` gives), loaded into
the coordinator process before anything imports it, then with the current code; the same
payloads, the same volunteers, and a line comparing the two round closes.

    python bench/coordinator_load.py                  # full: 1M x {10,100}, 10M x {1,10,100},
                                                      #       100M x {1,4}; 1 round each
    python bench/coordinator_load.py --quick          # 0.13M model, 8 workers, 1 round
    python bench/coordinator_load.py --sizes 10M --workers 100 --rounds 3
    python bench/coordinator_load.py --sizes 10M --workers 100 --previous reference
    python bench/coordinator_load.py --sizes 10M --workers 100 --previous reference,f87e2d9
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from aggregation_speed import REFERENCE, module_from, previous_source  # noqa: E402
from benchlib import (  # noqa: E402
    Payloads,
    anon_mb,
    base_run,
    header,
    load,
    make_run,
    params_of,
    peak_rss_mb,
    percentile,
    rss_mb,
)

from crowdtrain.cli.processes import LocalSwarm, wait_until_up  # noqa: E402
from crowdtrain.coordinator.aggregation import block_for  # noqa: E402
from crowdtrain.run.folder import Run  # noqa: E402
from crowdtrain.run.ledger import Ledger  # noqa: E402
from crowdtrain.run.model import build_model, config_from_dict, state_dict_for_save  # noqa: E402
from crowdtrain.wire import protocol  # noqa: E402

BLOCK_ELEMS = 1 << 17  # aggregation.block_for's largest block
OCTETS = "application/octet-stream"
FULL = {"1M": [10, 100], "10M": [1, 10, 100], "100M": [1, 4]}
# `python -c BOOT AGGREGATION_PY crowdtrain-args...`: the crowdtrain command with
# crowdtrain.coordinator.aggregation replaced by the file AGGREGATION_PY
BOOT = """import importlib.util, sys
path = sys.argv.pop(1)
print("crowdtrain.coordinator.aggregation is", path, file=sys.stderr, flush=True)
spec = importlib.util.spec_from_file_location("crowdtrain.coordinator.aggregation", path)
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
from crowdtrain.cli.main import main
sys.exit(main())
"""


@dataclasses.dataclass
class Result:
    impl: str  # the aggregation the coordinator ran: "current", "reference" or a commit
    size: str
    params: int
    workers: int
    rounds: int
    seconds: float = 0.0
    accepted: int = 0
    bytes_accepted: int = 0
    upload_phase_s: float = 0.0
    latencies: list[float] = dataclasses.field(default_factory=list)
    refusals: Counter = dataclasses.field(default_factory=Counter)
    close_s: list[float] = dataclasses.field(default_factory=list)
    rest_mb: float = 0.0
    peak_mb: float = 0.0
    peak_upload_mb: float = 0.0
    peak_close_mb: float = 0.0
    rest_anon_mb: float = 0.0
    anon_upload_mb: float = 0.0  # peak anonymous (heap) memory: RSS less mapped files
    anon_close_mb: float = 0.0
    payload_mb: float = 0.0
    block_elems: int = BLOCK_ELEMS  # the largest block the coordinator aggregates at once
    retries: Counter = dataclasses.field(default_factory=Counter)  # transport errors, retried


class MemorySampler(threading.Thread):
    """Samples the coordinator's RSS and its anonymous part (the heap: RSS less the pages of
    memory-mapped files, which the kernel can drop) every 50 ms, split by whether uploads are
    in flight."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.inflight, self.stop = pid, 0, threading.Event()
        self.upload_peak = self.close_peak = self.anon_upload = self.anon_close = 0.0

    def run(self) -> None:
        while not self.stop.wait(0.05):
            r, a = rss_mb(self.pid), anon_mb(self.pid)
            if self.inflight:
                self.upload_peak = max(self.upload_peak, r)
                self.anon_upload = max(self.anon_upload, a)
            else:
                self.close_peak = max(self.close_peak, r)
                self.anon_close = max(self.anon_close, a)


async def request(c: httpx.AsyncClient, res: Result, method: str, path: str,
                  **kw) -> httpx.Response:
    """One request, retried on transport errors as the real worker does (e.g. a keep-alive
    connection the server closed while the client was idle); retries are counted."""
    for attempt in range(10):
        try:
            return await c.request(method, path, **kw)
        except httpx.TransportError as e:
            if attempt == 9:
                raise
            res.retries[type(e).__name__] += 1
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


async def volunteer(i: int, url: str, rounds: int, spread: float, payloads: Payloads,
                    train: dict, res: Result, mem: MemorySampler, phase: dict) -> None:
    addr = f"127.{1 + i // 62500}.{(i // 250) % 250}.{2 + i % 250}"
    transport = httpx.AsyncHTTPTransport(local_address=addr)
    api = {protocol.API_HEADER: str(protocol.API_VERSION)}
    async with httpx.AsyncClient(base_url=url, transport=transport, headers=api,
                                 timeout=httpx.Timeout(300.0)) as c:
        req = protocol.JoinRequest(name=f"sim-{i}", device="cpu",
                                   api_version=protocol.API_VERSION)
        r = await request(c, res, "POST", protocol.JOIN, json=req.model_dump())
        if r.status_code != 200:
            res.refusals[f"join {r.status_code}: {r.json().get('detail')}"] += 1
            return
        auth = {"Authorization": f"Bearer {r.json()['token']}"}
        have: int | None = None
        done = 0
        while done < rounds:
            # a lease asked for while the round closes waits for the close to finish; past the
            # client's timeout it is retried (counted)
            r = await request(c, res, "POST", protocol.LEASE, headers=auth,
                              json=protocol.LeaseRequest(have_round=have).model_dump())
            if r.status_code != 200:
                res.refusals[f"lease {r.status_code}: {r.json().get('detail')}"] += 1
                await asyncio.sleep(1.0)
                continue
            lr = protocol.LeaseResponse.model_validate(r.json())
            if lr.status == "done":
                return
            if lr.status == "wait":
                await asyncio.sleep(lr.retry_after)
                continue
            lease = lr.lease
            await asyncio.sleep(random.uniform(0, spread))
            tokens = lease.max_steps * train["batch_size"] * train["seq_len"]
            stats = protocol.SubmitStats(lease_id=lease.lease_id, round=lease.round,
                                         steps=lease.max_steps, tokens=tokens, mean_loss=5.0,
                                         seconds=max(spread, 1.0))
            blob = payloads.make(i, stats)
            mem.inflight += 1
            phase.setdefault(lease.round, [time.perf_counter(), 0.0])
            t0 = time.perf_counter()
            try:
                r = await request(c, res, "POST", protocol.SUBMIT.format(lease_id=lease.lease_id),
                                  content=blob, headers={**auth, "Content-Type": OCTETS})
            finally:
                mem.inflight -= 1
            t1 = time.perf_counter()
            phase[lease.round][1] = max(phase[lease.round][1], t1)
            res.latencies.append(t1 - t0)
            if r.status_code == 200:
                res.accepted += 1
                res.bytes_accepted += len(blob)
            else:
                res.refusals[f"submit {r.status_code}: {r.json().get('detail')}"] += 1
            have = lease.round
            done += 1


def serve_with(swarm: LocalSwarm, aggregation_py: Path | None, threads: int = 1,
               timeout: float = 900.0) -> None:
    """Start the coordinator (`threads` torch threads) as benchlib.serve does, with its
    aggregation module replaced by the file `aggregation_py` when given."""
    args = ["--log-level", "info", "serve", str(swarm.run_dir), "--port", str(swarm.port),
            "--threads", str(threads)]
    if aggregation_py is None:
        argv = [sys.executable, "-m", "crowdtrain", *args]
    else:
        argv = [sys.executable, "-c", BOOT, str(aggregation_py), *args]
    p = swarm.spawn("coordinator", argv)
    wait_until_up(swarm.url, p, swarm.logfile("coordinator"), timeout)


def one(template: Run, work: Path, size: str, workers: int, rounds: int,
        spread: float, impl: str = "current", aggregation_py: Path | None = None,
        threads: int = 1) -> Result:
    name = f"{size}-n{workers}-{impl}-t{threads}"
    run = make_run(template, work / name, swarm={
        "rounds": rounds, "inner_steps": 10, "round_seconds": 1800.0,
        "min_contributions": workers, "verify": False})  # random deltas, as before
    shapes = {k: tuple(v.shape) for k, v in state_dict_for_save(build_model(
        config_from_dict(run.model_config().to_dict()))).items()}
    payloads = Payloads(shapes)
    biggest = max(math.prod(s) for s in shapes.values())
    blocks = block_for if aggregation_py is None else module_from(
        aggregation_py, f"aggregation_{impl}").block_for
    res = Result(impl, size, params_of(run), workers, rounds,
                 block_elems=min(blocks(workers), biggest))
    res.payload_mb = len(payloads.make(0, protocol.SubmitStats(
        lease_id=1, round=0, steps=1, tokens=1, mean_loss=1.0, seconds=1.0))) / 1e6
    train = run.config.train.__dict__
    with LocalSwarm(run.dir, work / f"{name}-logs") as swarm:
        serve_with(swarm, aggregation_py, threads)
        pid = swarm.procs["coordinator"].pid
        time.sleep(1.0)
        res.rest_mb, res.rest_anon_mb = rss_mb(pid), anon_mb(pid)
        mem = MemorySampler(pid)
        mem.start()
        phase: dict[int, list[float]] = {}
        t0 = time.perf_counter()

        async def all_volunteers() -> None:
            await asyncio.gather(*(volunteer(i, swarm.url, rounds, spread, payloads, train,
                                             res, mem, phase) for i in range(workers)))

        asyncio.run(all_volunteers())
        # wait for the last round to close (the run then reports finished)
        end = time.monotonic() + 3600
        while time.monotonic() < end:
            try:
                if swarm.status().finished:
                    break
            except httpx.HTTPError:  # busy closing the round
                pass
            time.sleep(0.5)
        res.seconds = time.perf_counter() - t0
        mem.stop.set()
        mem.join()
        res.peak_mb = peak_rss_mb(pid)
        res.peak_upload_mb, res.peak_close_mb = mem.upload_peak, mem.close_peak
        res.anon_upload_mb, res.anon_close_mb = mem.anon_upload, mem.anon_close
    res.upload_phase_s = sum(b - a for a, b in phase.values())
    led = Ledger(run.dir / "ledger.sqlite")
    for row in led.rounds():
        if row["closed_at"] is None:
            continue
        last = led.query("SELECT MAX(received_at) t FROM contributions WHERE round = ? AND "
                         "status = 'accepted'", (row["round"],))[0]["t"]
        if last is not None:
            res.close_s.append(row["closed_at"] - last)
    led.close()
    return res


def report(r: Result) -> None:
    lat = r.latencies
    growth = r.peak_mb - r.rest_mb
    print(f"{r.impl:>9} {r.size:>5} {r.params / 1e6:6.1f}M  N={r.workers:<4} "
          f"{r.accepted / r.seconds:6.2f} contrib/s  "
          f"{r.bytes_accepted / 1e6 / max(r.upload_phase_s, 1e-9):7.1f} MB/s in  "
          f"submit p50 {percentile(lat, 50):6.2f}s p99 {percentile(lat, 99):6.2f}s  "
          f"close {max(r.close_s, default=float('nan')):6.1f}s  "
          f"RSS rest {r.rest_mb:6.0f} peak {r.peak_mb:6.0f} MB (uploads {r.peak_upload_mb:.0f}, "
          f"closes {r.peak_close_mb:.0f}); growth {growth:6.0f} MB; heap (anonymous) rest "
          f"{r.rest_anon_mb:.0f} -> uploads {r.anon_upload_mb:.0f} / closes "
          f"{r.anon_close_mb:.0f} MB; vs N x payload "
          f"{r.workers * r.payload_mb:6.0f} MB, N x block "
          f"{r.workers * r.block_elems * 16 / 1e6:6.0f} MB, N x model fp32 "
          f"{r.workers * r.params * 4 / 1e6:6.0f} MB  accepted {r.accepted}/"
          f"{r.workers * r.rounds}  refused {sum(r.refusals.values())}  retried "
          f"{dict(r.retries) or 0}  [{load()}]",
          flush=True)
    for why, n in r.refusals.items():
        print(f"      refused x{n}: {why}")


def compare(before: Result, now: Result) -> None:
    """The round close (and the whole run) of the two implementations, side by side."""
    b, c = max(before.close_s, default=math.nan), max(now.close_s, default=math.nan)
    print(f"      round close {now.impl} {c:.1f} s vs {before.impl} {b:.1f} s: {b / c:.1f}x "
          f"faster; whole run {now.seconds:.0f} s vs {before.seconds:.0f} s; peak RSS "
          f"{now.peak_mb:.0f} vs {before.peak_mb:.0f} MB, heap at the close "
          f"{now.anon_close_mb:.0f} vs {before.anon_close_mb:.0f} MB  [{load()}]", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--sizes", help="comma-separated model sizes among 1M, 10M, 100M (default: "
                   "all, with the worker counts of the full run)")
    p.add_argument("--workers", help="comma-separated worker counts for --sizes")
    p.add_argument("--rounds", type=int, default=1, help="rounds per configuration")
    p.add_argument("--spread", type=float, default=0.0,
                   help="each volunteer 'trains' a random 0..SPREAD seconds before uploading "
                        "(default 0: every upload at once, the worst case)")
    p.add_argument("--work", type=Path, help="keep runs and logs here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--coordinator-threads", type=int, default=1,
                   help="the coordinator's torch threads, `serve --threads` (default 1; the "
                        "aggregation runs its blocks on that many threads)")
    p.add_argument("--previous", metavar="IMPL[,IMPL]",
                   help="also run every configuration with each of these aggregations, side "
                        "by side: 'reference' (the original implementation) or a git commit")
    a = p.parse_args(argv)
    previous = [(impl, REFERENCE if impl == "reference" else previous_source(impl))
                for impl in (a.previous or "").split(",") if impl]
    work = a.work or Path(tempfile.mkdtemp(prefix="crowdtrain-load-"))
    header("coordinator load: N simulated volunteers, real int8 payloads, one coordinator")
    base = base_run(work / "cache", "tiny")
    if a.quick:
        plan = {"tiny": [8]}
        a.rounds = 1
    elif a.sizes:
        counts = [int(x) for x in (a.workers or "1,10,100").split(",")]
        plan = {s: counts for s in a.sizes.split(",")}
    else:
        plan = FULL
    print(f"# {a.rounds} round(s) per configuration, upload spread {a.spread:g}s; the "
          f"coordinator ({a.coordinator_threads} torch thread(s)) aggregates with "
          f"{base.config.swarm.aggregation!r}", flush=True)
    for size, counts in plan.items():
        template = base if size == "tiny" else make_run(base, work / f"template-{size}", size)
        for n in counts:
            t = a.coordinator_threads
            befores = []
            for impl, path in previous:
                befores.append(one(template, work, size, n, a.rounds, a.spread, impl, path, t))
                report(befores[-1])
            now = one(template, work, size, n, a.rounds, a.spread, threads=t)
            report(now)
            for before in befores:
                compare(before, now)
    print(f"# {load()} at the end; work in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
