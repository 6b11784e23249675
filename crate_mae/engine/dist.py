"""Ranks and devices: the only module that reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun).

    torchrun --nproc_per_node=8 pretrain.py ...                                  # one node
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$HEAD_NODE:29500 --rdzv_id=$JOB_ID pretrain.py ...       # every node runs this
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as tdist

from crate_mae.errors import ConfigError


T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank of world_size, its local rank on the node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' → cuda:<local rank> when CUDA is available, else cpu; 'cuda' → cuda:<local rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's own message lists every device type: say which key is at fault
        raise ConfigError(f"run.device: {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name!r} but CUDA is not available on this machine")
    return device


def init(device: str = "auto") -> Dist:
    """Join the process group if torchrun started several processes (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        tdist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=30))
    return Dist(rank, world_size, local_rank, dev)


def run_with(device: str, fn: Callable[[Dist], T]) -> T:
    """fn(Dist) inside the process group (joined first, left afterwards, also on an error)."""
    dist = init(device)
    try:
        return fn(dist)
    finally:
        shutdown()


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        tdist.barrier()


def all_reduce_sum(dist: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place, and returned); exact counts for evaluation."""
    if dist.enabled:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_reduce_max(dist: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """The maximum over ranks (in place, and returned)."""
    if dist.enabled:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return tensor


def all_gather_object(dist: Dist, obj: Any) -> list[Any]:
    if not dist.enabled:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(dist: Dist, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def rng_state() -> dict[str, Any]:
    """This process's generator states as plain Python values: they travel through all_gather_object
    and load with `torch.load(weights_only=True)`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
