"""One optimizer step and one training epoch, as train.py runs them.

Usage:
    stepper = Stepper(model, loss_fn, optimizer, scheduler, scaler, device, amp_dtype, sam, ema, clip_grad)
    loss_sum = stepper.step([(x, y), ...])                  # None: a NaN/inf step, skipped
    mean_loss = train_one_epoch(stepper, loader, accum_steps, mixup, stop=stop, progress=EpochProgress())
"""
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

from optim import SAM, frozen_norm_stats, is_per_epoch
from utils import UserError, distributed
from utils.device import to_input
from utils.stop import StopSignal


@dataclass
class Stepper:
    """One optimizer step from a list of micro-batches: gradient accumulation, SAM/ASAM's second
    pass, AMP loss scaling, gradient clipping, EMA and the per-iteration lr schedule, in that order.
    `net` runs the forward pass (the model under DDP and/or torch.compile; default the model itself);
    under torchrun the loss is summed over ranks, so every rank skips or takes a step alike."""
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None = None
    sam: SAM | None = None
    ema: ModelEmaV3 | None = None
    clip_grad: float = 0.0
    nan_patience: int = 5
    net: torch.nn.Module | None = None
    steps: int = 0
    bad_steps: int = 0  # in a row

    def _forward_backward(self, batches) -> torch.Tensor:
        net = self.net if self.net is not None else self.model
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(batches):
            last = i == len(batches) - 1  # DDP: gradients are all-reduced once, after the last micro-batch
            with contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    logits = net(x)
                loss = self.loss_fn(logits.float(), y)  # losses in fp32, also under AMP
                self.scaler.scale(loss / len(batches)).backward()
            total += loss.detach() * len(x)
        return total

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """Returns the summed (per-image) loss at the current weights; None when it was NaN/inf and the
        step was skipped (nan_patience such steps in a row raise UserError, the weights untouched)."""
        loss_sum = distributed.all_sum(self._forward_backward(batches))
        if not torch.isfinite(loss_sum):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            if self.bad_steps >= self.nan_patience:
                raise UserError(f"the training loss was NaN/inf for {self.bad_steps} optimizer steps in a row "
                                f"(from step {self.steps + 1}, each skipped); checkpoints are as they were. Lower "
                                f"--lr, set --clip_grad, or check the data")
            return None
        self.bad_steps = 0
        if self.sam is not None and self.sam.perturb(self.scaler.get_scale()):  # 1.0 when the scaler is off
            self.optimizer.zero_grad(set_to_none=True)
            with frozen_norm_stats(self.model):
                self._forward_backward(batches)
            self.sam.restore()
        self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.steps)
        if not is_per_epoch(self.scheduler):
            self.scheduler.step()
        return loss_sum


@dataclass
class EpochProgress:
    """How far an epoch has come: the optimizer steps' batches taken (this rank's), their summed loss (over ranks)
    and this rank's image count. Saved at a stop inside the epoch; a resumed run starts its loader after `batches`."""
    batches: int = 0
    total: torch.Tensor | float = 0.0
    seen: int = 0
    lr: float | None = None  # the lr of the epoch's last optimizer step so far (what its row logs), else its start's

    def add(self, loss_sum: torch.Tensor | None, batches, lr: float | None = None) -> None:
        """One optimizer step's batches, taken at `lr`; a skipped (NaN/inf) step's images leave the epoch's mean
        loss."""
        self.batches += len(batches)
        self.lr = self.lr if lr is None else lr
        if loss_sum is not None:
            self.total, self.seen = self.total + loss_sum, self.seen + sum(len(x) for x, _ in batches)

    def state(self) -> dict:
        return {"batches": self.batches, "total": torch.as_tensor(self.total).detach().cpu(), "seen": self.seen,
                "lr": self.lr}


PROGRESS_EVERY_S = 20.0  # with output to a file, a pipe or a notebook (no progress bar): a line at most this often


class Progress:
    """What an epoch shows while it runs: on a terminal the bar with the loss and lr so far; elsewhere (a log file,
    nohup, a notebook's !python) a line every PROGRESS_EVERY_S seconds: step, loss, lr, img/s, time left."""

    def __init__(self, loader, desc: str, progress: "EpochProgress"):
        self.bar = tqdm(loader, desc=desc, leave=False, disable=None)
        self.total = len(loader) + progress.batches if hasattr(loader, "__len__") else None  # a resumed epoch: the rest
        self.desc, self.progress = desc.strip() or "training", progress
        self.start = self.last = time.monotonic()
        self.start_seen, self.start_batches, self.steps = progress.seen, progress.batches, 0

    def __iter__(self):
        return iter(self.bar)

    def stepped(self) -> None:
        self.steps += 1
        now = time.monotonic()
        if self.bar.disable and now - self.last < PROGRESS_EVERY_S:
            return
        if not self.bar.disable and self.steps % 10:  # the bar's postfix every 10 steps: cheap
            return
        world = distributed.world_size()
        loss = float(self.progress.total) / max(self.progress.seen * world, 1)
        lr = self.progress.lr  # the last step's
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=False)
            return
        self.last = now
        rate = (self.progress.seen - self.start_seen) * world / max(now - self.start, 1e-9)
        done = self.progress.batches
        per_batch = (now - self.start) / max(done - self.start_batches, 1)
        left = f" | {(self.total - done) * per_batch:.0f} s left" if self.total else ""
        print(f"  {self.desc} batch {done}{f'/{self.total}' if self.total else ''} | loss {loss:.4f} | lr {lr:.3g} | "
              f"{rate:.0f} img/s{left}", file=sys.stdout, flush=True)


# after each optimizer step taken (a skipped NaN/inf step is none): (the fit's step count, the step's loss summed over
# its images and ranks, this rank's image count, the lr it took)
StepHook = Callable[[int, torch.Tensor, int, float], None]


def train_one_epoch(stepper: Stepper, loader, accum_steps: int = 1, mixup=None, desc="",
                    stop: StopSignal | None = None, progress: EpochProgress | None = None,
                    on_step: StepHook | None = None) -> float:
    """The epoch's mean training loss. `progress` (updated after every optimizer step) is where a resumed epoch
    starts: its loader must already leave out the batches it counts (datasets.SeededSampler.set_epoch's skip).
    on_step: called after every optimizer step (the W&B rows per N steps)."""
    progress = progress if progress is not None else EpochProgress()
    stepper.model.train()
    batches = []
    shown = Progress(loader, desc, progress)

    def step():
        lr = stepper.optimizer.param_groups[0]["lr"]  # what this step takes: the schedule moves after it
        loss_sum = stepper.step(batches)
        progress.add(loss_sum, batches, lr)
        if on_step is not None and loss_sum is not None:
            on_step(stepper.steps, loss_sum, sum(len(x) for x, _ in batches), lr)
    for images, labels, _ in shown:
        x, y = to_input(images, stepper.device), labels.to(stepper.device, non_blocking=True)
        if mixup is not None and len(x) % 2 == 0:  # timm's Mixup pairs images; an odd tail batch stays unmixed
            x, y = mixup(x, y)
        batches.append((x, y))
        if len(batches) == accum_steps:
            step()
            batches = []
            shown.stepped()
            if stop is not None:
                stop.check(distributed.any_rank)  # between optimizer steps only; under torchrun all ranks at one step
    if batches:
        step()
    seen = int(distributed.all_sum(torch.tensor(progress.seen, device=stepper.device)))  # `total`: over ranks already
    return float(progress.total) / max(seen, 1)
