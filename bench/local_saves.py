"""What a volunteer's local saves cost the round's critical path, before and after they moved
to a background thread (issue 20, "local saves off the critical path").

Per round a worker saves the round's parameters and, after its upload, its AdamW state (two
more copies), each written atomically with fsync (volunteer/files.RunFolder). Measured side by
side on tensors of a preset's size: the time the round waits for the saves written in line
(before), and the time it waits with BackgroundSaves (after: a copy of the AdamW state, then
training goes on while the thread writes), then the background write's own time.

    python bench/local_saves.py [--preset base] [--dir /tmp/saves]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--dir", help="where to write (default: a temporary folder)")
    a = ap.parse_args()
    from crowdtrain.run.model import build_model, preset_config, state_dict_for_save
    from crowdtrain.volunteer.files import BackgroundSaves, RunFolder

    torch.set_num_threads(1)
    theta = state_dict_for_save(build_model(preset_config(a.preset, 32000, 0)))
    adam = {f"{k}:{s}": torch.randn_like(v) for k, v in theta.items()
            for s in ("exp_avg", "exp_avg_sq")}
    n = sum(v.numel() for v in theta.values())
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        folder = RunFolder(Path(d))
        t0 = time.perf_counter()
        folder.save_params(theta, 1)
        folder.save_optimizer(adam)
        inline = time.perf_counter() - t0
        saves = BackgroundSaves()
        t0 = time.perf_counter()
        saves.put("parameters", folder.save_params, theta, 2)
        state = {k: v.clone() for k, v in adam.items()}
        saves.put("optimizer state", folder.save_optimizer, state)
        waited = time.perf_counter() - t0
        saves.flush()
        behind = time.perf_counter() - t0
        saves.close()
    mb = (n * 3 * 4) / 1e6
    print(f"`{a.preset}`: {n:,} parameters, {mb:,.0f} MB of parameters + AdamW state; "
          f"load {os.getloadavg()[0]:.2f}\n")
    print("| saves | the round waits | written in the background |\n|---|---|---|")
    print(f"| in line (before) | {inline:.2f} s | - |")
    print(f"| BackgroundSaves (after) | {waited:.2f} s | {behind:.2f} s |")
    print(f"\ncritical path: {inline / max(waited, 1e-9):.0f}x shorter")


if __name__ == "__main__":
    main()
