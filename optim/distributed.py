"""Process-group setup and the few collective helpers the training loop needs.

A script runs either as one process (``python script.py``) or as N processes started by
``torchrun --nproc_per_node N script.py``. torchrun tells each process who it is through the
environment: ``RANK`` (0..N-1 over all nodes), ``LOCAL_RANK`` (0..n-1 on this node, which GPU to
use), ``WORLD_SIZE`` (N), and ``MASTER_ADDR``/``MASTER_PORT`` (where rank 0 listens). Every helper
here also works, as a no-op, in a single process without a process group.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (if ``WORLD_SIZE`` > 1) and pick this rank's device.

    Returns ``(rank, world_size, device)``. Backend: NCCL with one GPU per process (``cuda:LOCAL_RANK``)
    when CUDA is available, Gloo on CPU otherwise. Calling it again is harmless.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return get_rank(), get_world_size(), device


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0: the one process that prints and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over ranks, in place; returns it."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
