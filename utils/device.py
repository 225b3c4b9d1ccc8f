"""Device, seeds, CPU cores and loaders, shared by every script and the benchmark.

Usage:
    device = pick_device("auto"); amp_dtype = amp_dtype_for(device, amp=True)
    loader = make_loader(dataset, batch_size=64, workers=default_workers(-1), device=device)
"""
import atexit
import multiprocessing
import random
import signal

import numpy as np
import torch

from utils import UserError, cores


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """auto (cuda when there is one), cpu, cuda, cuda:N (that GPU, made the current one)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}, but no CUDA device is visible; use --device auto or cpu")
    if name.startswith("cuda:"):
        index = int(name.split(":")[1])
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}, but {torch.cuda.device_count()} CUDA device(s) are visible "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}; CUDA_VISIBLE_DEVICES renumbers them)")
        torch.cuda.set_device(index)  # what allocates without naming a device goes there too
        return torch.device("cuda", index)
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def amp_dtype_for(device: torch.device, amp: bool) -> torch.dtype | None:
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_workers(requested: int, processes: int = 1) -> int:
    """--workers -1: this process's share of the CPU cores (torchrun: cores / processes), up to 8."""
    return requested if requested >= 0 else max(1, min(8, cores() // processes))


def _worker_init(_: int) -> None:
    import cv2
    cv2.setNumThreads(0)  # each loader worker is one thread of parallelism already: no OpenCV pool inside it
    torch.set_num_threads(1)
    ignore_stop_signals()


def _end_loader_workers() -> None:
    """At exit, daemonic children still alive (loader workers whose loader a crash's traceback kept) are killed, as
    multiprocessing's own exit hook would end them, but with SIGKILL: they ignore its SIGTERM, and it then waits for
    them forever. Registered after that hook, so it runs first."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise "worker killed by signal" here
    workers = [proc for proc in multiprocessing.active_children() if proc.daemon]
    for proc in workers:
        proc.kill()
    for proc in workers:
        proc.join(5)


def ignore_stop_signals() -> None:
    """In a loader worker: SIGTERM and SIGINT sent to the whole process group (Ctrl-C in a terminal, SLURM, a
    `kill -- -PGID`) are the main process's to handle (utils/stop.py). A worker they killed would end the run in
    torch's "DataLoader worker is killed by signal" error instead of a clean stop; torch stops the workers itself
    when the main process exits, and each one exits when it sees its parent gone."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def make_loader(dataset, batch_size: int, workers: int, device: torch.device, sampler=None, drop_last=False):
    if workers > 0:
        atexit.unregister(_end_loader_workers)  # once per process, and after multiprocessing's hook
        atexit.register(_end_loader_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if workers > 0 else None, prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(0))  # worker seeds off the global RNG: a resumed run draws the same


def to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images
