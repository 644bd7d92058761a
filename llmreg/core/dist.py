"""torch.distributed, asked once: rank, world size, reductions that are no-ops in one process, and checks that
every rank holds the same value (a different frozen set or layer choice on one rank hangs the reduction)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    """A process group exists and has more than one rank."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (nothing in one process); returns it."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average each tensor over ranks in place."""
    if is_distributed():
        for t in tensors:
            torch_dist.all_reduce(t)
            t.div_(torch_dist.get_world_size())


def all_reduce_sum_on_backend(t: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ranks, moving it to the GPU first when the backend is NCCL; returns a CPU tensor."""
    if not is_distributed():
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else t.device
    moved = t.to(device)
    torch_dist.all_reduce(moved)
    return moved.cpu()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def check_same_on_every_rank(values: list[str], what: str) -> None:
    """Raise when the ranks hold different `values` (compared by a hash of the sorted strings)."""
    digest = hashlib.sha256("\n".join(sorted(values)).encode()).hexdigest()
    digests = gather_objects(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"{what}: ranks differ ({digests})")
