"""torchrun / DistributedDataParallel helpers.

cifarlab never launches or wires processes itself: `torchrun` starts one process per GPU
(or per CPU slot with gloo) and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; this
module joins that process group and offers the few collectives the training loop needs.
Without torchrun every function here is a no-op for a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# A rank that dies or hangs must take the job down, not leave the others waiting forever.
TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def restart_count() -> int:
    """How often torchrun restarted this job's workers (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init(device_type: str) -> World:
    """Join torchrun's process group: NCCL on CUDA, gloo on the CPU."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                  int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        # torchrun may keep its store across restarts (--max-restarts); keys of the earlier
        # round would point the new workers to dead peers, so each round gets its own prefix.
        store, rank, size = next(dist.rendezvous("env://", timeout=TIMEOUT))
        store = dist.PrefixStore(f"cifarlab/round{restart_count()}", store)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=store,
                                rank=rank, world_size=size, timeout=TIMEOUT)
    return world


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place across ranks ("sum" or "max"); returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable Python object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP does so at the
    start of each forward, so after the last step of an epoch the ranks' buffers differ."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def same_on_all_ranks(tensors: list[torch.Tensor]) -> bool:
    """True when every rank holds the same values (compared through per-tensor checksums
    in float64: max and -min across ranks agree)."""
    if not dist.is_initialized():
        return True
    sums = torch.stack([t.detach().double().sum() for t in tensors])
    both = torch.cat([sums, -sums]).to(tensors[0].device)
    reduced = all_reduce(both.clone(), "max")
    n = len(tensors)
    return bool(torch.equal(reduced[:n], -reduced[n:]))
