"""Communication: DiLoCo (K workers, several H) against plain synchronous data parallelism on
torch.distributed, and a volunteer's round over an emulated home uplink.

Part "quality" (same model, same global batch, same tokens, same round-0 weights, one torch
thread per process):
- DiLoCo, K workers x T inner steps, H in --h (T/H rounds), uploads int8 or fp32 and the
  update int8 or fp32: the coordinator's exact math in one process (as bench/diloco_sim.py:
  per-worker AdamW state, shards and seeds per lease, error feedback on both sides,
  token-weighted mean, outer SGD). Bytes per worker: the payload and update files' sizes.
- DDP: K real processes (torch.multiprocessing, gloo over TCP on loopback,
  DistributedDataParallel around the same InnerLoop), T steps of batch b each: the gradients
  are averaged every step. Bytes per worker: measured on `lo` (/proc/net/dev) inside a network
  namespace made for the run (so nothing else on the machine is counted), divided by K.
- floor: one worker alone, T steps of batch b.
Reported: held-out loss and bytes sent per worker (and received) for each.

Part "uplink": one volunteer (the real worker, its own process, one torch thread) talks to a
coordinator process through a rate-limited transport emulating a home connection: 10 Mbit/s
up, 50 Mbit/s down, 40 ms round trip (an asyncio TCP proxy on loopback: a token bucket per
direction shared by all connections, 20 ms added each way). `tc netem`, which would do this in
the kernel on a veth pair, is not available in this container's kernel (only `tbf`, which
shapes the rate but cannot add latency), hence the proxy. For `small` and `base` (109.5M
parameters; batch 8 x 64 so that a CPU step stays short): a steady-state round's wall time,
its parts, compute utilisation (training time / round time), and the H at which utilisation
would reach 95% at this step time without overlapping communication.

The quality targets belong to the convergence issue; this reports the curve.

    python bench/communication.py --part quality          # full: tiny, K=4, T=160 (~10 min)
    python bench/communication.py --part uplink           # full: small H=20, base H=2 (~10 min)
    python bench/communication.py --quick                 # both parts, tiny sizes (~1 min)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchlib import (  # noqa: E402
    WorkerTimes,
    base_run,
    header,
    load,
    make_run,
    params_of,
    run_instrumented_worker,
    serve,
)

from crowdtrain import compress  # noqa: E402
from crowdtrain.aggregate import OuterConfig, apply_update, outer_step, weighted_mean  # noqa: E402
from crowdtrain.data import get_batch, load_split  # noqa: E402
from crowdtrain.localswarm import LocalSwarm, free_port  # noqa: E402
from crowdtrain.model import load_into, state_dict_for_save  # noqa: E402
from crowdtrain.rundir import Run  # noqa: E402
from crowdtrain.train import InnerLoop, evaluate  # noqa: E402

HERE = Path(__file__).resolve()


def schedule(run: Run, steps: int):
    """The run's inner settings over exactly `steps` steps (as bench/diloco_sim.py)."""
    return dataclasses.replace(run.config.train, total_steps=steps,
                               warmup_steps=max(1, min(50, steps // 10)))


# ------------------------------------------------------------------------------ DiLoCo


def diloco(run: Run, workers: int, inner_steps: int, rounds: int, outer: OuterConfig,
           up: str = "int8", down: str = "int8") -> tuple[float, int, int]:
    """Held-out loss after `rounds` rounds, bytes sent and received per worker. The same math
    as bench/diloco_sim.py's `simulate`, with the update's codec as a parameter too (the
    coordinator always publishes int8; fp32 here is the uncompressed reference)."""
    cfg = schedule(run, rounds * inner_steps)
    shards = load_split(run.data_dir, run.index, "train")
    global_model, ck = run.load_model(0)
    theta = {k: v.clone() for k, v in ck.tensors.items()}
    shapes = {k: tuple(v.shape) for k, v in theta.items()}
    loops = [InnerLoop(run.load_model(0)[0], cfg, torch.device("cpu")) for _ in range(workers)]
    worker_residual: list[dict | None] = [None] * workers
    residual = {k: torch.zeros_like(v) for k, v in theta.items()}
    momentum = None
    lease = sent = received = 0
    for r in range(rounds):
        deltas, weights = [], []
        for w, loop in enumerate(loops):
            shard = [shards[lease % len(shards)]]
            seed = run.config.seed * 1_000_003 + lease
            lease += 1
            load_into(loop.model, theta)
            st = loop.run(lambda s, sh=shard, sd=seed: get_batch(sh, cfg.batch_size, cfg.seq_len,
                                                                 sd, s),
                          r * inner_steps, inner_steps)
            params = state_dict_for_save(loop.model)
            delta = {k: theta[k] - params[k] for k in theta}
            if worker_residual[w] is not None and up != "fp32":
                delta = {k: delta[k] + worker_residual[w][k] for k in delta}
            blob = compress.to_bytes(delta, up)
            sent += len(blob)
            got, _ = compress.from_bytes(blob, shapes)
            worker_residual[w] = {k: delta[k] - got[k] for k in delta}
            deltas.append(got)
            weights.append(st.tokens)
        update, momentum = outer_step(theta, weighted_mean(deltas, weights), momentum, outer)
        target = {k: update[k] + residual[k] for k in update}
        blob = compress.to_bytes(target, down)
        received += len(blob) * workers
        applied, _ = compress.from_bytes(blob, shapes)
        residual = {k: target[k] - applied[k] for k in target}
        theta = apply_update(theta, applied)
    load_into(global_model, theta)
    loss = evaluate(global_model, run.val_windows(), torch.device("cpu"))
    return loss, sent // workers, received // workers


def floor(run: Run, steps: int) -> float:
    cfg = schedule(run, steps)
    model, _ = run.load_model(0)
    train = load_split(run.data_dir, run.index, "train")
    InnerLoop(model, cfg, torch.device("cpu")).run(
        lambda s: get_batch(train, cfg.batch_size, cfg.seq_len, cfg.seed, s), 0, steps)
    return evaluate(model, run.val_windows(), torch.device("cpu"))


# ------------------------------------------------------------------------------ DDP


def lo_bytes() -> tuple[int, int]:
    """(received, transmitted) bytes of `lo` in this process's network namespace."""
    for ln in open("/proc/net/dev"):
        name, _, rest = ln.partition(":")
        if name.strip() == "lo":
            f = rest.split()
            return int(f[0]), int(f[8])
    return 0, 0


def _ddp_rank(rank: int, world: int, port: int, run_dir: str, steps: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    run = Run(run_dir)
    cfg = schedule(run, steps)
    model, _ = run.load_model(0)
    loop = InnerLoop(DistributedDataParallel(model), cfg, torch.device("cpu"))
    train = load_split(run.data_dir, run.index, "train")
    seed = run.config.seed * 1_000_003 + 7919 * (rank + 1)
    st = loop.run(lambda s: get_batch(train, cfg.batch_size, cfg.seq_len, seed, s), 0, steps)
    dist.barrier()
    if rank == 0:
        loss = evaluate(model, run.val_windows(), torch.device("cpu"))
        Path(out).write_text(json.dumps({"loss": loss, "seconds": st.seconds}))
    dist.destroy_process_group()


def ddp_launch(run_dir: str, world: int, steps: int, out: str) -> None:
    """In its own process (and network namespace when possible): spawn the K ranks, count
    the bytes they move on `lo`."""
    import torch.multiprocessing as mp

    rx0, tx0 = lo_bytes()
    mp.spawn(_ddp_rank, args=(world, free_port(), run_dir, steps, out), nprocs=world)
    rx1, tx1 = lo_bytes()
    res = json.loads(Path(out).read_text())
    res.update(tx=tx1 - tx0, rx=rx1 - rx0)
    Path(out).write_text(json.dumps(res))


def ddp(run: Run, world: int, steps: int, work: Path) -> tuple[dict, str]:
    """Run DDP; returns its result and how its bytes were counted."""
    out = work / f"ddp-{world}-{steps}.json"
    argv = [sys.executable, str(HERE), "_ddp", str(run.dir), str(world), str(steps), str(out)]
    ns = f"ctbench{os.getpid()}"
    isolated = subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode == 0
    try:
        if isolated:
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            argv = ["ip", "netns", "exec", ns, *argv]
        subprocess.run(argv, check=True)
    finally:
        if isolated:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    how = ("lo of a network namespace of its own" if isolated else
           "the machine's lo (no network namespace: other traffic is counted too)")
    return json.loads(out.read_text()), how


def part_quality(a: argparse.Namespace, work: Path) -> None:
    run = base_run(work / "cache", a.preset, corpus_chars=300_000 if a.quick else None)
    torch.set_num_threads(1)
    k, t, n = a.workers, a.steps, params_of(run)
    b = run.config.train.batch_size
    lr, mom = map(float, a.outer.split(":"))
    outer = OuterConfig(lr=lr, momentum=mom, nesterov=mom > 0)
    print(f"\n## quality: {a.preset} ({n:,} parameters), K={k}, T={t} inner steps per worker, "
          f"batch {b} x {run.config.train.seq_len} per worker (global {k * b}), outer lr {lr} "
          f"momentum {mom}; held-out {run.config.eval_tokens:,} tokens", flush=True)
    init = float(run.load_model(0)[1].meta["val_loss"])
    print(f"initial model: held-out {init:.4f}")
    t0 = time.perf_counter()
    f = floor(run, t)
    print(f"floor (1 worker, batch {b}, {t} steps): held-out {f:.4f}, 0 bytes "
          f"({time.perf_counter() - t0:.0f}s)  [{load()}]", flush=True)
    t0 = time.perf_counter()
    res, how = ddp(run, k, t, work)
    per_step = 2 * (k - 1) / k * 4 * n
    print(f"DDP (gloo, {k} processes, batch {b} each, {t} steps): held-out {res['loss']:.4f}, "
          f"sent per worker {res['tx'] / k / 1e6:,.1f} MB (counted on {how}; ring all-reduce "
          f"of fp32 gradients would be {per_step * t / 1e6:,.1f} MB) "
          f"({time.perf_counter() - t0:.0f}s)  [{load()}]", flush=True)
    ddp_bytes = res["tx"] / k
    print(f"{'H':>5} {'rounds':>6}  {'codec up/down':<13} {'held-out':>9} {'vs DDP':>8} "
          f"{'vs floor':>9} {'sent/worker':>12} {'recv/worker':>12} {'DDP bytes / these':>18}")
    for h in a.h:
        if t % h:
            print(f"{h:>5}  skipped: T={t} is not a multiple of H")
            continue
        for up, down in (("int8", "int8"), ("fp32", "fp32")):
            t0 = time.perf_counter()
            loss, sent, recv = diloco(run, k, h, t // h, outer, up, down)
            print(f"{h:>5} {t // h:>6}  {up + '/' + down:<13} {loss:>9.4f} "
                  f"{loss - res['loss']:>+8.4f} {loss - f:>+9.4f} {sent / 1e6:>10.2f}MB "
                  f"{recv / 1e6:>10.2f}MB {ddp_bytes / sent:>17.0f}x  "
                  f"({time.perf_counter() - t0:.0f}s)  [{load()}]", flush=True)


# ------------------------------------------------------------------------------ uplink


class Link:
    """One direction of an emulated access link: serialisation at `mbit` Mbit/s shared by
    every connection, then `delay` seconds of propagation."""

    def __init__(self, mbit: float, delay: float) -> None:
        self.rate, self.delay, self.free_at = mbit * 1e6 / 8, delay, 0.0

    def schedule(self, now: float, n: int) -> float:
        self.free_at = max(now, self.free_at) + n / self.rate
        return self.free_at + self.delay


class Proxy(threading.Thread):
    """A TCP proxy on 127.0.0.1:`port` to 127.0.0.1:`target` through an emulated link."""

    def __init__(self, target: int, up_mbit: float, down_mbit: float, rtt: float) -> None:
        super().__init__(daemon=True)
        self.port, self.target = free_port(), target
        self.up, self.down = Link(up_mbit, rtt / 2), Link(down_mbit, rtt / 2)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   link: Link) -> None:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await q.get()
                if at - loop.time() > 0:
                    await asyncio.sleep(at - loop.time())
                if data is None:
                    break
                writer.write(data)
                await writer.drain()
            writer.close()

        task = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                q.put_nowait((link.schedule(loop.time(), len(data)), data))
                ahead = link.free_at - loop.time() - 0.1  # ~a bottleneck buffer of 100 ms
                if ahead > 0:
                    await asyncio.sleep(ahead)
        except ConnectionError:
            pass
        q.put_nowait((max(loop.time(), link.free_at) + link.delay, None))
        await task

    async def handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(self.pump(cr, sw, self.up), self.pump(sr, cw, self.down),
                             return_exceptions=True)

    def run(self) -> None:
        self.loop = asyncio.new_event_loop()

        async def main() -> None:
            server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
            self.ready.set()
            async with server:
                await server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except RuntimeError:
            pass

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)


def uplink_one(label: str, run: Run, h: int, rounds: int, work: Path, a: argparse.Namespace
               ) -> None:
    out = work / f"uplink-{label}.json"
    with LocalSwarm(run.dir, work / f"uplink-{label}-logs") as swarm:
        serve(swarm)
        proxy = Proxy(swarm.port, a.up_mbit, a.down_mbit, a.rtt_ms / 1000)
        proxy.start()
        proxy.ready.wait(10)
        try:
            subprocess.run([sys.executable, str(HERE), "_worker",
                            f"http://127.0.0.1:{proxy.port}", str(work / f"home-{label}"),
                            str(rounds), str(out)], check=True)
        finally:
            proxy.stop()
    t = WorkerTimes(**json.loads(out.read_text()))
    n = params_of(run)
    steady = [t.window(i - 1, i) for i in range(1, len(t.at_submit))]
    w = {k: sum(s[k] for s in steady) / len(steady) for k in steady[0]}
    util = w["train"] / w["wall"]
    step = w["train"] / h
    comm = w["wall"] - w["train"]
    h95 = 19 * comm / step
    payload = t.bytes_sent / rounds
    print(f"{label:>5} {n / 1e6:6.1f}M H={h:<3} round {w['wall']:7.1f}s: train {w['train']:6.1f}s "
          f"({step:.2f}s/step), upload {w['upload']:6.1f}s ({payload / 1e6:.1f} MB), update "
          f"download+apply {w['sync']:5.1f}s, compress {w['compress']:4.1f}s, lease/wait "
          f"{w['lease']:4.1f}s, local saves {w['local_disk']:4.1f}s, other {w['rest']:4.1f}s; "
          f"compute utilisation {util:.1%}; 95% needs H >= {h95:,.0f} at this step time; "
          f"start to first step {t.to_first_step:.1f}s (model download)  [{load()}]",
          flush=True)


def part_uplink(a: argparse.Namespace, work: Path) -> None:
    print(f"\n## uplink: {a.up_mbit:g} Mbit/s up, {a.down_mbit:g} Mbit/s down, "
          f"{a.rtt_ms:g} ms round trip (asyncio proxy); one worker, one torch thread; "
          "steady-state rounds (round 2 on)", flush=True)
    tiny = base_run(work / "cache", "tiny")
    if a.quick:
        run = make_run(tiny, work / "uplink-tiny", swarm={
            "rounds": 2, "inner_steps": 3, "round_seconds": 3600.0, "min_contributions": 1})
        uplink_one("tiny", run, 3, 2, work, a)
        return
    small = base_run(work / "cache", "small", corpus_chars=None)
    run = make_run(small, work / "uplink-small", swarm={
        "rounds": 3, "inner_steps": a.small_h, "round_seconds": 3600.0, "min_contributions": 1})
    uplink_one("small", run, a.small_h, 3, work, a)
    run = make_run(tiny, work / "uplink-base", "base", swarm={
        "rounds": 2, "inner_steps": a.base_h, "round_seconds": 3600.0, "min_contributions": 1})
    uplink_one("base", run, a.base_h, 2, work, a)


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_ddp"]:  # internal: the DDP launcher, in its network namespace
        ddp_launch(argv[1], int(argv[2]), int(argv[3]), argv[4])
        return 0
    if argv[:1] == ["_worker"]:  # internal: the uplink worker
        t = run_instrumented_worker(argv[1], Path(argv[2]), "uplink", int(argv[3]))
        Path(argv[4]).write_text(json.dumps(dataclasses.asdict(t)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--part", choices=["quality", "uplink", "all"], default="all")
    p.add_argument("--preset", default="tiny", help="model of the quality part (default tiny)")
    p.add_argument("--workers", type=int, default=4, help="K (default 4)")
    p.add_argument("--steps", type=int, default=160, help="T, inner steps per worker")
    p.add_argument("--h", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 4, 16, 40, 160], help="comma-separated H values")
    p.add_argument("--outer", default="1.0:0.0", metavar="LR:MOMENTUM",
                   help="outer SGD (default 1.0:0.0, plain averaging, the demo's setting)")
    p.add_argument("--up-mbit", type=float, default=10.0)
    p.add_argument("--down-mbit", type=float, default=50.0)
    p.add_argument("--rtt-ms", type=float, default=40.0)
    p.add_argument("--small-h", type=int, default=20, help="H of the small uplink run")
    p.add_argument("--base-h", type=int, default=2, help="H of the base uplink run")
    p.add_argument("--work", type=Path, help="keep runs and logs here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="a short smoke run of both parts")
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.workers, a.steps, a.h = "tiny", 2, 8, [2, 8]
    work = a.work or Path(tempfile.mkdtemp(prefix="crowdtrain-comm-"))
    work.mkdir(parents=True, exist_ok=True)
    header("communication: DiLoCo vs DDP (gloo), and a round over a home uplink")
    if a.part in ("quality", "all"):
        part_quality(a, work)
    if a.part in ("uplink", "all"):
        part_uplink(a, work)
    print(f"# {load()} at the end; work in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
