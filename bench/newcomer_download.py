"""What a newcomer downloads: is a compressed checkpoint that still reconstructs the exact fp32
parameters worth it? (issue 19, "newcomers download less: measure it, then decide")

A newcomer fetches the open round's checkpoint (fp32 safetensors). Lossless ways to send fewer
bytes, each reconstructing the parameters bit for bit, measured on real checkpoints:
- zlib (level 6) or lzma (preset 1) of the raw fp32 bytes;
- the same after splitting each float into its 4 byte planes (exponent bytes compress, the low
  mantissa bytes barely do);
- bf16 + residual: the high 16 bits (a bf16 copy) and the low 16 bits as separate streams, the
  low stream compressed (it is what "bf16 plus the exact residual" costs).
Each row: bytes against fp32, compress and decompress time (one thread), and the time saved at
a 50 Mbit/s home downlink net of decompressing. Every reconstruction is checked exact.

    python bench/newcomer_download.py [--run RUN_DIR] [--preset base] [--max-params 20000000]
"""

from __future__ import annotations

import argparse
import lzma
import os
import time
import zlib

import numpy as np
import torch

DOWNLINK_MBIT = 50.0


def flat_params(run_dir: str | None, preset: str, max_params: int) -> tuple[np.ndarray, str]:
    """fp32 parameters of a run's latest checkpoint, or of a fresh preset model (weights as
    initialised: normal(0, 0.02), as high in entropy as trained ones), at most `max_params`."""
    if run_dir:
        from crowdtrain.run.folder import Run

        run = Run(run_dir)
        model, ck = run.load_model()
        what = f"{run.dir.name} checkpoint {ck.round}"
    else:
        from crowdtrain.run.model import build_model, preset_config

        model = build_model(preset_config(preset, 32000, 0), seed=0)
        what = f"a fresh `{preset}` model"
    from crowdtrain.run.model import state_dict_for_save

    flat = torch.cat([t.reshape(-1) for t in state_dict_for_save(model).values()]).numpy()
    return flat[:max_params].astype(np.float32), what


def planes(x: np.ndarray) -> list[bytes]:
    b = x.view(np.uint8).reshape(-1, 4)
    return [np.ascontiguousarray(b[:, i]).tobytes() for i in range(4)]


def unplanes(ps: list[bytes]) -> np.ndarray:
    b = np.stack([np.frombuffer(p, np.uint8) for p in ps], axis=1)
    return np.ascontiguousarray(b).view(np.float32).reshape(-1)


def measure(x: np.ndarray) -> list[dict]:
    raw = x.tobytes()
    rows = []

    def row(name, enc, dec):
        t0 = time.perf_counter()
        blob = enc()
        t1 = time.perf_counter()
        back = dec(blob)
        t2 = time.perf_counter()
        assert np.array_equal(back.view(np.uint32), x.view(np.uint32)), name  # bit for bit
        size = sum(len(b) for b in blob) if isinstance(blob, list) else len(blob)
        saved = (len(raw) - size) * 8 / (DOWNLINK_MBIT * 1e6) - (t2 - t1)
        rows.append({"method": name, "bytes": size, "ratio": len(raw) / size,
                     "compress_s": t1 - t0, "decompress_s": t2 - t1, "net_saved_s": saved})

    row("fp32 (today)", lambda: raw, lambda b: np.frombuffer(b, np.float32))
    row("zlib-6", lambda: zlib.compress(raw, 6),
        lambda b: np.frombuffer(zlib.decompress(b), np.float32))
    row("lzma-1", lambda: lzma.compress(raw, preset=1),
        lambda b: np.frombuffer(lzma.decompress(b), np.float32))
    row("byte planes + zlib-6", lambda: [zlib.compress(p, 6) for p in planes(x)],
        lambda bs: unplanes([zlib.decompress(b) for b in bs]))
    row("byte planes + lzma-1", lambda: [lzma.compress(p, preset=1) for p in planes(x)],
        lambda bs: unplanes([lzma.decompress(b) for b in bs]))
    hi_lo = x.view(np.uint32)

    def bf16_enc():
        hi = (hi_lo >> 16).astype(np.uint16).tobytes()
        lo = (hi_lo & 0xFFFF).astype(np.uint16).tobytes()
        return [hi, zlib.compress(lo, 6)]

    def bf16_dec(bs):
        hi = np.frombuffer(bs[0], np.uint16).astype(np.uint32)
        lo = np.frombuffer(zlib.decompress(bs[1]), np.uint16).astype(np.uint32)
        return ((hi << 16) | lo).view(np.float32)

    row("bf16 + exact residual (zlib-6)", bf16_enc, bf16_dec)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a run directory: its latest checkpoint")
    ap.add_argument("--preset", default="base", help="else a fresh model of this preset")
    ap.add_argument("--max-params", type=int, default=20_000_000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    x, what = flat_params(a.run, a.preset, a.max_params)
    print(f"{what}: {x.size:,} parameters ({x.nbytes / 1e6:.1f} MB fp32); "
          f"load {os.getloadavg()[0]:.2f}; downlink {DOWNLINK_MBIT:g} Mbit/s\n")
    print("| method | bytes / fp32 | smaller by | compress | decompress | net time saved per "
          "download |\n|---|---|---|---|---|---|")
    for r in measure(x):
        print(f"| {r['method']} | {1 / r['ratio']:.3f} | {r['ratio']:.2f}x | "
              f"{r['compress_s']:.2f} s | {r['decompress_s']:.2f} s | {r['net_saved_s']:+.2f} s |")


if __name__ == "__main__":
    main()
