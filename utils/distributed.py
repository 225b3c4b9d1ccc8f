"""Data-parallel training under torchrun: one process per GPU (or per CPU slot with gloo).

Usage:
    torchrun --nproc_per_node=4 train.py --batch_size 256 ...   # 64 images per GPU, one optimizer step per 256
In code:
    rank, world = distributed.setup(pick_device(cfg.device))   # torchrun's env; (0, 1) when launched plainly
    part = distributed.shard(n)            # this rank's positions of an n-long evaluation set
    probs = distributed.gather_rows(local_probs, part, n)   # every rank gets all n rows

--batch_size is the global batch: each of the `world` processes takes batch_size / world images
of every global batch (SeededSampler's rank::world slice of the epoch's order), so a run on 4 GPUs
trains on the same batches, in the same order, as a run on 1. Only rank 0 talks to W&B and writes
files; the others train, evaluate their share and follow rank 0's decisions.
"""
import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from utils import UserError


def setup(device: torch.device) -> tuple[int, int]:
    """Join torchrun's process group (nccl on CUDA, else gloo) and pin this process to its GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = device.type == "cuda"
        if cuda:
            per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
            if per_node > gpus:
                raise UserError(f"torchrun started {per_node} processes on this machine, but {gpus} GPU(s) are "
                                f"visible: use --nproc_per_node={gpus} (one process per GPU), or --device cpu")
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return rank(), world_size()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device_for(device: torch.device) -> torch.device:
    """This process's GPU under torchrun (cuda:LOCAL_RANK), else the device as given."""
    return torch.device("cuda", local_rank()) if device.type == "cuda" and world_size() > 1 else device


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the model when there is more than one process, else the model."""
    if world_size() == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place; a no-op for one process)."""
    if world_size() > 1:
        dist.all_reduce(value)
    return value


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (a stop signal that reached one process first)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    return bool(all_sum(t).item())


def shard(n: int) -> np.ndarray:
    """Positions rank, rank + world, ... of an n-long set: every rank evaluates its share once."""
    return np.arange(rank(), n, world_size())


def gather_rows(rows: np.ndarray, part: np.ndarray, n: int) -> np.ndarray:
    """Reassemble the n rows that the ranks computed for their shard() parts."""
    if world_size() == 1:
        return rows
    pieces = [None] * world_size()
    dist.all_gather_object(pieces, (part, rows))
    out = np.empty((n, *rows.shape[1:]), rows.dtype)
    for p, r in pieces:
        out[p] = r
    return out


def broadcast(value):
    """Rank 0's value on every rank (a run id, a decision)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
