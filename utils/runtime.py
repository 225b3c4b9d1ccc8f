"""Device, loaders and prediction, shared by train.py, predict.py, ensemble.py and the benchmark.

Usage:
    device = pick_device("auto"); amp_dtype = amp_dtype_for(device, amp=True)
    loader = make_loader(dataset, batch_size=64, workers=2, device=device)
    probs = predict_probs(model, loader, device, amp_dtype, tta="flip")
"""
import random

import numpy as np
import torch
from tqdm import tqdm

from datasets.transforms import TTA
from utils import UserError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is visible; use --device auto or cpu")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def amp_dtype_for(device: torch.device, amp: bool) -> torch.dtype | None:
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_workers(requested: int, processes: int = 1) -> int:
    """--workers -1: this process's share of the CPU cores (torchrun: cores / processes), up to 8."""
    from datasets.cache import cores
    return requested if requested >= 0 else max(1, min(8, cores() // processes))


def _worker_init(_: int) -> None:
    import cv2
    cv2.setNumThreads(0)  # each loader worker is one thread of parallelism already: no OpenCV pool inside it
    torch.set_num_threads(1)


def make_loader(dataset, batch_size: int, workers: int, device: torch.device, sampler=None, drop_last=False):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if workers > 0 else None, prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(0))  # worker seeds off the global RNG: a resumed run draws the same


def to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


@torch.no_grad()
def predict_probs(model, loader, device, amp_dtype=None, tta: str = "none") -> np.ndarray:
    """Class probabilities, averaged over the TTA views of each batch."""
    model.eval()
    views, out = TTA.build(tta), []
    for images, _, _ in tqdm(loader, desc="predict", leave=False, disable=None):
        x = to_input(images, device)
        probs = 0
        for view in views:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                probs = probs + model(view(x)).float().softmax(1)
        out.append((probs / len(views)).cpu())
    return torch.cat(out).numpy()


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Cross entropy of probabilities (of the TTA average, when on)."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
