"""The benchmark's measurements (bench.py prints them): the cost of one optimizer step per training option,
and the training pipeline's throughput against its ceiling.

Usage: rows = step_costs("resnet18", 64, 64, steps=20, device); figures = pipeline_figures(...)
"""
import functools
import statistics
import time

import torch
from timm.utils import ModelEmaV3

from losses import build_loss
from models import build_model
from optim import SAM, build_optimizer, build_scheduler


def _timed(fn, device: torch.device) -> float:
    """Seconds one call of fn takes, with the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _adamw_stepper(model: torch.nn.Module, device: torch.device, sam: bool = False, adaptive: bool = False,
                   ema: bool = False):
    """train.py's training step as the benchmark times it: AdamW at a fixed lr, cross entropy, AMP and
    channels_last on CUDA, optionally SAM/ASAM and an EMA."""
    from optim.stepper import Stepper  # late: `python bench.py --help` stays instant
    from utils.device import amp_dtype_for
    amp_dtype = amp_dtype_for(device, True)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer("adamw", model, lr=1e-3, weight_decay=0.05)
    return Stepper(model, build_loss("ce"), optimizer, build_scheduler("none", optimizer),
                   torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), device, amp_dtype,
                   SAM(optimizer, 0.05, adaptive) if sam else None,
                   ModelEmaV3(model, decay=0.999, use_warmup=True) if ema else None)


def step_costs(model_name: str, img_size: int, batch_size: int, steps: int, device: torch.device) -> list[tuple]:
    from utils.device import to_input
    g = torch.Generator().manual_seed(0)
    x = to_input(torch.randn(batch_size, 3, img_size, img_size, generator=g), device)
    y = torch.randint(0, 10, (batch_size,), generator=g).to(device)

    def stepper(sam=False, adaptive=False, ema=False):
        torch.manual_seed(0)
        return _adamw_stepper(build_model(model_name, 10).to(device), device, sam, adaptive, ema)

    half = batch_size // 2
    variants = [("plain", stepper(), [(x, y)]), ("SAM", stepper(sam=True), [(x, y)]),
                ("ASAM", stepper(sam=True, adaptive=True), [(x, y)]), ("EMA", stepper(ema=True), [(x, y)]),
                ("SAM + EMA", stepper(sam=True, ema=True), [(x, y)]),
                ("accum 2 x half batch", stepper(), [(x[:half], y[:half]), (x[half:], y[half:])])]
    # round robin: one step of each variant per round, so drift in the machine's speed hits all alike
    times = {name: [] for name, _, _ in variants}
    for round_ in range(steps + 2):
        for name, st, batches in variants:
            seconds = _timed(functools.partial(st.step, batches), device)
            if round_ >= 2:  # warm-up rounds
                times[name].append(seconds)
    ema = variants[3][1]
    # the EMA update by itself, which the step-to-step noise can hide
    times["EMA update alone"] = [_timed(functools.partial(ema.ema.update, ema.model, step=1000 + i), device)
                                  for i in range(steps)]
    base = statistics.median(times["plain"])
    return [(name, statistics.median(t) * 1000, statistics.median(t) / base,
             batch_size / statistics.median(t) if name != "EMA update alone" else float("nan"))
            for name, t in times.items()]


def _train_loader(data, model: torch.nn.Module, img_size: int, batch_size: int, workers: int, device: torch.device):
    """train.py's kind of training loader: light augmentation normalized for the model, the random sampler,
    whole batches. Returns (loader, sampler)."""
    from datasets import ImageDataset, build_sampler
    from datasets.transforms import AUGS
    from models import normalization
    from utils.device import make_loader
    mean, std = normalization(model)
    dataset = ImageDataset(data.items, data.labels, AUGS.build("light", img_size, 1.0, mean, std))
    sampler = build_sampler("random", data.labels, 0)
    return make_loader(dataset, batch_size, workers, device, sampler, drop_last=True), sampler


def _batches(loader, sampler, n: int):
    """n (images, labels) batches from the loader, epoch after epoch."""
    epoch = 0
    while True:
        epoch += 1
        sampler.set_epoch(epoch)
        for images, labels, _ in loader:
            yield images, labels
            n -= 1
            if n == 0:
                return


def _train_seconds(stepper, source) -> float:
    """Seconds of the training steps over source but the first 2 (they warm up: worker start, allocator)."""
    from utils.device import to_input
    device = stepper.device
    stepper.model.train()
    start = None
    for i, (images, labels) in enumerate(source):
        if i == 2:
            _timed(lambda: None, device)
            start = time.perf_counter()
        stepper.step([(to_input(images, device), labels.to(device, non_blocking=True))])
    _timed(lambda: None, device)
    return time.perf_counter() - start


def _loader_rate(batches, batch_size: int) -> float:
    """Images/s of the loader alone, timed from its third batch."""
    start, count = None, 0
    for i, (images, _) in enumerate(batches):
        if i == 2:
            start = time.perf_counter()
        elif i > 2:
            count += len(images)
    return (count + batch_size) / (time.perf_counter() - start)


def pipeline_figures(model_name: str, img_size: int, batch_size: int, steps: int, device: torch.device,
                     data_source: str = "digits", workers: int = -1, cache: str = "auto") -> dict:
    """(a) train images/s over the real loader, (b) over one in-memory batch, (e) the loader alone."""
    from datasets import load_data, screen_images
    from utils.device import default_workers
    data = load_data(data_source)
    start = time.perf_counter()
    data, _ = screen_images(data, False, cache, img_size)
    prepare_seconds = time.perf_counter() - start
    workers = default_workers(workers)
    torch.manual_seed(0)
    stepper = _adamw_stepper(build_model(model_name, len(data.classes), img_size=img_size).to(device), device)
    loader, sampler = _train_loader(data, stepper.model, img_size, batch_size, workers, device)
    fixed = next(_batches(loader, sampler, 1))
    real_s = ceiling_s = 0.0
    for _ in range(2):  # ceiling, real, ceiling, real: a drift in the machine's speed hits both alike
        ceiling_s += _train_seconds(stepper, [fixed] * (steps + 2))
        real_s += _train_seconds(stepper, _batches(loader, sampler, steps + 2))
    real, ceiling = 2 * steps * batch_size / real_s, 2 * steps * batch_size / ceiling_s
    return {"train_real": real, "train_ceiling": ceiling, "ratio": real / ceiling,
            "loader": _loader_rate(_batches(loader, sampler, steps + 2), batch_size),
            "workers": workers, "prepare_seconds": prepare_seconds}
