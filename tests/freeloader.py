"""A freeloader, for the end-to-end test of the verification (tests/e2e/test_freeloader.py):
it joins over the HTTP API, takes every lease like a worker, trains nothing and uploads
Gaussian noise scaled to a typical honest contribution's norm in the run's codec, reporting
the lease's full steps and tokens. Run as `python tests/freeloader.py URL NORM [NAME]`."""

from __future__ import annotations

import sys
import time

import httpx
import torch
from safetensors.torch import load

from crowdtrain.wire import codecs, protocol


def main(url: str, norm: float, name: str = "freeloader", seconds: float = 1.0) -> None:
    http = httpx.Client(base_url=url, timeout=60,
                        headers={protocol.API_HEADER: str(protocol.API_VERSION)})
    info = protocol.RunInfo.model_validate(http.get(protocol.INFO).json())
    joined = http.post(protocol.JOIN, json=protocol.JoinRequest(
        name=name, device="cpu", api_version=protocol.API_VERSION).model_dump())
    joined.raise_for_status()
    token = protocol.JoinResponse.model_validate(joined.json()).token
    http.headers["Authorization"] = f"Bearer {token}"
    # the shapes of what travels: from the model it is asked to train (and never trains)
    model = http.get(protocol.MODEL)
    model.raise_for_status()
    shapes = {k: tuple(v.shape) for k, v in load(model.content).items()}
    tokens_per_step = info.train["batch_size"] * info.train["seq_len"]
    sent = 0
    while True:
        r = http.post(protocol.LEASE, json=protocol.LeaseRequest().model_dump())
        r.raise_for_status()
        resp = protocol.LeaseResponse.model_validate(r.json())
        if resp.status == "done":
            break
        if resp.status == "wait":
            time.sleep(max(0.2, resp.retry_after))
            continue
        lease = resp.lease
        time.sleep(seconds)  # "training"
        g = torch.Generator().manual_seed(lease.lease_id)
        noise = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        total = float(torch.sqrt(sum((v.double() ** 2).sum() for v in noise.values())))
        noise = {k: v * (norm / total) for k, v in noise.items()}
        stats = protocol.SubmitStats(lease_id=lease.lease_id, round=lease.round,
                                     steps=lease.max_steps,
                                     tokens=lease.max_steps * tokens_per_step,
                                     mean_loss=4.0, seconds=seconds)
        blob = codecs.to_bytes(noise, info.schedule.codec,
                               meta={"stats": stats.model_dump_json()})
        up = http.post(protocol.SUBMIT.format(lease_id=lease.lease_id), content=blob,
                       headers={"Content-Type": "application/octet-stream"})
        sent += up.status_code == 200
        print(f"lease {lease.lease_id} round {lease.round}: {up.status_code} {up.text[:200]}",
              flush=True)
    print(f"freeloader done: {sent} sent", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), *sys.argv[3:4])
