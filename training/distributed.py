"""Data-parallel training under ``torchrun``: process group, devices and batch sharding.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them training runs
in one process and nothing here creates a process group. Every rank draws the same
global batch from the same per-epoch permutation and takes its own contiguous share, so
with the loss normalised by global-batch counts (``training/loss.py``) the averaged
gradient equals the single-process gradient of that global batch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's contiguous share of a global batch (sizes differ by at most one)."""
        return [
            int(i)
            for i in np.array_split(np.asarray(indices, dtype=np.int64), self.world_size)[self.rank]
        ]

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place, on the device the backend needs; returns ``tensor``."""
        if self.enabled:
            moved = tensor.to(self.device)
            torch.distributed.all_reduce(moved)
            tensor.copy_(moved.to(tensor.device))
        return tensor


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return device


def setup_distributed(device_name: str) -> Distributed:
    """Join the ``torchrun`` process group if there is one (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


# The last collective of each process group this process left, never released: see
# teardown_distributed.
_LAST_COLLECTIVES: list = []


def teardown_distributed(dist: Distributed) -> None:
    """Leave the process group without a deadlock at exit.

    Gloo runs collectives on its own worker threads, and the thread that drops the last
    reference to a finished collective frees it there; freeing the tensors of a collective
    that Python started takes the GIL. The process group's destructor joins those threads
    while its caller holds the GIL (the DDP reducer, garbage-collected when training
    returns). A worker still freeing the last collective at that moment waits for the GIL
    forever, and torchrun for a rank that has written its results (1 run in ~10 on a loaded
    machine; both threads seen in gdb). So the last collective is a barrier whose handle
    this process keeps for good: a worker thread never holds its last reference, nor that
    of the collectives it waited for, and a barrier waits for every one still running.

    Called from a ``finally`` clause: while an exception propagates (``sys.exc_info``) the
    other ranks may never reach a barrier, so this rank leaves without one and torchrun
    stops the others.
    """
    if not (dist.enabled and torch.distributed.is_initialized()):
        return
    if sys.exc_info()[0] is not None:
        torch.distributed.destroy_process_group()
        return
    last = torch.distributed.barrier(async_op=True)
    last.wait()
    _LAST_COLLECTIVES.append(last)
    torch.distributed.destroy_process_group()
