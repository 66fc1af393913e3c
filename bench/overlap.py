"""Uneven volunteers on home links: overlapped rounds against stop-and-wait, side by side.

K real volunteers (`crowdtrain join` processes, one torch thread each) train one run against a
real coordinator, each through its own emulated home link (an asyncio proxy per volunteer, from
bench/communication.py: 10 Mbit/s up, 50 Mbit/s down, 40 ms round trip by default). A
volunteer's speed s is made with `--step-pause`: it pauses after every step so that a step takes
t_step / (duty x s), where t_step is the plain loop's step time measured here first and `duty`
(default 0.5) keeps the K processes within the machine's cores (on 2 cores, four volunteers at
full speed would slow each other down instead of showing their own speeds). The pause counts as
training time, as the issue asks.

The same run is trained twice, overlapped (the run's default) and stop-and-wait
(`init --no-overlap`), with the same volunteers, speeds, links, H and rounds. Reported per
volunteer: its share of wall time spent training, over its steady window (from the end of its
`--skip`-th lease's training to the end of its last: start-up, the rounds before the
coordinator has heard every speed, and the final wait are left out; from its first lease's end
too), and
its tokens per second against the plain loop at its speed (the same pause, alone on the
machine); for the swarm: tokens per second against the sum of the plain loops', over the whole
span (first lease to last close: the model downloads and the last close included) and in steady
state (the sum of the volunteers' steady rates), and the held-out
loss at equal wall time (the coordinator's evaluation of the latest checkpoint published by
then, the same elapsed time after the first lease in both modes).

    python bench/overlap.py                         # small, K=4, speeds 1,1,0.5,0.25 (~15 min)
    python bench/overlap.py --preset base --speeds 1,0.5 --rounds 3 --round-compute 150
    python bench/overlap.py --quick                 # tiny, 2 volunteers, 3 rounds (~1 min)
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchlib import base_run, header, load, make_run, params_of, serve  # noqa: E402
from communication import Proxy  # noqa: E402

from crowdtrain.cli.processes import LocalSwarm  # noqa: E402
from crowdtrain.run.data import get_batch, load_split  # noqa: E402
from crowdtrain.run.folder import Run  # noqa: E402
from crowdtrain.run.ledger import Ledger  # noqa: E402
from crowdtrain.run.train import InnerLoop  # noqa: E402

TRAINED = re.compile(r"^(\S+ \S+) INFO \S+: round (\d+): trained (\d+) steps in ([\d.]+)s",
                     re.M)


def plain_rate(run: Run, steps: int, pause: float) -> tuple[float, float]:
    """(seconds per step, tokens per second) of the plain inner loop on this machine, one
    thread, pausing `pause` s after each step (after 2 warm-up steps)."""
    torch.set_num_threads(1)
    cfg = run.config.train
    model, _ = run.load_model(0)
    loop = InnerLoop(model, cfg, torch.device("cpu"))
    shards = load_split(run.data_dir, run.index, "train")

    def batches(s):
        return get_batch(shards, cfg.batch_size, cfg.seq_len, 1, s)

    loop.run(batches, 0, 2)
    st = loop.run(batches, 2, steps, step_pause=pause)
    return st.seconds / st.steps, st.tokens / st.seconds


def release_memory() -> None:
    """Hand the memory the plain loops freed back to the system (glibc keeps freed heap for
    reuse): with `base`, two volunteers, the coordinator and this process fill 24 GiB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def stamp(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def volunteer_figures(log: str, tokens_per_step: int, skip: int) -> dict:
    """From a worker's log: its leases' training ends and lengths -> the steady share and
    rate, from the end of its `skip`-th lease's training to the end of its last (the first
    rounds are start-up: the model download, and rounds the coordinator cannot pace before
    it has heard the volunteers' speeds); and the same over all its leases after the first."""
    ends = [(stamp(t), int(n), float(s)) for t, _, n, s in TRAINED.findall(log)]
    if len(ends) < skip + 2:
        return {"share": float("nan"), "rate": float("nan"), "share_all": float("nan"),
                "leases": len(ends)}
    window = ends[-1][0] - ends[skip - 1][0]
    train = sum(s for _, _, s in ends[skip:])
    steps = sum(n for _, n, _ in ends[skip:])
    share_all = sum(s for _, _, s in ends[1:]) / (ends[-1][0] - ends[0][0])
    return {"share": train / window, "rate": steps * tokens_per_step / window,
            "share_all": share_all, "leases": len(ends), "steps": sum(n for _, n, _ in ends)}


def one_mode(mode: str, base: Run, work: Path, a: argparse.Namespace, h: int,
             pauses: list[float]) -> dict:
    run = make_run(base, work / mode, swarm={
        "rounds": a.rounds, "inner_steps": h, "round_seconds": 3600.0,
        "min_contributions": len(pauses), "overlap": mode == "overlapped", "codec": a.codec})
    cfg = run.config.train
    names = [f"v{i}-x{s:g}" for i, s in enumerate(a.speeds)]
    proxies = []
    t0 = time.time()
    with LocalSwarm(run.dir, work / f"{mode}-logs") as swarm:
        serve(swarm)
        try:
            for name, pause in zip(names, pauses, strict=True):
                proxy = Proxy(swarm.port, a.up_mbit, a.down_mbit, a.rtt_ms / 1000)
                proxy.start()
                proxy.ready.wait(10)
                proxies.append(proxy)
                url = f"http://127.0.0.1:{proxy.port}"
                swarm.cli(name, "join", url, "--name", name, "--threads", 1, "--quiet",
                          "--step-pause", f"{pause:.4f}",
                          *(() if mode == "overlapped" else ("--no-overlap",)),
                          env={"CROWDTRAIN_HOME": str(swarm.home(name))})
            for name in names:
                if swarm.wait(name, timeout=a.timeout) != 0:
                    raise SystemExit(f"{mode}: {name} failed:\n{swarm.log(name)[-3000:]}")
            ledger = Ledger(run.ledger_path)
            end = time.time() + 120  # the last checkpoint's evaluation, in the background
            while time.time() < end and ledger.round_row(a.rounds) is not None and \
                    ledger.round_row(a.rounds)["val_loss"] is None:
                time.sleep(0.5)
            logs = {n: swarm.log(n) for n in names}
        finally:
            for p in proxies:
                p.stop()
    first = min(r["issued_at"] for r in ledger.query("SELECT issued_at FROM leases"))
    curve = [(r["opened_at"] - first, r["val_loss"]) for r in ledger.rounds()
             if r["val_loss"] is not None]
    tokens = sum(r["weight"] for r in ledger.contributions() if r["status"] == "accepted")
    last = max(r["closed_at"] or 0 for r in ledger.rounds()) - first
    refused = sum(r["status"] != "accepted" for r in ledger.contributions())
    late = sum(bool(r["reason"] and r["reason"].startswith("late")) for r in
               ledger.contributions())
    tps = cfg.batch_size * cfg.seq_len
    return {"mode": mode, "wall": time.time() - t0, "span": last, "curve": curve,
            "tokens": tokens, "refused": refused, "late": late,
            "volunteers": {n: volunteer_figures(logs[n], tps, a.skip) for n in names}}


def steady_rate(result: dict) -> float:
    """The swarm's tokens per second in steady state: the sum of its volunteers' rates, each
    over its own steady window (`volunteer_figures`), so the model download, the unpaced
    round 0 and the last close are left out as the shares leave them out."""
    return sum(f["rate"] for f in result["volunteers"].values())


def loss_at(curve: list[tuple[float, float]], t: float) -> float:
    """The held-out loss of the latest checkpoint published by `t` (seconds after the first
    lease)."""
    return [v for at, v in curve if at <= t + 1e-6][-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--speeds", default="1,1,0.5,0.25",
                   type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--skip", type=int, default=2,
                   help="leases of each volunteer left out of its steady window")
    p.add_argument("--round-compute", type=float, default=20.0,
                   help="seconds of compute a round takes a speed-1 volunteer (sets H)")
    p.add_argument("--duty", type=float, default=0.5,
                   help="share of a speed-1 volunteer's step time spent computing")
    p.add_argument("--codec", default="int8")
    p.add_argument("--up-mbit", type=float, default=10.0)
    p.add_argument("--down-mbit", type=float, default=50.0)
    p.add_argument("--rtt-ms", type=float, default=40.0)
    p.add_argument("--modes", default="overlapped,stop-and-wait")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.speeds, a.rounds, a.round_compute, a.skip = "tiny", [1.0, 0.5], 4, 1.5, 1
    work = a.work or Path(tempfile.mkdtemp(prefix="crowdtrain-overlap-"))
    header(f"overlapped rounds vs stop-and-wait, uneven volunteers ({a.preset}, speeds "
           f"{','.join(f'{s:g}' for s in a.speeds)}, {a.up_mbit:g}/{a.down_mbit:g} Mbit/s, "
           f"{a.rtt_ms:g} ms, {a.codec})")
    if a.preset == "base":  # base's shape on tiny's data and tokenizer, as the uplink
        # benchmark (bench/communication.py --part uplink) does: the base preset's own data
        # preparation and evaluation would take longer than the rounds
        base = make_run(base_run(work / "cache", "tiny"), work / "base-run", "base")
    else:
        base = base_run(work / "cache", a.preset, corpus_chars=300_000 if a.quick else None)
    t_step, _ = plain_rate(base, 6 if a.quick else 12, 0.0)
    pauses = [t_step / (a.duty * s) - t_step for s in a.speeds]
    h = max(2, round(a.round_compute / (t_step / a.duty)))
    plain = {s: plain_rate(base, 4 if a.quick else 8, t_step / (a.duty * s) - t_step)[1]
             for s in sorted(set(a.speeds))}
    release_memory()  # base: the plain loops' model and AdamW state, before four processes
    print(f"{params_of(base) / 1e6:.1f}M parameters; plain loop {t_step:.3f} s/step alone; "
          f"H={h} ({a.round_compute:g} s of compute at speed 1, duty {a.duty:g}); pauses "
          f"{', '.join(f'{x:.3f}' for x in pauses)} s; {load()}", flush=True)
    results = [one_mode(m, base, work, a, h, pauses) for m in a.modes.split(",")]
    t_eq = min(r["span"] for r in results)
    plain_sum = sum(plain[s] for s in a.speeds)
    print(f"\n| mode | volunteer (speed) | share of wall time training, leases {a.skip + 1}.. | "
          "from lease 2 | tokens/s | / plain loop at its speed |\n|---|---|---|---|---|---|")
    for r in results:
        for (name, f), s in zip(r["volunteers"].items(), a.speeds, strict=True):
            print(f"| {r['mode']} | {name} ({s:g}) | {f['share']:.3f} | {f['share_all']:.3f} | "
                  f"{f['rate']:,.0f} | {f['rate'] / plain[s]:.3f} |")
    print(f"\n| mode | swarm tokens/s (accepted / span) | / sum of plain loops | steady: sum of "
          f"the volunteers' rates / plain loops | held-out at {t_eq:.0f} s | final held-out | "
          "span | late / refused |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        rate = r["tokens"] / r["span"]
        print(f"| {r['mode']} | {rate:,.0f} | {rate / plain_sum:.3f} | "
              f"{steady_rate(r) / plain_sum:.3f} | "
              f"{loss_at(r['curve'], t_eq):.4f} | {r['curve'][-1][1]:.4f} | {r['span']:.0f} s | "
              f"{r['late']} / {r['refused']} |")
    print(f"\nplain loops: {', '.join(f'x{s:g} {v:,.0f} tok/s' for s, v in plain.items())}; "
          f"{load()}")
    for r in results:
        if r["mode"] == "overlapped":
            worst = min(f["share"] for f in r["volunteers"].values())
            rate = r["tokens"] / r["span"] / plain_sum
            steady = steady_rate(r) / plain_sum
            print(f"target: every volunteer's share >= 0.97: {'met' if worst >= 0.97 else 'missed'}"
                  f" (worst {worst:.3f}); swarm tokens/s >= 0.95 of the plain loops': "
                  f"{'met' if steady >= 0.95 else 'missed'} in steady state ({steady:.3f}), "
                  f"{'met' if rate >= 0.95 else 'missed'} over the whole span ({rate:.3f}: "
                  "start-up and the last close included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
