"""This training process under torchrun: rank, world size, device, all-reduce and the process group."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Process:
    """This process in the run: rank, world size, device (cuda:LOCAL_RANK when CUDA is there)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum of `values` over the processes (all-reduce)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj: object) -> list[object]:
        """`obj` of every process, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


@contextlib.contextmanager
def process_group():
    """The Process of this run; under torchrun (WORLD_SIZE > 1) joins the process group (nccl on
    CUDA, gloo on CPU) for the duration."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    joined = world_size > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield Process(dist.get_rank() if world_size > 1 else 0, world_size, device)
    finally:
        if joined:
            dist.destroy_process_group()
