"""Shared helpers of the performance benchmarks (bench/efficiency.py, coordinator_load.py,
scaling.py, communication.py): runs of any model size, an instrumented volunteer worker, the
machine and its load, process memory. Nothing here is a benchmark by itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from crowdtrain.run.checkpoint import save_checkpoint  # noqa: E402
from crowdtrain.run.data import default_corpus, eval_windows, load_split  # noqa: E402
from crowdtrain.run.folder import Run, SwarmConfig, init_run  # noqa: E402
from crowdtrain.run.model import build_model, count_params, state_dict_for_save  # noqa: E402
from crowdtrain.run.train import evaluate  # noqa: E402
from crowdtrain.wire import codecs, protocol  # noqa: E402

# Llama shapes (hidden, layers, heads, intermediate, vocab) by nominal size. The vocabulary of
# the config may exceed the tokenizer's (the extra rows are never hit): it keeps the parameter
# counts of the real shapes, e.g. `base` with its 32,000-token vocabulary.
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "0.45M": (128, 2, 4, 352, 260),       # 0.44M, byte-level: DESIGN.md's reference model
    "1M": (128, 4, 4, 400, 512),          # 0.94M
    "3M": (256, 4, 4, 688, 1024),         # the `small` preset, 3.4M
    "10M": (384, 5, 6, 1152, 512),        # 9.8M
    "30M": (512, 9, 8, 1536, 512),        # 31M
    "100M": (768, 14, 12, 2048, 512),     # 99.5M
    "base": (768, 12, 12, 2048, 32000),   # the `base` preset, 109.5M
}


def machine() -> str:
    """One line: cores, memory, CPU model, torch version."""
    mem = ""
    try:
        kb = int(next(ln for ln in open("/proc/meminfo") if ln.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}){mem}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, no GPU" if not torch.cuda.is_available() else
            f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.cuda.get_device_name()}")


def load() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` prints them."""
    return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def header(what: str) -> None:
    print(f"# {what}\n# machine: {machine()}\n# {load()} at start, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a live process, MB."""
    return _status_kb(pid, "VmHWM") / 1024


def anon_mb(pid: int) -> float:
    """Anonymous resident memory (RssAnon: the heap, not mapped files' pages), MB."""
    return _status_kb(pid, "RssAnon") / 1024


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


def _status_kb(pid: int, key: str) -> float:
    try:
        for ln in open(f"/proc/{pid}/status"):
            if ln.startswith(key + ":"):
                return float(ln.split()[1])
    except OSError:
        pass
    return float("nan")


# ----------------------------------------------------------------------------- runs


def base_run(cache: Path, preset: str = "tiny", corpus_chars: int | None = 300_000,
             vocab_size: int | None = None) -> Run:
    """A run of `preset` made once in `cache` from (the start of) the bundled corpus, with the
    preset's tokenizer size or `vocab_size` (260: bytes + specials, i.e. byte-level)."""
    d = cache / f"base-{preset}-{corpus_chars or 'all'}{f'-v{vocab_size}' if vocab_size else ''}"
    if (d / "run.json").is_file():
        return Run(d)
    src = default_corpus()
    if corpus_chars:
        text = src.read_text(encoding="utf-8")[:corpus_chars]
        src = cache / f"corpus-{corpus_chars}.txt"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    shutil.rmtree(d, ignore_errors=True)
    return init_run(d, [src], preset=preset, progress=False, vocab_size=vocab_size,
                    swarm=SwarmConfig(warm_start=0.0))  # a fresh model: benchmarks start cold


def make_run(base: Run, dst: Path, shape: str | None = None, *, train: dict | None = None,
             swarm: dict | None = None, eval_tokens: int = 256, evaluate_init: bool = True) -> Run:
    """A private copy of `base` (round 0 only, no ledger) with, optionally, a model of another
    shape (`SHAPES` key; weights made fresh, seed 0), training and swarm settings overridden,
    and a small held-out set (`eval_tokens`) so the coordinator's evaluations stay cheap."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(base.dir, dst, ignore=shutil.ignore_patterns(
        "ledger.sqlite*", "contributions", "updates", "outer-*", "admin*"))
    for p in (dst / "checkpoints").iterdir():
        if not p.name.startswith("ckpt-000000."):
            p.unlink()
    cfg = json.loads((dst / "run.json").read_text())
    cfg["train"].update(train or {})
    cfg["swarm"].update(swarm or {})
    cfg["eval_tokens"] = eval_tokens
    if shape is not None:
        from transformers import LlamaConfig

        h, layers, heads, inter, vocab = SHAPES[shape]
        old = json.loads((dst / "model" / "config.json").read_text())
        mc = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads,
                         max_position_embeddings=max(256, cfg["train"]["seq_len"]),
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=old.get("bos_token_id"),
                         eos_token_id=old.get("eos_token_id"),
                         pad_token_id=old.get("pad_token_id"), initializer_range=0.02)
        mc.save_pretrained(str(dst / "model"))
        for p in (dst / "checkpoints").iterdir():
            p.unlink()
        model = build_model(mc, seed=cfg["seed"])
        meta = {"tokens_trained": 0, "steps": 0, "params": count_params(model),
                "source": "init"}
        if evaluate_init:
            val = eval_windows(load_split(dst / "data", base.index, "val"),
                               cfg["train"]["seq_len"], eval_tokens)
            meta["val_loss"] = evaluate(model, val, torch.device("cpu"))
        save_checkpoint(dst / "checkpoints", 0, state_dict_for_save(model), meta)
    (dst / "run.json").write_text(json.dumps(cfg, indent=1))
    return Run(dst)


def serve(swarm, *args: object, timeout: float = 900.0):
    """Start the coordinator of a LocalSwarm like `swarm.serve()`, with a start-up allowance
    for a loaded machine (a large model is built, loaded and evaluated before it answers)."""
    from crowdtrain.cli.processes import wait_until_up

    p = swarm.cli("coordinator", "serve", swarm.run_dir, "--port", swarm.port, *args)
    wait_until_up(swarm.url, p, swarm.logfile("coordinator"), timeout)
    return p


def params_of(run: Run) -> int:
    return int(json.loads((run.ckpt_dir / "ckpt-000000.json").read_text())["params"])


class Payloads:
    """Valid int8 payloads for a model: a few random deltas quantized once; per submission only
    the safetensors header (its metadata holds the lease's stats) is written anew."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], variants: int = 4) -> None:
        self.bodies: list[tuple[dict, bytes]] = []
        for v in range(variants):
            g = torch.Generator().manual_seed(v)
            delta = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
            blob = codecs.to_bytes(delta, "int8")
            (n,) = struct.unpack("<Q", blob[:8])
            self.bodies.append((json.loads(blob[8:8 + n]), blob[8 + n:]))

    def make(self, i: int, stats: protocol.SubmitStats) -> bytes:
        head, data = self.bodies[i % len(self.bodies)]
        head = dict(head)
        head["__metadata__"] = {**head["__metadata__"], "stats": stats.model_dump_json()}
        raw = json.dumps(head, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return b"".join((struct.pack("<Q", len(raw)), raw, data))


# ----------------------------------------------------------------------------- the worker


PHASES = ("train", "sync", "compress", "upload", "lease", "local_disk")


@dataclasses.dataclass
class WorkerTimes:
    """Where an instrumented volunteer's wall time went (seconds unless said)."""

    wall: float = 0.0             # Worker() construction to the last round's submit answered
    to_first_step: float = 0.0    # Worker() construction to the first inner step starting
    train: float = 0.0            # inside the inner loop (AdamW steps)
    tokens: int = 0
    steps: int = 0
    sync: float = 0.0             # replaying updates / downloading the model
    compress: float = 0.0         # delta + int8 with error feedback
    upload: float = 0.0           # POST submit
    lease: float = 0.0            # POST lease (answers "lease" or "wait")
    local_disk: float = 0.0       # saving parameters and optimizer state
    rounds: list[dict] = dataclasses.field(default_factory=list)
    submitted_at: list[float] = dataclasses.field(default_factory=list)  # since construction
    at_submit: list[dict] = dataclasses.field(default_factory=list)  # cumulative, per submit
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def other(self) -> float:
        """Waiting for the round to close, shard reads, start-up: the rest of the wall time."""
        return self.wall - (self.train + self.sync + self.compress + self.upload + self.lease
                            + self.local_disk)

    def train_rate(self) -> float:
        return self.tokens / self.train if self.train else 0.0

    def wall_rate(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    def window(self, i: int, j: int) -> dict[str, float]:
        """Seconds per phase (and "wall", "tokens", "rest") between submit i and submit j."""
        a, b = self.at_submit[i], self.at_submit[j]
        d = {k: b[k] - a[k] for k in b}
        d["rest"] = d["wall"] - sum(d[k] for k in PHASES)
        return d

    def steady_rate(self) -> float:
        """Tokens per second of wall time from the first round's submit to the last's: whole
        rounds of sync, training, upload and waiting, without the start-up."""
        if len(self.submitted_at) < 2:
            return float("nan")
        tokens = sum(r["tokens"] for r in self.rounds[1:])
        return tokens / (self.submitted_at[-1] - self.submitted_at[0])


def run_instrumented_worker(url: str, home: Path, name: str, max_rounds: int,
                            threads: int = 1) -> WorkerTimes:
    """Run the real `crowdtrain join` worker (volunteer.worker.Worker) in this process for
    `max_rounds` rounds, timing each of its phases by wrapping its methods (no change to its
    behaviour). Stop-and-wait (`--no-overlap`), whose phases follow one another: overlapped
    rounds are measured by bench/overlap.py."""
    from crowdtrain.volunteer.config import WorkerConfig
    from crowdtrain.volunteer.worker import Worker
    from crowdtrain.wire import protocol

    t = WorkerTimes()
    t0 = time.perf_counter()
    w = Worker(WorkerConfig(url=url, name=name, threads=threads, max_rounds=max_rounds,
                            home=home, progress=False, overlap=False))

    def timed(obj: object, attr: str, field: str,
              after: Callable[[object, float], None] | None = None) -> None:
        fn = getattr(obj, attr)

        def wrapper(*args, **kw):
            s = time.perf_counter()
            out = fn(*args, **kw)
            dt = time.perf_counter() - s
            setattr(t, field, getattr(t, field) + dt)
            if after is not None:
                after(out, dt)
            return out

        setattr(obj, attr, wrapper)

    first: list[float] = []
    run_fn = w.loop.run

    def loop_run(*args, **kw):
        if not first:
            first.append(time.perf_counter() - t0)
        s = time.perf_counter()
        st = run_fn(*args, **kw)
        dt = time.perf_counter() - s
        t.train += dt
        t.tokens += st.tokens
        t.steps += st.steps
        t.rounds.append({"steps": st.steps, "tokens": st.tokens, "train_s": dt,
                         "end": time.perf_counter() - t0})
        return st

    w.loop.run = loop_run
    timed(w, "_sync", "sync")
    timed(w, "_payload", "compress")
    timed(w, "_save_params", "local_disk")
    timed(w, "_save_optimizer", "local_disk")
    call = w.client.call

    def client_call(method: str, path: str, **kw):
        s = time.perf_counter()
        try:
            return call(method, path, **kw)
        finally:
            dt = time.perf_counter() - s
            if path.startswith("/v1/submit/"):
                t.upload += dt
                t.submitted_at.append(time.perf_counter() - t0)
                t.at_submit.append({k: getattr(t, k) for k in PHASES}
                                   | {"wall": t.submitted_at[-1], "tokens": t.tokens})
            elif path == protocol.LEASE:
                t.lease += dt

    w.client.call = client_call
    summary = w.run()
    t.wall = time.perf_counter() - t0
    t.to_first_step = first[0] if first else float("nan")
    t.bytes_sent, t.bytes_received = summary.bytes_sent, summary.bytes_received
    return t
