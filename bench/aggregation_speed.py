"""Aggregation speed, side by side: the coordinator's robust aggregation (every method) against
the original implementation (tests/coordinator/reference_aggregation.py; it has no threads of
its own, so it runs with 1 and with --threads torch threads, the faster counting) and,
optionally, the aggregation.py of an earlier commit, on real payload files of each codec
asked for, with a memory-bandwidth probe run on the same machine in the same run.

    python bench/aggregation_speed.py                          # 8 x 20M, int8 and sparse
    python bench/aggregation_speed.py --previous 335144a       # + that commit's aggregation
    python bench/aggregation_speed.py --previous 335144a,f87e2d9   # + each of those
    python bench/aggregation_speed.py --workers 20 --params 100M --device cuda --no-reference

For each codec and method: seconds for one round, ns per parameter per contribution, that
figure over the probe's (the time to read one byte at memory bandwidth: a sum over a 1 GiB
float32 buffer, best of 5, run before and after the timings), and, against each earlier
implementation, its seconds, the speedup and the relative difference of the results (L2 over
the whole model). Every implementation runs --repeat times per method, in turn, on the same
payload files (opened afresh each time), and its best time counts, so a change in the
machine's load hits them alike; the load average is printed with every row. Payloads are
`codecs.to_bytes(delta, codec)` of random-normal deltas times 1e-3
(sparse: the codec's defaults, 1% of each 4096-value chunk at 2 bits), written to --work and
read through `payloads.open_payload` as the coordinator reads them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "coordinator"))

import torch  # noqa: E402

from crowdtrain.coordinator import aggregation, kernels  # noqa: E402
from crowdtrain.coordinator.payloads import open_payload  # noqa: E402
from crowdtrain.wire import codecs  # noqa: E402

REFERENCE = ROOT / "tests" / "coordinator" / "reference_aggregation.py"


def parse_size(s: str) -> int:
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    return int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1].upper() in mult else int(s)


def shapes_for(params: int, tensors: int = 8) -> dict[str, tuple[int, ...]]:
    """`tensors` matrices of about params / tensors values each, rows of 4096."""
    per = params // tensors
    return {f"layer{i}.weight": (max(1, per // 4096), 4096) for i in range(tensors)}


def write_payloads(work: Path, n: int, shapes: dict, codec: str, seed: int = 0) -> list[Path]:
    """n payload files of `codec` in `work` (kept: an existing file is reused)."""
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = work / f"contribution-{i}.safetensors"
        if not p.exists():
            g = torch.Generator().manual_seed(seed + i)
            delta = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
            p.write_bytes(codecs.to_bytes(delta, codec))
            del delta
        paths.append(p)
    return paths


def module_from(path: Path, name: str) -> ModuleType:
    """Import the Python file at `path` as a module called `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    return mod


def previous_source(commit: str) -> Path:
    """crowdtrain/coordinator/aggregation.py as of `commit` (git show), in a temp file."""
    text = subprocess.run(["git", "-C", str(ROOT), "show",
                           f"{commit}:crowdtrain/coordinator/aggregation.py"],
                          capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="aggregation-")) / f"aggregation_{commit}.py"
    path.write_text(text)
    return path


def bandwidth_probe(device: str = "cpu", gib: float = 1.0) -> dict:
    """ns to read one byte at memory bandwidth: the best of 5 sums over a `gib` GiB buffer."""
    n = int(gib * (1 << 30)) // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    best = math.inf
    for _ in range(5):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - t0)
    return {"bytes": 4 * n, "seconds": best, "ns_per_byte": best / (4 * n) * 1e9,
            "gb_per_s": 4 * n / best / 1e9, "load": os.getloadavg()[0]}


def time_method(mod: ModuleType, paths: list[Path], weights: list[float], shapes: dict,
                method: str, **kw) -> tuple[float, dict]:
    """Seconds for one `mod.robust_aggregate` round over freshly opened payload files (as the
    coordinator opens them at each close), and its result."""
    srcs = [open_payload(p, shapes) for p in paths]
    try:
        t0 = time.perf_counter()
        out, _ = mod.robust_aggregate(srcs, weights, shapes, mod.RobustConfig(method=method),
                                      **kw)
        return time.perf_counter() - t0, out
    finally:
        for s in srcs:
            s.close()


def rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return math.sqrt(num / den) if den else 0.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=8, help="contributions (default 8)")
    ap.add_argument("--params", default="20M", help="parameters per contribution (20M)")
    ap.add_argument("--codecs", default="int8,sparse", help="payload codecs (int8,sparse)")
    ap.add_argument("--methods", default=",".join(aggregation.METHODS))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads and aggregation threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (aggregation math)")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the original implementation (slow at large sizes)")
    ap.add_argument("--reference-threads", default=None,
                    help="torch thread counts to run the original implementation with, the "
                         "fastest counting (default: 1 and --threads: on a loaded machine "
                         "intra-op threads can stall)")
    ap.add_argument("--previous", metavar="COMMIT[,COMMIT]",
                    help="also time crowdtrain/coordinator/aggregation.py as of each COMMIT")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time every implementation this many times, in turn; the best counts")
    ap.add_argument("--work", type=Path, default=None, help="payload folder (default: temp)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.reference_threads = sorted({int(t) for t in (a.reference_threads or
                                                   f"1,{a.threads}").split(",")})
    params = parse_size(a.params)
    shapes = shapes_for(params)
    real = sum(math.prod(s) for s in shapes.values())
    work = a.work or Path(tempfile.mkdtemp(prefix="aggspeed-"))
    others: list[tuple[str, ModuleType, dict]] = []
    if not a.no_reference:
        ref = module_from(REFERENCE, "reference_aggregation")
        others.append(("reference", ref, {"block_elems": ref.block_for(a.workers)}))
    for commit in (a.previous or "").split(","):
        if not commit:
            continue
        prev = module_from(previous_source(commit), f"aggregation_{commit}")
        others.append((commit, prev, {"block_elems": prev.block_for(a.workers,
                                                                    threads=a.threads),
                                      "threads": a.threads, "device": a.device}))
    runs = [("current", aggregation, {"threads": a.threads, "device": a.device}, a.threads)]
    runs += [(label, mod, kw, intra) for label, mod, kw in others
             for intra in (a.reference_threads if label == "reference" else [a.threads])]
    print(f"{a.workers} x {real:,} parameters; {a.threads} threads, device {a.device}; "
          f"{os.cpu_count()} cores ({cpu_name()}), torch {torch.__version__}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    # numba's JIT (or its on-disk cache) on the first call: timed here, apart from the runs
    t0 = time.perf_counter()
    compiled = kernels.available()
    jit_s = time.perf_counter() - t0
    print(f"compiled first pass (numba): {'yes' if compiled else 'no, torch operations'}, "
          f"ready in {jit_s:.2f} s (JIT, or its cache)", flush=True)
    probes = [bandwidth_probe()]
    print(f"memory bandwidth probe: {probes[0]['gb_per_s']:.1f} GB/s, "
          f"{probes[0]['ns_per_byte']:.3f} ns per byte (load {probes[0]['load']:.1f})",
          flush=True)
    weights = [float(1000 + i) for i in range(a.workers)]
    per = a.workers * real
    rows = []
    for codec in a.codecs.split(","):
        t0 = time.perf_counter()
        paths = write_payloads(work / codec, a.workers, shapes, codec)
        size = sum(p.stat().st_size for p in paths) / a.workers
        print(f"{codec}: {size / 1e6:.1f} MB a payload ({size / real:.3f} bytes a parameter) "
              f"in {work / codec} ({time.perf_counter() - t0:.0f} s to write)", flush=True)
        for p in paths:  # into the page cache, so that no implementation reads the disk
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        for method in a.methods.split(","):
            # every implementation (and thread count) once per repeat, in turn; best of all
            times: dict[str, list[float]] = {}
            results: dict[str, dict] = {}
            loads = []
            for _ in range(a.repeat):
                for label, mod, kw, intra in runs:
                    torch.set_num_threads(intra)  # the reference's only threads: intra-op
                    t, results[label] = time_method(mod, paths, weights, shapes, method, **kw)
                    times.setdefault(f"{label}@{intra}", []).append(t)
                    loads.append(os.getloadavg()[0])
            torch.set_num_threads(a.threads)
            best = {label: min(min(v) for k, v in times.items() if k.split("@")[0] == label)
                    for label in results}
            secs, out = best["current"], results["current"]
            ns = secs / per * 1e9
            row = {"codec": codec, "method": method, "seconds": secs,
                   "ns_per_param_contribution": ns, "load": max(loads), "all_seconds": times}
            line = (f"{codec:>6} {method:>14}: {secs:7.2f} s {ns:6.2f} ns/param/contribution "
                    f"({ns / probes[0]['ns_per_byte']:5.1f}x the probe's ns/byte)")
            for label in results:
                if label == "current":
                    continue
                old_secs, old = best[label], results[label]
                row[label] = {"seconds": old_secs, "ns": old_secs / per * 1e9,
                              "speedup": old_secs / secs, "rel_diff": rel(out, old)}
                line += (f" | {label}: {old_secs:7.2f} s {old_secs / per * 1e9:6.1f} ns, "
                         f"{old_secs / secs:5.1f}x, rel diff {rel(out, old):.1e}")
            rows.append(row)
            print(line + f"  [load <= {row['load']:.1f}]", flush=True)
    probes.append(bandwidth_probe())
    print(f"memory bandwidth probe again: {probes[1]['gb_per_s']:.1f} GB/s, "
          f"{probes[1]['ns_per_byte']:.3f} ns per byte (load {probes[1]['load']:.1f})",
          flush=True)
    if a.json:
        a.json.write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "workers": a.workers, "params": real, "threads": a.threads, "device": a.device,
            "cores": os.cpu_count(), "cpu": cpu_name(), "torch": torch.__version__,
            "probes": probes, "compiled_first_pass": compiled, "jit_seconds": jit_s,
            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
