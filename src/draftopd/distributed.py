"""Which process this is under ``torchrun``, and joining its process group. A single process (no ``RANK`` /
``WORLD_SIZE`` in the environment) is rank 0 of 1 and never touches ``torch.distributed``."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless launched by torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_writer() -> bool:
    """Rank 0 of a torchrun launch, or the only process: the one that writes checkpoints, logs and manifests."""
    return rank_world()[0] == 0


def init_distributed(device: str) -> str:
    """Join the process group of a torchrun launch (gloo on CPU, NCCL on CUDA); returns this rank's device
    (``cuda`` becomes ``cuda:LOCAL_RANK``). A single process does nothing."""
    if rank_world()[1] == 1:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if rank_world()[1] > 1 and dist.is_initialized():
        dist.barrier()
