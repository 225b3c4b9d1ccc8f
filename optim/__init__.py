"""Optimizer and scheduler registries. Usage:
    optimizer = build_optimizer("adamw", model, lr=2e-3, weight_decay=0.05)
    scheduler = build_scheduler("cosine", optimizer, total_steps=epochs * steps_per_epoch)
Schedulers here are stepped once per optimizer step (per iteration), not per epoch.
"""
import torch
from timm.optim import create_optimizer_v2

from utils.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")


def build_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return OPTIMIZERS.build(name, model, lr=lr, weight_decay=weight_decay)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int):
    return SCHEDULERS.build(name, optimizer, total_steps=total_steps)


@OPTIMIZERS.register("adamw")
def adamw(model, lr, weight_decay):
    # timm puts biases and norm weights in a group without weight decay
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay)


@SCHEDULERS.register("cosine")
def cosine(optimizer, total_steps):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


@SCHEDULERS.register("none")
def constant(optimizer, total_steps):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
