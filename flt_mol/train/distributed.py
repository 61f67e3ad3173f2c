"""Process-group helpers for DDP (``torchrun --nproc_per_node=N``; gloo on CPU, nccl on GPU).

Everything degrades to the single-process case when no process group is initialised, so the
loop and the tasks call these unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    if not is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_from_env(device_type: str) -> DistInfo:
    """Initialise the default group from torchrun's environment (``WORLD_SIZE > 1``), else no-op.

    The backend is nccl for CUDA devices and gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or is_initialized():
        return info()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        # Before the group exists: NCCL binds each process's communicator to its current device.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return info()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is untouched). Identity without a process group."""
    out = tensor.detach().clone()
    if is_initialized():
        if dist.get_backend() == "nccl" and out.device.type != "cuda":
            # NCCL reduces CUDA tensors only; counts and metric totals are built on the CPU.
            buf = out.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            return buf.to(tensor.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def global_mean_scale(local_count: torch.Tensor | float) -> torch.Tensor:
    """``world_size / (sum over ranks of local_count)``.

    Multiplying a local *sum* by this gives a loss whose DDP gradient (averaged over ranks) equals
    the gradient of the global mean over all ranks' items, whatever each rank holds: this is what
    makes an N-process step identical to a 1-process step on the same global batch.
    """
    count = torch.as_tensor(local_count, dtype=torch.float64)
    total = all_reduce_sum(count)
    world = info().world_size
    return (world / total.clamp_min(1.0)).float()


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    if not is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
