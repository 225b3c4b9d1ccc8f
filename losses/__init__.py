"""Loss registry: one string in the config picks the loss.

Usage:
    loss_fn = build_loss("focal", **loss_kwargs(cfg, class_counts))
    loss = loss_fn(logits.float(), targets)   # targets: class indices, or (N, C) probabilities
Losses are called on fp32 logits (train.py casts), so they stay exact under AMP. A loss whose
`soft_targets` is True also takes the probability targets mixup/cutmix produce; the others refuse them.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import AsymmetricLossSingleLabel

from utils.registry import Registry

LOSSES = Registry("loss")
CLASS_WEIGHTS = ("inverse", "sqrt_inverse", "effective")


def build_loss(name: str, **kw) -> nn.Module:
    return LOSSES.build(name, **kw)


def soft_target_losses() -> list[str]:
    """Names of the losses that take (N, C) probability targets (mixup, cutmix)."""
    return sorted(name for name in LOSSES if build_loss(name, class_counts=[1, 1]).soft_targets)


def loss_kwargs(cfg, class_counts) -> dict:
    """The adapter from the flat config to the loss factories' explicit kwargs."""
    return dict(class_counts=class_counts, class_weights=cfg.class_weights, cb_beta=cfg.cb_beta,
                label_smoothing=cfg.label_smoothing, focal_gamma=cfg.focal_gamma, focal_alpha=cfg.focal_alpha,
                asl_gamma_pos=cfg.asl_gamma_pos, asl_gamma_neg=cfg.asl_gamma_neg)


def weights_for(counts, scheme: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """Per-class weights from training counts, scaled to average 1 (uniform counts give all ones).

    inverse: 1/n; sqrt_inverse: 1/sqrt(n); effective: (1 - beta) / (1 - beta^n), the inverse
    "effective number of samples" of Cui et al. 2019 (beta -> 0: uniform, beta -> 1: inverse).
    """
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    if scheme == "inverse":
        w = 1.0 / n
    elif scheme == "sqrt_inverse":
        w = 1.0 / np.sqrt(n)
    elif scheme == "effective":
        w = (1.0 - beta) / (1.0 - np.power(beta, n))
    else:
        raise KeyError(f"unknown class weighting {scheme!r}; known: {list(CLASS_WEIGHTS)}")
    return torch.tensor(w * len(w) / w.sum(), dtype=torch.float32)


def as_probabilities(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices -> one-hot rows; (N, C) probability targets pass through."""
    return target.float() if target.ndim == 2 else F.one_hot(target.long(), num_classes).float()


class CrossEntropy(nn.Module):
    """Cross entropy with optional class weights and label smoothing; hard or soft targets."""
    soft_targets = True

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits, target):
        if self.weight is not None and target.ndim == 2:
            # weighted mean over the batch, as F.cross_entropy does for class indices (it divides soft targets by N)
            t = target * self.weight
            return -(t * logits.log_softmax(1)).sum() / t.sum()
        return F.cross_entropy(logits, target, weight=self.weight, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017), softmax form: -sum_c alpha_c t_c (1 - p_c)^gamma log p_c, batch mean.

    gamma = 0 and no alpha is cross entropy. Works on soft targets (t = mixup's probabilities).
    """
    soft_targets = True

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", alpha)

    def forward(self, logits, target):
        log_p = logits.log_softmax(1)
        t = as_probabilities(target, logits.shape[1])
        if self.alpha is not None:
            t = t * self.alpha
        modulation = (1.0 - log_p.exp()).pow(self.gamma) if self.gamma else 1.0
        return -(t * modulation * log_p).sum(1).mean()


class AsymmetricLoss(AsymmetricLossSingleLabel):
    """timm's single-label asymmetric loss (Ridnik et al. 2021); its targets are class indices only."""
    soft_targets = False


class SoftF1Loss(nn.Module):
    """1 - macro-F1 computed on probabilities instead of hard predictions (differentiable), in [0, 1].

    Per class: tp = sum p*t, fp = sum p*(1-t), fn = sum (1-p)*t over the batch; F1 = 2tp / (2tp + fp + fn).
    Optimizes the leaderboard metric directly; batches should hold most classes (use a larger batch).
    """
    soft_targets = True

    def __init__(self, eps: float = 1e-7):
        super().__init__()
        self.eps = eps

    def forward(self, logits, target):
        p = logits.softmax(1)
        t = as_probabilities(target, logits.shape[1])
        tp = (p * t).sum(0)
        fp = (p * (1 - t)).sum(0)
        fn = ((1 - p) * t).sum(0)
        f1 = 2 * tp / (2 * tp + fp + fn + self.eps)
        return 1 - f1.mean()


@LOSSES.register("ce")
def cross_entropy(**_) -> nn.Module:
    """Plain cross entropy: the baseline."""
    return CrossEntropy()


@LOSSES.register("weighted_ce")
def weighted_ce(class_counts, class_weights: str = "inverse", cb_beta: float = 0.999, **_) -> nn.Module:
    """Cross entropy with per-class weights from the training counts (--class_weights)."""
    return CrossEntropy(weight=weights_for(class_counts, class_weights, cb_beta))


@LOSSES.register("label_smoothing")
def label_smoothing(label_smoothing: float = 0.1, **_) -> nn.Module:
    """Cross entropy against targets smoothed by --label_smoothing: calibrates, resists label noise."""
    return CrossEntropy(label_smoothing=label_smoothing)


@LOSSES.register("focal")
def focal(focal_gamma: float = 2.0, focal_alpha: bool = False, class_counts=None, class_weights: str = "inverse",
          cb_beta: float = 0.999, **_) -> nn.Module:
    """Focal loss: down-weights easy examples by (1 - p)^gamma; alpha from --class_weights if --focal_alpha."""
    alpha = weights_for(class_counts, class_weights, cb_beta) if focal_alpha else None
    return FocalLoss(focal_gamma, alpha)


@LOSSES.register("asl")
def asl(asl_gamma_pos: float = 1.0, asl_gamma_neg: float = 4.0, label_smoothing: float = 0.1, **_) -> nn.Module:
    """Asymmetric loss, single-label form (timm): focusing by gamma_neg on negatives, gamma_pos on the positive."""
    return AsymmetricLoss(gamma_pos=asl_gamma_pos, gamma_neg=asl_gamma_neg, eps=label_smoothing)


@LOSSES.register("soft_f1")
def soft_f1(**_) -> nn.Module:
    """1 - soft macro-F1: trains on the leaderboard metric itself."""
    return SoftF1Loss()
