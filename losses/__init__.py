"""Loss registry: one string in the config picks the loss. Usage: loss_fn = build_loss("ce")

Losses are called on fp32 logits (train.py casts), so they stay exact under AMP.
"""
import torch.nn as nn

LOSSES = {}


def register(name):
    def add(fn):
        assert name not in LOSSES, f"loss {name!r} registered twice"
        LOSSES[name] = fn
        return fn
    return add


def build_loss(name: str, **kw) -> nn.Module:
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
    return LOSSES[name](**kw)


@register("ce")
def cross_entropy(**_) -> nn.Module:
    return nn.CrossEntropyLoss()
