"""SAM (Foret et al. 2021) and ASAM (Kwon et al. 2021) around any optimizer, safe under AMP.

Usage (one optimizer step; train.py does exactly this):
    loss(w).backward()                      # pass 1: gradients at w (all accumulation micro-batches)
    if sam.perturb(grad_scale):             # w <- w + e(w), e = rho * T^2 g / ||T g||, T = |w| for ASAM
        optimizer.zero_grad()
        with frozen_norm_stats(model):
            loss(w + e).backward()          # pass 2: the sharpness-aware gradient
        sam.restore()                       # w back, bit for bit
    scaler.unscale_(optimizer); clip; scaler.step(optimizer); scaler.update()

SAM here is not an Optimizer subclass with a closure: both passes stay in the training loop, so
GradScaler sees one ordinary step (unscale_ once, inf checks, skipped steps), gradient
accumulation repeats the same micro-batches in pass 2 and clipping applies to pass-2 gradients.
Pass-1 gradients are still scaled by GradScaler: `grad_scale` divides them back out, and a
non-finite norm (an fp16 overflow) skips the perturbation, so the scaler skips the step as usual.
"""
import contextlib

import torch


class SAM:
    def __init__(self, optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12):
        if rho <= 0:
            raise ValueError(f"SAM rho must be > 0, got {rho}")
        self.optimizer, self.rho, self.adaptive, self.eps = optimizer, rho, adaptive, eps
        self._backup: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def perturb(self, grad_scale: float = 1.0) -> bool:
        """Move to w + e(w) using the current gradients; False (and no move) if they are not finite."""
        params = self._params()
        if not params:
            return False
        scaled = [(p.abs() * p.grad if self.adaptive else p.grad) for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s.float()) for s in scaled])) / grad_scale
        if not torch.isfinite(norm):
            return False
        factor = self.rho / (norm + self.eps) / grad_scale
        self._backup = [(p, p.detach().clone()) for p in params]
        for p in params:
            e = (p * p * p.grad if self.adaptive else p.grad) * factor
            p.add_(e.to(p.dtype))
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by perturb() exactly (copy, not subtract: no rounding drift)."""
        for p, w in self._backup:
            p.copy_(w)
        self._backup = []


@contextlib.contextmanager
def frozen_norm_stats(model: torch.nn.Module):
    """BatchNorm running statistics are left untouched by SAM's second forward pass."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.momentum]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
