"""crowdtrain against hivemind (PyPI `hivemind==1.1.12`, the peer a user would pick instead),
side by side on this machine: same model, same data, same batch per peer, 2 and 4 peers on
loopback, one torch thread per process.

hivemind runs in a virtualenv of its own (made by this script, never in the project's
dependencies), with its own packages only: `python -m venv VENV`, then with the lock
(`-c constraints.txt`, the versions CI tests on) `pip install torch==2.13.0` (the CPU wheel),
`pip install -e .` (crowdtrain's dependencies) and `pip install hivemind==1.1.12` (its wheel
ships the p2pd daemon). crowdtrain's model and batches are imported in the hivemind peers from
this checkout. (Not `--system-site-packages`: run from a virtualenv, that sees the base
interpreter's packages instead of this one's, and every peer dies on `import tokenizers`.)

Per system and peer count, each in a network namespace of its own (so the `lo` byte counters
of /proc/net/dev count only that system's traffic):
- plain: P concurrent `InnerLoop` processes, no communication (the per-peer baseline under
  the same CPU contention);
- hivemind: P peers (DHT + `hivemind.Optimizer`: AdamW, target_batch_size, matchmaking_time,
  averaging_timeout, fp16 gradient and state compression; settings printed);
- crowdtrain: a coordinator (`crowdtrain serve`) and P `crowdtrain join` workers.
Each peer trains for --seconds of wall time after its own first step. Reported: per-peer
samples/s and its ratio to plain, held-out loss of peer 0's (hivemind) or the coordinator's
latest (crowdtrain) model at the end, bytes on `lo` per peer, time from process start to the
first training step; then one peer is SIGKILLed --kill-after seconds after every peer has
started training, and the survivors' longest gap between two training steps after the kill
is reported (their stall) next to their median step time.

Targets: crowdtrain >= 3x hivemind's per-peer throughput, <= 1/10 of its bytes, under 5 s
from `join` to the first inner step, no stall of the others after a kill.

    python bench/vs_hivemind.py                      # full: tiny, 2 and 4 peers, 120 s each
    python bench/vs_hivemind.py --quick              # 2 peers, 40 s (builds the venv first)

Run by hand, not in CI: it builds a virtualenv (bench/.venv-hivemind, git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent))

VENV = HERE.parent / ".venv-hivemind"


# ------------------------------------------------------------------------------ peers


def _steps_loop(run_dir: str, rank: int, seconds: float, out: str, step_fn_factory) -> None:
    """Train for `seconds` with the step function the factory builds; write the step times."""
    import torch

    from crowdtrain.run.data import get_batch, load_split
    from crowdtrain.run.folder import Run
    from crowdtrain.run.train import evaluate

    torch.set_num_threads(1)
    run = Run(run_dir)
    cfg = run.config.train
    model, _ = run.load_model(0)
    train = load_split(run.data_dir, run.index, "train")
    step, info = step_fn_factory(model, cfg)
    seed = run.config.seed * 1_000_003 + 7919 * (rank + 1)
    times: list[float] = []
    end = float("inf")
    i = 0
    while time.time() < end:
        x, y = get_batch(train, cfg.batch_size, cfg.seq_len, seed, i)
        step(x, y)
        times.append(time.time())
        if i == 0:  # every system trains for `seconds` after its own start-up
            end = times[0] + seconds
        i += 1
        if i % 10 == 1:  # partial results survive a SIGKILL; the driver watches them
            Path(out).write_text(json.dumps({"times": times, "batch": cfg.batch_size}))
    res = {"times": times, "batch": cfg.batch_size, "ended": time.time(), **info()}
    if rank == 0:
        res["loss"] = evaluate(model, run.val_windows(), torch.device("cpu"))
    Path(out).write_text(json.dumps(res))


def plain_peer(run_dir: str, rank: int, seconds: float, out: str) -> None:
    def factory(model, cfg):
        from crowdtrain.run.train import InnerLoop

        loop = InnerLoop(model, cfg, __import__("torch").device("cpu"))
        state = {"step": 0}

        def step(x, y):
            loop.run(lambda s: (x, y), state["step"], 1)
            state["step"] += 1

        return step, dict

    _steps_loop(run_dir, rank, seconds, out, factory)


def hivemind_peer(run_dir: str, rank: int, seconds: float, out: str, settings: dict,
                  peers_file: str) -> None:
    import hivemind
    import torch
    from hivemind.compression import Float16Compression

    def factory(model, cfg):
        if rank == 0:
            dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            Path(peers_file).write_text(json.dumps([str(a) for a in dht.get_visible_maddrs()]))
        else:
            while not Path(peers_file).is_file():
                time.sleep(0.1)
            dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                               initial_peers=json.loads(Path(peers_file).read_text()))
        opt = hivemind.Optimizer(
            dht=dht, run_id="crowdtrain-bench", batch_size_per_step=cfg.batch_size,
            target_batch_size=settings["target_batch_size"], params=model.parameters(),
            optimizer=lambda params: torch.optim.AdamW(params, lr=cfg.lr,
                                                       betas=(cfg.beta1, cfg.beta2),
                                                       weight_decay=cfg.weight_decay),
            matchmaking_time=settings["matchmaking_time"],
            averaging_timeout=settings["averaging_timeout"],
            grad_compression=Float16Compression(),
            state_averaging_compression=Float16Compression(),
            use_local_updates=False, verbose=False)
        import torch.nn.functional as F

        def step(x, y):
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()

        return step, lambda: {"epochs": opt.local_epoch}

    _steps_loop(run_dir, rank, seconds, out, factory)


# ------------------------------------------------------------------------------ driver


def lo_tx() -> int:
    for ln in open("/proc/net/dev"):
        name, _, rest = ln.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return 0


@dataclasses.dataclass
class Outcome:
    system: str
    peers: int
    samples_per_s: float = 0.0
    first_step_s: float = 0.0
    loss: float = float("nan")
    lo_bytes_per_peer: float = 0.0
    step_s: float = 0.0
    stall_s: float | None = None
    gap_before_s: float | None = None
    epochs: int | None = None


def ensure_venv(venv: Path) -> Path:
    """hivemind's virtualenv, made if missing, with everything its peers import installed in it
    (whichever interpreter, virtualenv or not, runs this script). One made by an earlier version
    of this script with --system-site-packages is made again."""
    py = venv / "bin" / "python"
    cfg = venv / "pyvenv.cfg"
    if not cfg.is_file() or "include-system-site-packages = true" in cfg.read_text():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    needed = "import hivemind, tokenizers, transformers, torch, crowdtrain.run.train"
    if subprocess.run([str(py), "-c", needed], capture_output=True).returncode:
        pip = [str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # first: not a CUDA build
        subprocess.run([*pip, "-e", str(ROOT)], check=True)
        subprocess.run([*pip, "hivemind==1.1.12"], check=True)
    return py


def in_netns(name: str) -> list[str]:
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode:
        return []
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return ["ip", "netns", "exec", name]


def run_system(system: str, run_dir: Path, peers: int, seconds: float, work: Path,
               kill_after: float | None, settings: dict, py: Path | None) -> Outcome:
    """Everything of one system in its own network namespace, driven by `_drive`."""
    ns = f"cthm{os.getpid()}{system[:2]}{peers}"
    prefix = in_netns(ns)
    out = work / f"{system}-{peers}{'-kill' if kill_after else ''}.json"
    exe = str(py) if system == "hivemind" else sys.executable
    try:
        subprocess.run([*prefix, exe, str(HERE), "_drive", system, str(run_dir), str(peers),
                        str(seconds), str(work), str(out), json.dumps(settings),
                        str(kill_after or 0)], check=True)
    finally:
        if prefix:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return Outcome(**json.loads(out.read_text()))


def drive(system: str, run_dir: str, peers: int, seconds: float, work: Path, out: Path,
          settings: dict, kill_after: float) -> None:
    """Inside the namespace: start the processes, wait, kill one if asked, collect."""
    tx0 = lo_tx()
    tag = f"{system}-{peers}{'-kill' if kill_after else ''}"
    files = [work / f"{tag}-peer{r}.json" for r in range(peers)]
    for f in files:
        f.unlink(missing_ok=True)
    procs: list[subprocess.Popen] = []
    coord = None
    t0 = time.time()
    env = {**os.environ, "BENCH_T0": str(t0), "PYTHONPATH": str(ROOT)}
    if system == "crowdtrain":
        from crowdtrain.cli.processes import LocalSwarm

        coord = LocalSwarm(run_dir, work / f"{tag}-logs")
        coord.serve()
        t0 = time.time()
        env["BENCH_T0"] = str(t0)
        for r in range(peers):
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE), "_crowdtrain", coord.url,
                 str(work / f"{tag}-home{r}"), f"w{r}", str(seconds), str(files[r])], env=env,
                start_new_session=True))
    else:
        peers_file = work / f"{tag}-maddrs.json"
        peers_file.unlink(missing_ok=True)
        for r in range(peers):
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE), f"_{system}", run_dir, str(r), str(seconds),
                 str(files[r]), json.dumps(settings), str(peers_file)], env=env,
                start_new_session=True))
    killed_at = None
    if kill_after:  # once every peer trains
        while not all(f.exists() for f in files) and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        time.sleep(kill_after)
        # the whole peer, as a power cut would: hivemind's DHT and averager are child
        # processes (each peer runs in a process group of its own)
        os.killpg(procs[-1].pid, signal.SIGKILL)
        killed_at = time.time()
    for p in procs:
        try:
            p.wait(timeout=seconds + 300)
        except subprocess.TimeoutExpired:
            p.kill()
    for p in procs:  # children a peer left behind (hivemind's DHT, averager, p2pd)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    res = peer_collect(files, t0, killed_at)
    if coord is not None:
        import torch

        from crowdtrain.run.folder import Run
        from crowdtrain.run.train import evaluate

        coord.stop()
        run = Run(run_dir)
        res["loss"] = evaluate(run.load_model()[0], run.val_windows(), torch.device("cpu"))
    res.update(system=system, peers=peers, lo_bytes_per_peer=(lo_tx() - tx0) / peers)
    out.write_text(json.dumps(res))


def _gaps(times: list[float], killed_at: float, ended: float) -> tuple[float, float]:
    """Longest gap between two steps before the kill, and from the kill to the peer's end
    (a peer that never steps again after the kill stalls until it ends)."""
    before = [t for t in times if t < killed_at]
    after = [t for t in times if t >= killed_at]
    pts = ([before[-1]] if before else []) + after + [ended]
    gap_after = max((b - a for a, b in zip(pts, pts[1:], strict=False)), default=float("nan"))
    gap_before = max((b - a for a, b in zip(before, before[1:], strict=False)), default=0.0)
    return gap_before, gap_after


def peer_collect(files: list[Path], t0: float, killed_at: float | None) -> dict:
    rates, firsts, steps, stalls, normal = [], [], [], [], []
    loss = float("nan")
    epochs = None
    survivors = files[:-1] if killed_at else files
    for f in survivors:
        if not f.exists():
            raise RuntimeError(f"{f.name}: that peer never trained (see its output above)")
        d = json.loads(f.read_text())
        ts = d["times"]
        firsts.append(ts[0] - t0)
        rates.append((len(ts) - 1) * d["batch"] / (ts[-1] - ts[0]) if len(ts) > 1 else 0.0)
        steps.append(statistics.median(b - a for a, b in zip(ts, ts[1:], strict=False)))
        if killed_at is not None:
            g_before, g_after = _gaps(ts, killed_at, d.get("ended", ts[-1]))
            normal.append(g_before)
            stalls.append(g_after)
        loss = d.get("loss", loss)
        epochs = d.get("epochs", epochs)
    return dict(samples_per_s=statistics.mean(rates), first_step_s=max(firsts), loss=loss,
                step_s=statistics.median(steps), stall_s=max(stalls) if stalls else None,
                gap_before_s=max(normal) if normal else None, epochs=epochs)


def crowdtrain_peer(url: str, home: str, name: str, seconds: float, out: str) -> None:
    """The real `crowdtrain join` worker, its optimizer steps timed (a wrapper around
    `optimizer.step`); it leaves after the round in progress at t0 + seconds."""
    import torch

    from crowdtrain.volunteer.config import WorkerConfig
    from crowdtrain.volunteer.worker import Worker

    torch.set_num_threads(1)
    w = Worker(WorkerConfig(url=url, name=name, threads=1, home=Path(home), progress=False,
                            max_hours=seconds / 3600))
    times: list[float] = []
    inner = w.loop.optimizer.step

    def step(*args, **kw):
        r = inner(*args, **kw)
        times.append(time.time())
        if len(times) % 10 == 1:
            Path(out).write_text(json.dumps({"times": times, "batch": w.tcfg.batch_size}))
        return r

    w.loop.optimizer.step = step
    w.run()
    Path(out).write_text(json.dumps({"times": times, "batch": w.tcfg.batch_size,
                                     "ended": time.time()}))


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_plain"]:
        plain_peer(argv[1], int(argv[2]), float(argv[3]), argv[4])
        return 0
    if argv[:1] == ["_hivemind"]:
        hivemind_peer(argv[1], int(argv[2]), float(argv[3]), argv[4], json.loads(argv[5]),
                      argv[6])
        return 0
    if argv[:1] == ["_crowdtrain"]:
        crowdtrain_peer(argv[1], argv[2], argv[3], float(argv[4]), argv[5])
        return 0
    if argv[:1] == ["_drive"]:
        drive(argv[1], argv[2], int(argv[3]), float(argv[4]), Path(argv[5]), Path(argv[6]),
              json.loads(argv[7]), float(argv[8]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--peers", default="2,4", help="comma-separated peer counts")
    p.add_argument("--seconds", type=float, default=120.0, help="wall time of each run")
    p.add_argument("--repeats", type=int, default=2,
                   help="(plain, hivemind, crowdtrain) cycles; throughput ratios are medians")
    p.add_argument("--kill-after", type=float, default=60.0,
                   help="SIGKILL one peer this many seconds into the kill runs")
    p.add_argument("--target-batch-size", type=int, default=4096)
    p.add_argument("--matchmaking-time", type=float, default=3.0)
    p.add_argument("--averaging-timeout", type=float, default=15.0)
    p.add_argument("--inner-steps", type=int, default=30, help="crowdtrain's H")
    p.add_argument("--round-seconds", type=float, default=60.0, help="crowdtrain's deadline")
    p.add_argument("--venv", type=Path, default=VENV,
                   help=f"hivemind's virtualenv (default {VENV.relative_to(ROOT)}; made if "
                        "missing)")
    p.add_argument("--work", type=Path, help="keep runs and logs here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="2 peers, 40 s runs")
    p.add_argument("--kill-only", choices=["hivemind", "crowdtrain"],
                   help="only the kill runs of this system (crowdtrain: no venv is made)")
    a = p.parse_args(argv)
    if a.quick:
        a.peers, a.seconds, a.kill_after, a.repeats = "2", 40.0, 25.0, 1
    from benchlib import base_run, header, load, make_run

    work = a.work or Path(tempfile.mkdtemp(prefix="crowdtrain-hivemind-"))
    work.mkdir(parents=True, exist_ok=True)
    header("crowdtrain vs hivemind 1.1.12")
    py = None if a.kill_only == "crowdtrain" else ensure_venv(a.venv)
    settings = {"target_batch_size": a.target_batch_size,
                "matchmaking_time": a.matchmaking_time,
                "averaging_timeout": a.averaging_timeout, "compression": "fp16 (grads, state)"}
    base = base_run(work / "cache", "tiny")
    print(f"# tiny model, batch {base.config.train.batch_size} x {base.config.train.seq_len} "
          f"per peer, {a.seconds:g}s per run; hivemind {json.dumps(settings)}; crowdtrain H="
          f"{a.inner_steps}, round deadline {a.round_seconds:g}s", flush=True)
    for peers in (int(x) for x in a.peers.split(",")):
        ratios: dict[str, list[float]] = {"hivemind": [], "crowdtrain": []}
        # plain, hivemind, crowdtrain, plain, ...: interleaved
        for rep in range(0 if a.kill_only else a.repeats):
            res = {}
            for system in ("plain", "hivemind", "crowdtrain"):
                run = make_run(base, work / f"run-{system}-{peers}", eval_tokens=4096, swarm={
                    "rounds": 0, "inner_steps": a.inner_steps,
                    "round_seconds": a.round_seconds, "min_contributions": 1})
                o = run_system(system, run.dir, peers, a.seconds, work, None, settings, py)
                res[system] = o
                print(f"{system:<10} P={peers} #{rep + 1}: {o.samples_per_s:7.1f} samples/s per "
                      f"peer ({o.samples_per_s / res['plain'].samples_per_s:.2f} of plain), "
                      f"held-out {o.loss:.4f}, lo {o.lo_bytes_per_peer / 1e6:8.1f} MB per peer, "
                      f"first step {o.first_step_s:5.1f}s after start  [{load()}]", flush=True)
            for system in ratios:
                ratios[system].append(res[system].samples_per_s / res["plain"].samples_per_s)
            h, c = res["hivemind"], res["crowdtrain"]
            print(f"P={peers} #{rep + 1}: bytes on lo, crowdtrain / hivemind "
                  f"{c.lo_bytes_per_peer / max(h.lo_bytes_per_peer, 1):.3f} (target <= 0.1)",
                  flush=True)
        if not a.kill_only:
            hm = statistics.median(ratios["hivemind"])
            ct = statistics.median(ratios["crowdtrain"])
            print(f"P={peers}: median per-peer throughput as a share of plain: hivemind "
                  f"{hm:.2f}, crowdtrain {ct:.2f}: crowdtrain / hivemind {ct / hm:.2f}x "
                  "(target >= 3x)", flush=True)
        for system in [a.kill_only] if a.kill_only else ["hivemind", "crowdtrain"]:
            run = make_run(base, work / f"run-{system}-{peers}-kill", eval_tokens=4096, swarm={
                "rounds": 0, "inner_steps": a.inner_steps, "round_seconds": a.round_seconds,
                "min_contributions": 1})
            o = run_system(system, run.dir, peers, a.seconds, work, a.kill_after, settings, py)
            print(f"{system:<10} P={peers}, one peer SIGKILLed at {a.kill_after:g}s: survivors' "
                  f"longest gap between steps from it to the end {o.stall_s:.1f}s; before it "
                  f"{o.gap_before_s:.1f}s (median step {o.step_s:.2f}s)  [{load()}]", flush=True)
    print(f"# {load()} at the end; work in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
