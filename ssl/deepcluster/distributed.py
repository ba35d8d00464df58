"""One training over several processes (torchrun): who is who, and the few collectives it needs.

Each process (rank) embeds its shard of the images; the shards are gathered so rank 0 clusters
all of them and sends the clustering to every rank; every rank draws the same sample order and
trains on its share of each batch, gradients averaged by DistributedDataParallel. Gloo on the CPU,
NCCL on CUDA. A single process (no torchrun) runs the same code with all of this a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> Ranks:
        """What torchrun says (RANK, WORLD_SIZE, LOCAL_RANK), or one process."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


ONE = Ranks()  # a run of one process


def start(device: torch.device) -> Ranks:
    """Join the process group when launched by torchrun; returns this process's ranks."""
    ranks = Ranks.from_env()
    if ranks.active and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return ranks


def device_for(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per local rank; the CPU is shared."""
    if device.type == "cuda" and ranks.active:
        torch.cuda.set_device(ranks.local_rank)
        return torch.device("cuda", ranks.local_rank)
    return device


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


def finish(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, ranks: Ranks) -> np.ndarray:
    """The rows [start, stop) of `n` this rank embeds: contiguous, as even as possible."""
    bounds = np.linspace(0, n, ranks.world + 1).round().astype(int)
    return np.arange(bounds[ranks.rank], bounds[ranks.rank + 1])


def gather_rows(local: np.ndarray, n: int, ranks: Ranks) -> np.ndarray:
    """Every rank's `shard` rows, concatenated in rank order on every rank."""
    if not ranks.active:
        return local
    width = int(np.ceil(n / ranks.world)) + 1  # shards differ by at most one row: pad to one size
    padded = torch.zeros(width, *local.shape[1:], dtype=torch.float32)
    padded[: len(local)] = torch.from_numpy(local)
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded)
    sizes = [len(shard(n, Ranks(r, ranks.world))) for r in range(ranks.world)]
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).numpy()


def broadcast(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's `obj` on every rank (pickled; for clusterings and small state)."""
    if not ranks.active:
        return obj
    box = [obj if ranks.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any, ranks: Ranks) -> list[Any]:
    if not ranks.active:
        return [obj]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def sum_scalars(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sums over ranks (the epoch's loss totals)."""
    if not ranks.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def merge_rows(memory: torch.Tensor, touched: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The memory bank after an epoch in which each rank wrote the rows of its own images:
    every row comes from the one rank that wrote it."""
    if not ranks.active:
        return memory
    mine = memory * touched.view(1, -1, 1)
    dist.all_reduce(mine)
    return torch.where(touched_any(touched, ranks).view(1, -1, 1), mine, memory)


def wrap(module: torch.nn.Module, device: torch.device, ranks: Ranks, unused: bool = False):
    """`module` under DistributedDataParallel when several processes train, else itself.
    `unused`: some parameters may get no gradient in a step (DeeperCluster's sub-heads of the
    super-classes absent from a batch), which DDP must be told to expect."""
    if not ranks.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=unused)


def touched_any(touched: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    count = touched.to(torch.int32)
    dist.all_reduce(count)
    return count > 0
