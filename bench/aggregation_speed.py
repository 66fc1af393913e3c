"""Aggregation speed, side by side: the coordinator's robust aggregation (every method) against
the implementation it replaced (tests/coordinator/reference_aggregation.py, the previous
commit's code verbatim), on real payload files, with a memory-bandwidth probe run on the same
machine in the same run.

    python bench/aggregation_speed.py                          # 8 x 20M int8, 2-core figures
    python bench/aggregation_speed.py --workers 20 --params 100M --device cuda --no-reference

For each method: seconds for one round, ns per parameter per contribution, and that figure
against the probe (the time to read one int8 payload byte at memory bandwidth), plus the
largest relative difference to the reference (L2 over the whole model). Payloads are
`codecs.to_bytes(delta, codec)` of random-normal deltas times 1e-3, written to --work and
read through `payloads.open_payload` as the coordinator reads them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests" / "coordinator"))

import torch  # noqa: E402

from crowdtrain.coordinator.aggregation import (  # noqa: E402
    METHODS,
    RobustConfig,
    block_for,
    robust_aggregate,
)
from crowdtrain.coordinator.payloads import open_payload  # noqa: E402
from crowdtrain.wire import codecs  # noqa: E402


def parse_size(s: str) -> int:
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    return int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1].upper() in mult else int(s)


def shapes_for(params: int, tensors: int = 8) -> dict[str, tuple[int, ...]]:
    """`tensors` matrices of about params / tensors values each, rows of 4096."""
    per = params // tensors
    return {f"layer{i}.weight": (max(1, per // 4096), 4096) for i in range(tensors)}


def write_payloads(work: Path, n: int, shapes: dict, codec: str, seed: int = 0) -> list[Path]:
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


def bandwidth_probe(device: str, gib: float = 1.0) -> dict:
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
            "gb_per_s": 4 * n / best / 1e9}


def time_method(fn, paths, weights, shapes, method, **kw) -> tuple[float, dict]:
    srcs = [open_payload(p, shapes) for p in paths]
    try:
        t0 = time.perf_counter()
        out, _ = fn(srcs, weights, shapes, RobustConfig(method=method), **kw)
        return time.perf_counter() - t0, out
    finally:
        for s in srcs:
            s.close()


def rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return math.sqrt(num / den) if den else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=8, help="contributions (default 8)")
    ap.add_argument("--params", default="20M", help="parameters per contribution (20M)")
    ap.add_argument("--codec", default="int8", choices=codecs.CODECS)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads and aggregation threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (aggregation math)")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the previous implementation (slow at large sizes)")
    ap.add_argument("--work", type=Path, default=None, help="payload folder (default: temp)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    params = parse_size(a.params)
    shapes = shapes_for(params)
    real = sum(math.prod(s) for s in shapes.values())
    work = a.work or Path(tempfile.mkdtemp(prefix="aggspeed-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = write_payloads(work, a.workers, shapes, a.codec)
    print(f"{a.workers} x {real:,} parameters, {a.codec} payload files in {work} "
          f"({time.perf_counter() - t0:.0f} s to write); {a.threads} threads, "
          f"device {a.device}, {os.cpu_count()} cores", flush=True)
    probe = bandwidth_probe("cpu")
    print(f"memory bandwidth probe (cpu): {probe['gb_per_s']:.1f} GB/s, "
          f"{probe['ns_per_byte']:.3f} ns per byte", flush=True)
    weights = [float(1000 + i) for i in range(a.workers)]
    per = a.workers * real
    rows = []
    for method in a.methods.split(","):
        secs, out = time_method(robust_aggregate, paths, weights, shapes, method,
                                block_elems=block_for(a.workers, threads=a.threads),
                                threads=a.threads, device=a.device)
        row = {"method": method, "seconds": secs, "ns_per_param_contribution": secs / per * 1e9}
        if not a.no_reference:
            import reference_aggregation as ref

            old_secs, old = time_method(ref.robust_aggregate, paths, weights, shapes, method,
                                        block_elems=ref.block_for(a.workers))
            row.update(reference_seconds=old_secs,
                       reference_ns=old_secs / per * 1e9, speedup=old_secs / secs,
                       rel_diff=rel(out, old))
        rows.append(row)
        line = (f"{method:>14}: {secs:8.2f} s  {row['ns_per_param_contribution']:6.2f} ns/param"
                f"/contribution  ({row['ns_per_param_contribution'] / probe['ns_per_byte']:.1f}"
                "x the probe's ns/byte)")
        if "reference_seconds" in row:
            line += (f"   previous: {row['reference_seconds']:8.2f} s "
                     f"{row['reference_ns']:6.2f} ns  speedup {row['speedup']:5.1f}x  "
                     f"rel diff {row['rel_diff']:.1e}")
        print(line, flush=True)
    if a.json:
        a.json.write_text(json.dumps({"workers": a.workers, "params": real, "codec": a.codec,
                                      "threads": a.threads, "device": a.device,
                                      "cores": os.cpu_count(), "probe": probe, "rows": rows},
                                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
