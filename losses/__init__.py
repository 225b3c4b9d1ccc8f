"""Loss registry: one string in the config picks the loss. Usage: loss_fn = build_loss("ce")

Losses are called on fp32 logits (train.py casts), so they stay exact under AMP.
"""
import torch.nn as nn

from utils.registry import Registry

LOSSES = Registry("loss")


def build_loss(name: str, **kw) -> nn.Module:
    return LOSSES.build(name, **kw)


@LOSSES.register("ce")
def cross_entropy(**_) -> nn.Module:
    return nn.CrossEntropyLoss()
