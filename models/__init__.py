"""Models: any timm architecture by name. Usage: model = build_model("resnet18", num_classes=10)

Nothing is downloaded unless pretrained=True; pretrained_path loads a local weight file instead
(timm drops the classifier when its class count differs).
"""
import difflib
import os

import timm
import torch.nn as nn

from utils import UserError


def build_model(name: str, num_classes: int, pretrained: bool = False, pretrained_path: str = "") -> nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise UserError(f"unknown model {name!r}; close timm names: {close or 'none'} (see timm.list_models())")
    kwargs = {}
    if pretrained_path and not os.path.isfile(pretrained_path):
        raise UserError(f"--pretrained_path {pretrained_path}: no such file")
    if pretrained_path:
        kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=pretrained_path))
    elif pretrained:
        kwargs = dict(pretrained=True)
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def normalization(model: nn.Module) -> tuple[list[float], list[float]]:
    """The mean and std (0-1 pixel scale) the model expects, from its timm data config."""
    data_cfg = timm.data.resolve_model_data_config(model)
    return [float(m) for m in data_cfg["mean"]], [float(s) for s in data_cfg["std"]]
