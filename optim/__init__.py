"""Optimizer and scheduler registries. Usage:
    optimizer = build_optimizer("adamw", model, lr=2e-3, weight_decay=0.05)
    scheduler = build_scheduler("cosine", optimizer, total_steps=epochs * steps_per_epoch)
Schedulers here are stepped once per optimizer step (per iteration), not per epoch.
"""
import torch
from timm.optim import create_optimizer_v2

OPTIMIZERS = {}
SCHEDULERS = {}


def _registrar(table, kind):
    def register(name):
        def add(fn):
            assert name not in table, f"{kind} {name!r} registered twice"
            table[name] = fn
            return fn
        return add
    return register


register_optimizer = _registrar(OPTIMIZERS, "optimizer")
register_scheduler = _registrar(SCHEDULERS, "scheduler")


def build_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise KeyError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](model, lr=lr, weight_decay=weight_decay)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int):
    if name not in SCHEDULERS:
        raise KeyError(f"unknown scheduler {name!r}; known: {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](optimizer, total_steps=total_steps)


@register_optimizer("adamw")
def adamw(model, lr, weight_decay):
    # timm puts biases and norm weights in a group without weight decay
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay)


@register_scheduler("cosine")
def cosine(optimizer, total_steps):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


@register_scheduler("none")
def constant(optimizer, total_steps):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
