"""Multi-process training under ``torchrun``: process group set-up, the device of each process, DDP wrapping and
the few collectives the loop needs. A plain ``python`` run is a world of one and every helper is a no-op."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import UsageError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, world: World) -> torch.device:
    """``auto`` = CUDA when available, else the CPU; each process of a CUDA run takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", world.local_rank if world.distributed else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def init_world(device_name: str) -> World:
    """Join the process group when ``WORLD_SIZE`` > 1 (env:// set by torchrun): nccl for CUDA, gloo on the CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    return world


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel (gradients averaged over the processes) when distributed."""
    if not world.distributed:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def all_true(flag: bool, world: World, device: torch.device) -> bool:
    """Whether ``flag`` holds on every process (so all of them take the same branch)."""
    if not world.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather(obj, world: World) -> list:
    """``obj`` from every process, by rank."""
    if not world.distributed:
        return [obj]
    objects = [None] * world.size
    dist.all_gather_object(objects, obj)
    return objects
