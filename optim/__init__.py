"""Optimizer and scheduler registries, and SAM/ASAM (optim/sam.py). Usage:
    optimizer = build_optimizer("adamp", model, **optimizer_kwargs(cfg))
    scheduler = build_scheduler("cosine", optimizer, **scheduler_kwargs(cfg, steps_per_epoch))
Weight decay never applies to biases and norm weights (1-d parameters). Schedulers are stepped
once per optimizer step, except `plateau`, which steps once per epoch on the monitored metric.
"""
import math

import adamp
import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay

from optim.sam import SAM, frozen_norm_stats
from utils.registry import Registry

__all__ = ["OPTIMIZERS", "SCHEDULERS", "SAM", "build_optimizer", "build_scheduler", "frozen_norm_stats", "is_per_epoch",
           "optimizer_kwargs", "scheduler_kwargs"]

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")


def optimizer_kwargs(cfg) -> dict:
    return dict(lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def scheduler_kwargs(cfg, steps_per_epoch: int) -> dict:
    return dict(epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=cfg.warmup_epochs,
                step_size=cfg.step_size, gamma=cfg.gamma, plateau_patience=cfg.plateau_patience, maximize=cfg.maximize)


def build_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float, momentum: float = 0.9):
    groups = param_groups_weight_decay(model, weight_decay) if model is not None else None
    return OPTIMIZERS.build(name, groups, lr=lr, weight_decay=weight_decay, momentum=momentum)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, **kw):
    return SCHEDULERS.build(name, optimizer, **kw)


def is_per_epoch(scheduler) -> bool:
    """True for schedulers stepped once per epoch with the monitored metric (plateau)."""
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


# ----------------------------------------------------------------------------- optimizers
@OPTIMIZERS.register("sgd")
def sgd(groups, lr, weight_decay, momentum, **_):
    """SGD with Nesterov momentum (--momentum); the classic for CNNs with a long schedule."""
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)


@OPTIMIZERS.register("adam")
def adam(groups, lr, weight_decay, **_):
    """Adam; weight decay as an L2 term in the gradient."""
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(groups, lr, weight_decay, **_):
    """AdamW: Adam with decoupled weight decay; the safe default."""
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


class _ReshapeViews:
    """adamp 0.3 flattens weights and gradients with .view(), which fails on the channels_last tensors train.py
    uses on CUDA ("view size is not compatible with input tensor's size and stride"); .reshape() is the same
    projection for any memory format (the flattened tensors are only read)."""

    @staticmethod
    def _channel_view(x):
        return x.reshape(x.size(0), -1)

    @staticmethod
    def _layer_view(x):
        return x.reshape(1, -1)


class AdamP(_ReshapeViews, adamp.AdamP):
    pass


class SGDP(_ReshapeViews, adamp.SGDP):
    pass


@OPTIMIZERS.register("adamp")
def adamp_(groups, lr, weight_decay, **_):
    """AdamP (Heo et al. 2021, adamp package): removes the radial update on scale-invariant weights."""
    return AdamP(groups, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("sgdp")
def sgdp(groups, lr, weight_decay, momentum, **_):
    """SGDP (adamp package): SGD with Nesterov momentum and AdamP's projection."""
    return SGDP(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)


def _timm(opt: str, doc: str):
    def build(groups, lr, weight_decay, **_):
        return create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay)
    build.__doc__ = doc
    OPTIMIZERS.register(opt)(build)


_timm("lamb", "LAMB (timm): layer-wise adaptive Adam, for large batches")
_timm("lion", "Lion (timm): sign-momentum; use a 3-10x smaller lr and larger weight decay than AdamW")
_timm("radam", "RAdam (timm): Adam with a rectified warm-up of the adaptive term")
_timm("adan", "Adan (timm): Nesterov-accelerated adaptive momentum")


# ----------------------------------------------------------------------------- schedulers
def _lambda(optimizer, factor):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


@SCHEDULERS.register("cosine")
def cosine(optimizer, epochs, steps_per_epoch, warmup_epochs=0.0, **_):
    """Linear warm-up over --warmup_epochs, then cosine decay to 0 at the last step."""
    total, warm = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)

    def factor(step):
        if step < warm:
            return _warmup(step, warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return _lambda(optimizer, factor)


@SCHEDULERS.register("step")
def step(optimizer, steps_per_epoch, step_size=5, gamma=0.1, warmup_epochs=0.0, **_):
    """Multiply the lr by --gamma every --step_size epochs (after the warm-up)."""
    warm = round(warmup_epochs * steps_per_epoch)
    return _lambda(optimizer, lambda s: _warmup(s, warm) * gamma ** (max(0, s - warm) // (step_size * steps_per_epoch)))


@SCHEDULERS.register("plateau")
def plateau(optimizer, gamma=0.1, plateau_patience=2, maximize=True, **_):
    """Multiply the lr by --gamma when the monitored metric has not improved for --plateau_patience epochs."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max" if maximize else "min",
                                                      factor=gamma, patience=plateau_patience)


@SCHEDULERS.register("onecycle")
def onecycle(optimizer, epochs, steps_per_epoch, warmup_epochs=0.0, **_):
    """One-cycle (Smith 2018): up to --lr, then annealed far below; warm-up share = --warmup_epochs (else 30%)."""
    # cycle momentum (or Adam's beta1) inversely to the lr, unless the optimizer has none (or SGD without momentum)
    cycle_momentum = "betas" in optimizer.defaults or bool(optimizer.defaults.get("momentum"))
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(2, epochs * steps_per_epoch),
        pct_start=min(0.9, warmup_epochs / epochs) if warmup_epochs else 0.3, cycle_momentum=cycle_momentum)


@SCHEDULERS.register("none")
def constant(optimizer, steps_per_epoch=1, warmup_epochs=0.0, **_):
    """Constant lr (after the warm-up)."""
    warm = round(warmup_epochs * steps_per_epoch)
    return _lambda(optimizer, lambda s: _warmup(s, warm))
