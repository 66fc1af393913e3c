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

Part "convergence" (the convergence issue's table): DESIGN.md's reference setting, a
0.45M-parameter byte-level model, K=4 workers x batch 8 x 128 tokens, T=1500 inner steps each:
DDP (the ceiling, same tokens), one worker alone (the floor: same steps and batch as one swarm
worker, 1/K of the tokens), plain DiLoCo (fixed H, outer Nesterov 0.7/0.9, the defaults before
the issue) and the run's current defaults (`SwarmConfig()`: growing H, outer optimizer) at
H = 30, 100, 300 on average (the same number of rounds, so the same bytes, for both), with
held-out loss and bytes per worker, and the issue's targets checked. Each configuration runs
in its own process, `--jobs` at a time (DDP alone first). `--conv-overlap F,...` adds the int8
defaults with overlapped rounds (each round's update folded in after F x H of the next
round's steps; bench/diloco_sim.py), side by side with the stop-and-wait rows.

    python bench/communication.py --part quality          # full: tiny, K=4, T=160 (~10 min)
    python bench/communication.py --part convergence      # full: ~40 min with --jobs 2
    python bench/communication.py --part uplink           # full: small H=20, base H=2 (~10 min)
    python bench/communication.py --quick                 # both parts, tiny sizes (~1 min)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
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
from diloco_sim import Recipe, schedule, simulate  # noqa: E402

from crowdtrain.cli.processes import LocalSwarm, free_port  # noqa: E402
from crowdtrain.run.data import get_batch, load_split  # noqa: E402
from crowdtrain.run.folder import Run, SwarmConfig  # noqa: E402
from crowdtrain.run.schedule import inner_steps_schedule  # noqa: E402
from crowdtrain.run.train import InnerLoop, evaluate  # noqa: E402

HERE = Path(__file__).resolve()
DDP_TIMEOUT = 120  # seconds a DDP rank waits on the others before it fails


def floor(run: Run, steps: int) -> float:
    cfg = schedule(run.config.train, steps)
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
    # gloo binds to the address the hostname resolves to unless told an interface: inside a
    # network namespace of only `lo` that address may not exist, so name it; a rank that
    # hears nothing for DDP_TIMEOUT seconds fails instead of waiting for ever
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=DDP_TIMEOUT))
    run = Run(run_dir)
    cfg = schedule(run.config.train, steps)
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


def run_group(argv: list[str], timeout: float) -> bool:
    """Run `argv` in a process group of its own; False if it was still running after
    `timeout` s, when the whole group is killed (the DDP ranks too: left alive they would hold
    the caller's output pipe open). A failure exits with the command's status."""
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False
    if code:
        raise SystemExit(f"DDP failed (exit {code})")
    return True


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
        for attempt in (1, 2):  # a gloo rendezvous that hangs (seen twice in CI) is retried once
            if run_group(argv, DDP_TIMEOUT + 10 * steps):
                break
            print(f"  DDP did not finish in {DDP_TIMEOUT + 10 * steps} s (try {attempt} of 2); its "
                  "processes were killed", flush=True)
        else:
            raise SystemExit("DDP hung twice (gloo rendezvous); run the benchmark again")
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
            res_h = simulate(run, k, Recipe(f"H={h}", (h,) * (t // h), lr, mom, mom > 0,
                                            up=up, down=down))
            loss, sent, recv = res_h.loss, res_h.sent, res_h.received
            print(f"{h:>5} {t // h:>6}  {up + '/' + down:<13} {loss:>9.4f} "
                  f"{loss - res['loss']:>+8.4f} {loss - f:>+9.4f} {sent / 1e6:>10.2f}MB "
                  f"{recv / 1e6:>10.2f}MB {ddp_bytes / sent:>17.0f}x  "
                  f"({time.perf_counter() - t0:.0f}s)  [{load()}]", flush=True)


# ------------------------------------------------------------------------------ convergence

# DESIGN.md's reference: a 0.45M-parameter byte-level model, K=4 workers x batch 8 x 128 tokens,
# T=1500 inner steps each, held-out on 65,536 tokens
CONV_TRAIN = {"batch_size": 8, "seq_len": 128, "lr": 3e-3}
PLAIN = SwarmConfig(inner_steps_growth=1.0, outer_lr=0.7, outer_momentum=0.9, nesterov=True,
                    warm_start=0.0)


def recipe_of(name: str, swarm: SwarmConfig, steps: int, h: int, codec: str | None = None,
              down: str = "int8") -> Recipe:
    """What a run with these swarm settings does over `steps` inner steps in all (the owner's
    warm start, `warm_start` of them, then rounds of mean H `h`); `codec`: the uploads' (a
    spec of diloco_sim.codec_options, e.g. sparse/0.01/2); `down`: the updates' (the
    coordinator publishes int8). The workers' error-feedback decay is the swarm's
    sparse_ef_decay (it applies to sparse uploads only)."""
    warm = round(swarm.warm_start * steps)
    rounds = max(1, (steps - warm) // h)
    return Recipe(name, tuple(inner_steps_schedule(steps - warm, rounds,
                                                   swarm.inner_steps_growth)),
                  swarm.outer_lr, swarm.outer_momentum, swarm.nesterov,
                  up=codec or swarm.codec, down=down, warm=warm, ef_decay=swarm.sparse_ef_decay)


def _sim_job(run_dir: str, workers: int, recipe_json: str, out: str) -> None:
    torch.set_num_threads(1)
    rec = json.loads(recipe_json)
    res = simulate(Run(run_dir), workers, Recipe(**{**rec, "h": tuple(rec["h"])}))
    Path(out).write_text(json.dumps(dataclasses.asdict(res)))


def _floor_job(run_dir: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    loss = floor(Run(run_dir), steps)
    Path(out).write_text(json.dumps({"loss": loss, "seconds": time.perf_counter() - t0}))


def _pool(jobs: list[tuple[str, list[str]]], parallel: int) -> None:
    """Run (label, argv) subprocesses `parallel` at a time; report each as it ends."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            label, argv = pending.pop(0)
            running.append((label, subprocess.Popen(argv), time.perf_counter()))
        time.sleep(1)
        for item in list(running):
            label, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode:
                    raise SystemExit(f"{label} failed (exit {proc.returncode})")
                print(f"  done: {label} ({time.perf_counter() - t0:.0f}s)  [{load()}]",
                      flush=True)


def part_convergence(a: argparse.Namespace, work: Path) -> None:
    """Plain DiLoCo and the run defaults at several H, against DDP and a lone worker."""
    base = base_run(work / "cache", "tiny", corpus_chars=a.conv_chars, vocab_size=260)
    run = make_run(base, work / "conv-run", a.conv_shape, train=CONV_TRAIN,
                   eval_tokens=a.conv_eval_tokens)
    k, t, n = a.workers, a.conv_steps, params_of(run)
    new = SwarmConfig()
    print(f"\n## convergence: {n:,} parameters (byte-level), K={k} workers x batch "
          f"{CONV_TRAIN['batch_size']} x {CONV_TRAIN['seq_len']}, T={t} inner steps each; "
          f"held-out {run.config.eval_tokens:,} tokens; {a.jobs} configurations at a time, one "
          f"torch thread each", flush=True)
    print(f"plain DiLoCo: fixed H, outer SGD lr {PLAIN.outer_lr} Nesterov momentum "
          f"{PLAIN.outer_momentum}, int8 both ways (the run defaults before this issue)")
    grow = (f"H growing {new.inner_steps_growth:g}x over the run (same rounds and total)"
            if new.inner_steps_growth != 1 else "fixed H")
    print(f"run defaults: {grow}, outer SGD lr {new.outer_lr} momentum {new.outer_momentum}"
          f"{' (Nesterov)' if new.nesterov and new.outer_momentum else ''}, {new.codec} "
          f"uploads, int8 updates, aggregation {new.aggregation}"
          + (f"; warm start: the owner trains the first {new.warm_start:.0%} of the steps on "
             f"{new.warm_start_batch} x the batch" if new.warm_start else ""), flush=True)
    sparse_new = dataclasses.replace(new, codec="sparse", outer_lr=None, outer_momentum=None)
    if any(c.startswith("sparse") for c in a.conv_codecs):
        print(f"sparse uploads: that codec's run defaults, outer SGD lr {sparse_new.outer_lr} "
              f"momentum {sparse_new.outer_momentum}, the workers' error feedback decayed by "
              f"{sparse_new.sparse_ef_decay:g} a round", flush=True)
    recipes = []
    for h in a.conv_h:
        if a.conv_plain:
            recipes.append(recipe_of(f"plain H={h}", PLAIN, t, h))
        for codec in a.conv_codecs:  # the defaults with each upload codec (int8: the default)
            label = "defaults" if codec == new.codec else f"defaults, {codec} uploads"
            # a sparse run's own defaults: its outer optimizer and error-feedback decay
            sw = sparse_new if codec.startswith("sparse") else new
            recipes.append(recipe_of(f"{label} H={h}", sw, t, h, codec=codec))
        for spec in a.conv_overlap:  # overlapped rounds: int8 defaults, updates F of a round late
            f, _, rule = spec.partition(":")
            label = f"defaults, overlapped {float(f):g}" + (f" {rule}" if rule else "")
            recipes.append(dataclasses.replace(recipe_of(f"{label} H={h}", new, t, h),
                                               overlap_delay=float(f), overlap_rule=rule or "fold"))
    for pair in a.conv_down:  # the published update's codec: UP:DOWN at --conv-down-h
        up, down = pair.split(":")
        recipes.append(recipe_of(f"defaults, {up} uploads, {down} updates H={a.conv_down_h}",
                                 sparse_new if up.startswith("sparse") else new, t,
                                 a.conv_down_h, codec=up, down=down))
    if a.conv_int4:  # the codec question: int4 against the int8 default
        recipes.append(recipe_of(f"defaults, int4 uploads H={a.conv_int4}", new, t,
                                 a.conv_int4, codec="int4"))
    out = {r.name: work / ("conv-" + re.sub(r"[^A-Za-z0-9.]+", "-", r.name) + ".json")
           for r in recipes}
    jobs = [("floor", [sys.executable, str(HERE), "_floor", str(run.dir), str(t),
                       str(work / "conv-floor.json")])]
    jobs += [(r.name, [sys.executable, str(HERE), "_sim", str(run.dir), str(k),
                       json.dumps(dataclasses.asdict(r)), str(out[r.name])]) for r in recipes]
    t0 = time.perf_counter()
    ddp_json = work / f"ddp-{k}-{t}.json"
    if a.conv_reuse and ddp_json.is_file() and (work / "conv-floor.json").is_file():
        jobs = jobs[1:]  # deterministic: DDP and the lone worker of an earlier run in --work
        dp, how = json.loads(ddp_json.read_text()), "lo, in an earlier run (--conv-reuse)"
        print(f"  reused: DDP and the lone worker from {work} (--conv-reuse)", flush=True)
    else:
        dp, how = ddp(run, k, t, work)  # alone: it is K processes itself
        print(f"  done: DDP ({time.perf_counter() - t0:.0f}s)  [{load()}]", flush=True)
    _pool(jobs, a.jobs)
    fl = json.loads((work / "conv-floor.json").read_text())["loss"]
    dp_loss, dp_bytes = dp["loss"], dp["tx"] / k
    dp_recv = dp["rx"] / k
    print("\n| configuration | H per round | rounds | held-out | / DDP | / lone worker | "
          "sent per worker | received per worker | DDP bytes / these (sent, received) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| data parallel (DDP, gloo, ceiling) | 1 | {t} | {dp_loss:.4f} | 1.000 | "
          f"{dp_loss / fl:.3f} | {dp_bytes / 1e6:,.0f} MB | {dp_recv / 1e6:,.0f} MB | 1x |")
    print(f"| one worker alone (floor) | - | - | {fl:.4f} | {fl / dp_loss:.3f} | 1.000 | 0 | 0 "
          "| - |")
    verdicts = []
    results = {r.name: json.loads(out[r.name].read_text()) for r in recipes}
    for r in recipes:
        res = results[r.name]
        hs = r.h
        h_text = str(hs[0]) if len(set(hs)) == 1 else f"{hs[0]} -> {hs[-1]}"
        ratio = res["loss"] / dp_loss
        fewer = dp_bytes / res["sent"]
        print(f"| {r.name} | {h_text} | {res['rounds']} | {res['loss']:.4f} | {ratio:.3f} | "
              f"{res['loss'] / fl:.3f} | {res['sent'] / 1e6:.3f} MB | "
              f"{res['received'] / 1e6:.3f} MB | {fewer:,.0f}x, "
              f"{dp_recv / res['received']:,.0f}x |", flush=True)
        ref = results.get(f"defaults H={r.name.rpartition('H=')[2]}")
        if r.name.startswith("defaults, sparse") and "updates" not in r.name and ref:
            up_x, dq = ref["sent"] / res["sent"], res["loss"] / ref["loss"] - 1
            verdicts.append(f"{r.name}: uploads {up_x:.1f}x fewer bytes than int8 (target >= "
                            f"20x: {'met' if up_x >= 20 else 'MISSED'}), {fewer:,.0f}x fewer "
                            f"than DDP (target >= 10,000x: "
                            f"{'met' if fewer >= 10_000 else 'MISSED'}); held-out {dq:+.2%} "
                            f"against int8's (target within 1%: "
                            f"{'met' if dq <= 0.01 else 'MISSED'})")
        if r.name.startswith("defaults") and r.overlap_delay is None:
            if r.name == "defaults H=100":
                verdicts.append(f"H=100: {ratio:.3f} x DDP (target <= 1.03: "
                                f"{'met' if ratio <= 1.03 else 'MISSED'}), "
                                f"{res['loss'] / fl:.3f} x the lone worker (target < 1: "
                                f"{'met' if res['loss'] < fl else 'MISSED'})")
            if fewer >= 400:
                verdicts.append(f"{r.name} sends {fewer:,.0f}x fewer bytes than DDP: "
                                f"{ratio:.3f} x DDP (target <= 1.05: "
                                f"{'met' if ratio <= 1.05 else 'MISSED'})")
        if r.overlap_delay is not None and ref:
            dq = res["loss"] / ref["loss"] - 1
            verdicts.append(f"{r.name}: held-out {dq:+.2%} against stop-and-wait's at the same "
                            f"H (target within 1%: {'met' if dq <= 0.01 else 'MISSED'})")
    warm = recipe_of("", new, t, a.conv_h[0]).warm
    if warm:
        print(f"warm start (defaults): the owner trained {warm} steps x "
              f"{new.warm_start_batch * CONV_TRAIN['batch_size']} sequences "
              f"({warm * new.warm_start_batch * CONV_TRAIN['batch_size'] * CONV_TRAIN['seq_len']:,}"
              f" tokens, {warm * new.warm_start_batch:,} worker-steps of compute, on one "
              f"machine) before the swarm; they come out of the same token budget, so every "
              f"row trains {t * k * CONV_TRAIN['batch_size'] * CONV_TRAIN['seq_len']:,} tokens")
    print(f"DDP bytes counted on {how}; total {time.perf_counter() - t0:.0f}s")
    for v in verdicts:
        print("target:", v)


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
          f"({step:.2f}s/step), upload {w['upload']:6.1f}s ({payload / 1e6:.2f} MB), update "
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
        for codec in a.uplink_codecs:
            label = "tiny" if codec == "int8" else f"tiny-{codec}"
            run = make_run(tiny, work / f"uplink-{label}", swarm={
                "rounds": 2, "inner_steps": 3, "round_seconds": 3600.0, "min_contributions": 1,
                "codec": codec})
            uplink_one(label, run, 3, 2, work, a)
        return
    for codec in a.uplink_codecs:  # int8 (the default), or the sparse codec at its defaults
        label = "" if codec == "int8" else f"-{codec}"
        if "small" in a.uplink_models:
            small = base_run(work / "cache", "small", corpus_chars=None)
            run = make_run(small, work / f"uplink-small{label}", swarm={
                "rounds": 3, "inner_steps": a.small_h, "round_seconds": 3600.0,
                "min_contributions": 1, "codec": codec})
            uplink_one(f"small{label}", run, a.small_h, 3, work, a)
        if "base" in a.uplink_models:
            run = make_run(tiny, work / f"uplink-base{label}", "base", swarm={
                "rounds": 2, "inner_steps": a.base_h, "round_seconds": 3600.0,
                "min_contributions": 1, "codec": codec})
            uplink_one(f"base{label}", run, a.base_h, 2, work, a)


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_ddp"]:  # internal: the DDP launcher, in its network namespace
        ddp_launch(argv[1], int(argv[2]), int(argv[3]), argv[4])
        return 0
    if argv[:1] == ["_sim"]:  # internal: one simulated configuration of the convergence part
        _sim_job(argv[1], int(argv[2]), argv[3], argv[4])
        return 0
    if argv[:1] == ["_floor"]:  # internal: the lone worker of the convergence part
        _floor_job(argv[1], int(argv[2]), argv[3])
        return 0
    if argv[:1] == ["_worker"]:  # internal: the uplink worker
        t = run_instrumented_worker(argv[1], Path(argv[2]), "uplink", int(argv[3]))
        Path(argv[4]).write_text(json.dumps(dataclasses.asdict(t)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--part", choices=["quality", "convergence", "uplink", "all"], default="all",
                   help="all: quality and uplink (convergence is long: ask for it)")
    p.add_argument("--preset", default="tiny", help="model of the quality part (default tiny)")
    p.add_argument("--workers", type=int, default=4, help="K (default 4)")
    p.add_argument("--steps", type=int, default=160, help="T, inner steps per worker")
    p.add_argument("--h", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 4, 16, 40, 160], help="comma-separated H values")
    p.add_argument("--outer", default="1.0:0.0", metavar="LR:MOMENTUM",
                   help="outer SGD (default 1.0:0.0, plain averaging, the demo's setting)")
    p.add_argument("--conv-steps", type=int, default=1500, help="convergence: T (default 1500)")
    p.add_argument("--conv-h", type=lambda s: [int(x) for x in s.split(",")],
                   default=[30, 100, 300], help="convergence: mean H values (default 30,100,300)")
    p.add_argument("--conv-shape", default="0.45M", help="convergence: model shape (benchlib)")
    p.add_argument("--conv-chars", type=int, default=None,
                   help="convergence: corpus characters (default: all of it)")
    p.add_argument("--conv-eval-tokens", type=int, default=65536)
    p.add_argument("--conv-codecs", type=lambda s: s.split(","), default=["int8"],
                   metavar="SPEC,...", help="convergence: the defaults' rows with these upload "
                   "codecs (int8, int4, sparse/DENSITY/BITS, ...; default int8)")
    p.add_argument("--no-conv-plain", dest="conv_plain", action="store_false",
                   help="convergence: leave out the plain DiLoCo rows")
    p.add_argument("--conv-down", action="append", default=[], metavar="UP:DOWN",
                   help="convergence: also the defaults with uploads in UP and the published "
                        "update in DOWN (codec specs) at --conv-down-h")
    p.add_argument("--conv-down-h", type=int, default=100, metavar="H")
    p.add_argument("--conv-int4", type=int, default=100, metavar="H",
                   help="convergence: also the defaults with the int4 codec at this "
                        "H (0: not)")
    p.add_argument("--conv-overlap", type=lambda s: s.split(","), default=[],
                   metavar="F[:eager],...",
                   help="convergence: also the int8 defaults with overlapped rounds at each H, "
                        "a round's update folded in after F x H of the next round's steps "
                        "(1: at the start of the round after; e.g. 0.5,1.0); :eager, the "
                        "simulator's eager variant (bench/diloco_sim.py Recipe.overlap_rule)")
    p.add_argument("--jobs", type=int, default=2, help="convergence: configurations at a time")
    p.add_argument("--conv-reuse", action="store_true",
                   help="convergence: reuse DDP's and the lone worker's results of an earlier "
                        "run in --work (both are deterministic) instead of training them again")
    p.add_argument("--up-mbit", type=float, default=10.0)
    p.add_argument("--down-mbit", type=float, default=50.0)
    p.add_argument("--rtt-ms", type=float, default=40.0)
    p.add_argument("--small-h", type=int, default=20, help="H of the small uplink run")
    p.add_argument("--base-h", type=int, default=2, help="H of the base uplink run")
    p.add_argument("--uplink-models", type=lambda s: s.split(","), default=["small", "base"],
                   metavar="small,base", help="uplink: the models (default both)")
    p.add_argument("--uplink-codecs", type=lambda s: s.split(","), default=["int8"],
                   metavar="int8,sparse", help="uplink: the runs' codecs (default int8; "
                   "sparse at the run defaults' density and bits)")
    p.add_argument("--work", type=Path, help="keep runs and logs here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="a short smoke run of both parts")
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.workers, a.steps, a.h = "tiny", 2, 8, [2, 8]
        # (no int4 row: each configuration is a process of its own, ~8 s of start-up here)
        a.conv_steps, a.conv_h, a.conv_chars, a.conv_int4 = 10, [4], 300_000, None
        a.conv_eval_tokens = 2048
        a.conv_overlap = a.conv_overlap or ["1.0"]
    work = a.work or Path(tempfile.mkdtemp(prefix="crowdtrain-comm-"))
    work.mkdir(parents=True, exist_ok=True)
    header("communication: DiLoCo vs DDP (gloo), and a round over a home uplink")
    if a.part in ("quality", "all"):
        part_quality(a, work)
    if a.part == "convergence" or (a.quick and a.part == "all"):
        part_convergence(a, work)
    if a.part in ("uplink", "all"):
        part_uplink(a, work)
    print(f"# {load()} at the end; work in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
