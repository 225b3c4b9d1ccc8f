"""Optimizer and scheduler registries, and SAM/ASAM (optim/sam.py). Usage:
    optimizer = build_optimizer("adamp", model, **optimizer_kwargs(cfg))
    scheduler = build_scheduler("cosine", optimizer, **scheduler_kwargs(cfg, steps_per_epoch))
Optimizers are built through timm's create_optimizer_v2 and its parameter groups: weight decay never
applies to biases, norm weights and the model's no_weight_decay() names, and --layer_decay scales each
layer's lr (ViT/ConvNeXt fine-tuning). cosine and step are timm's schedulers (--min_lr, --warmup_lr).
Schedulers are stepped once per optimizer step, except `plateau`, once per epoch on the monitored metric.
"""

import adamp
import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, StepLRScheduler

from optim.sam import SAM, frozen_norm_stats
from utils.registry import Registry

__all__ = ["OPTIMIZERS", "SCHEDULERS", "SAM", "build_optimizer", "build_scheduler", "frozen_norm_stats", "is_per_epoch",
           "optimizer_kwargs", "scheduler_kwargs"]

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")


def optimizer_kwargs(cfg) -> dict:
    return dict(lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, layer_decay=cfg.layer_decay)


MAX_WARMUP_SHARE = 0.2  # of the run: --epochs 1 with the default 1-epoch warm-up would train the whole run warming up


def scheduler_kwargs(cfg, steps_per_epoch: int) -> dict:
    """The schedule's arguments; the warm-up at most MAX_WARMUP_SHARE of the run (said when it is cut; onecycle's
    rising share is its own choice)."""
    warmup = cfg.warmup_epochs if cfg.scheduler == "onecycle" else min(cfg.warmup_epochs, MAX_WARMUP_SHARE * cfg.epochs)
    if warmup < cfg.warmup_epochs:
        print(f"note: warm-up cut to {warmup:g} of {cfg.epochs} epochs (--warmup_epochs {cfg.warmup_epochs:g} would be "
              f"more than {MAX_WARMUP_SHARE:.0%} of the run)")
    return dict(epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup,
                warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_size=cfg.step_size, gamma=cfg.gamma,
                plateau_patience=cfg.plateau_patience, maximize=cfg.maximize)


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 0.0) -> list[dict]:
    """timm's parameter groups: no decay on 1-d parameters and the model's no_weight_decay() names; with
    layer_decay in (0, 1), one group per layer depth, lr scaled by layer_decay ** (depth from the top)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay:
        return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def build_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float, momentum: float = 0.9,
                    layer_decay: float = 0.0):
    if name not in OPTIMIZERS:
        OPTIMIZERS.build(name)  # the error that lists the known names
    optimizer = OPTIMIZERS[name](model, lr=lr, weight_decay=weight_decay, momentum=momentum, layer_decay=layer_decay)
    for group in optimizer.param_groups:  # a layer's lr scale becomes its own lr, which every schedule scales alike
        group["lr"] *= group.pop("lr_scale", 1.0)
    return optimizer


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, **kw):
    return SCHEDULERS.build(name, optimizer, **kw)


def is_per_epoch(scheduler) -> bool:
    """True for schedulers stepped once per epoch with the monitored metric (plateau)."""
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


# ----------------------------------------------------------------------------- optimizers
def _timm(name: str, doc: str, opt: str | None = None):
    """A menu name built by timm's create_optimizer_v2 (its parameter groups, layer decay, no_weight_decay())."""
    def build(model, lr, weight_decay, momentum=0.9, layer_decay=0.0, **_):
        timm_opt = opt(momentum) if callable(opt) else opt or name
        return create_optimizer_v2(model, opt=timm_opt, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                   layer_decay=layer_decay or None)
    build.__doc__ = doc
    OPTIMIZERS.register(name)(build)


_timm("sgd", "SGD with Nesterov momentum (--momentum; 0 = plain SGD); the classic for CNNs with a long schedule",
      opt=lambda momentum: "sgd" if momentum > 0 else "momentum")
_timm("adam", "Adam; weight decay as an L2 term in the gradient")
_timm("adamw", "AdamW: Adam with decoupled weight decay; the safe default")
_timm("lamb", "LAMB (timm): layer-wise adaptive Adam, for large batches")
_timm("lion", "Lion (timm): sign-momentum; use a 3-10x smaller lr and larger weight decay than AdamW")
_timm("radam", "RAdam (timm): Adam with a rectified warm-up of the adaptive term")
_timm("adan", "Adan (timm): Nesterov-accelerated adaptive momentum")


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
def adamp_(model, lr, weight_decay, layer_decay=0.0, **_):
    """AdamP (Heo et al. 2021, adamp package): removes the radial update on scale-invariant weights."""
    return AdamP(param_groups(model, weight_decay, layer_decay), lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("sgdp")
def sgdp(model, lr, weight_decay, momentum, layer_decay=0.0, **_):
    """SGDP (adamp package): SGD with Nesterov momentum and AdamP's projection."""
    return SGDP(param_groups(model, weight_decay, layer_decay), lr=lr, momentum=momentum, nesterov=momentum > 0,
                weight_decay=weight_decay)


# ----------------------------------------------------------------------------- schedulers
class PerStep:
    """A timm scheduler stepped once per optimizer step (its step_update), behind torch's step() and
    state_dict(): the lr is a function of the step count alone, so resuming restores it exactly."""

    def __init__(self, scheduler):
        self.scheduler, self.updates = scheduler, 0

    def step(self) -> None:
        self.updates += 1
        self.scheduler.step_update(self.updates)

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.scheduler.step_update(self.updates)


@SCHEDULERS.register("cosine")
def cosine(optimizer, epochs, steps_per_epoch, warmup_epochs=0.0, warmup_lr=0.0, min_lr=0.0, **_):
    """timm's cosine: a linear warm-up from --warmup_lr over --warmup_epochs, then cosine decay to --min_lr at the
    last step."""
    total, warm = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    return PerStep(CosineLRScheduler(optimizer, t_initial=max(1, total - warm), lr_min=min_lr, warmup_t=warm,
                                     warmup_lr_init=warmup_lr, warmup_prefix=True, t_in_epochs=False))


@SCHEDULERS.register("step")
def step(optimizer, steps_per_epoch, step_size=5, gamma=0.1, warmup_epochs=0.0, warmup_lr=0.0, **_):
    """timm's step: multiply the lr by --gamma every --step_size epochs (after the warm-up from --warmup_lr)."""
    return PerStep(StepLRScheduler(optimizer, decay_t=step_size * steps_per_epoch, decay_rate=gamma,
                                   warmup_t=round(warmup_epochs * steps_per_epoch), warmup_lr_init=warmup_lr,
                                   warmup_prefix=True, t_in_epochs=False))


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
def constant(optimizer, steps_per_epoch=1, warmup_epochs=0.0, warmup_lr=0.0, **_):
    """Constant lr (after the warm-up from --warmup_lr)."""
    return PerStep(StepLRScheduler(optimizer, decay_t=1, decay_rate=1.0,
                                   warmup_t=round(warmup_epochs * steps_per_epoch), warmup_lr_init=warmup_lr,
                                   warmup_prefix=True, t_in_epochs=False))
