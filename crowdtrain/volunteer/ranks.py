"""One volunteer, several processes: a multi-GPU box (or a many-core CPU) runs N ranks of one
worker. Rank 0 alone talks to the coordinator; it broadcasts the run info, each lease, the
round's parameters (and once, the saved AdamW state) to the other ranks over torch.distributed
(NCCL on GPUs, gloo on CPU); every rank then trains its 1/N of each batch and DDP averages the
gradients, so the contribution equals one process training the whole batch (see
`train.InnerLoop`). The coordinator sees one volunteer with N times the throughput.

Two ways in:
- `crowdtrain join URL --nproc N` spawns the N processes itself (`launch.launch_ranks`);
- `torchrun --nproc-per-node N -m crowdtrain.worker URL [join options]` (`from_env`).

Messages between ranks are JSON bytes and float32 tensors in a fixed, sorted order: no pickle.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in an initialised torch.distributed group."""

    rank: int
    world: int
    device: torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def bcast_json(self, obj: object = None) -> object:
        """Rank 0's `obj` on every rank (others pass nothing)."""
        data = json.dumps(obj).encode() if self.leader else b""
        n = torch.tensor([len(data)], dtype=torch.int64, device=self._comm)
        dist.broadcast(n, 0)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.leader
               else torch.empty(int(n.item()), dtype=torch.uint8))
        buf = buf.to(self._comm)
        dist.broadcast(buf, 0)
        return json.loads(bytes(buf.cpu().numpy()).decode())

    def bcast_tensors(self, tensors: Mapping[str, torch.Tensor] | None,
                      shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
        """Rank 0's float32 `tensors` (named as in `shapes`) on every rank, on the CPU."""
        out = {}
        for name in sorted(shapes):
            if self.leader:
                t = tensors[name].detach().to(self._comm, torch.float32).contiguous()
            else:
                t = torch.empty(tuple(shapes[name]), dtype=torch.float32, device=self._comm)
            dist.broadcast(t, 0)
            out[name] = t.cpu()
        return out

    @property
    def _comm(self) -> torch.device:
        """Where collectives run: NCCL needs CUDA tensors, gloo CPU ones."""
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _device_for(rank: int, preference: str) -> tuple[torch.device, str]:
    from crowdtrain.run.train import pick_device

    dev = pick_device(preference)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return torch.device("cuda", local), "nccl"
    return dev, "gloo"


def init(rank: int, world: int, preference: str = "auto") -> Ranks:
    """Join the group described by MASTER_ADDR / MASTER_PORT in the environment."""
    device, backend = _device_for(rank, preference)
    if backend == "gloo" and sys.platform.startswith("linux") and \
            os.environ.get("MASTER_ADDR") in ("127.0.0.1", "localhost"):
        # gloo otherwise binds to whatever the hostname resolves to, which on some machines
        # (a container, a hostname missing from /etc/hosts) is no local address at all
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, rank=rank, world_size=world)
    return Ranks(rank, world, device)


def from_env(preference: str = "auto") -> Ranks | None:
    """The group torchrun describes in the environment (RANK, WORLD_SIZE), or None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return init(int(os.environ["RANK"]), world, preference)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
