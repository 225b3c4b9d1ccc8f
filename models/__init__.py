"""Models: any timm architecture by name. Usage: model = build_model("resnet18", num_classes=10)

Nothing is downloaded unless pretrained=True; pretrained_path loads a local weight file instead
(a timm/PyTorch state dict or a sweepcls checkpoint); layers whose shape differs, typically the
classifier of an ImageNet file, keep their fresh initialization.
"""
import difflib
import os

import timm
import torch
import torch.nn as nn

from utils import UserError


def build_model(name: str, num_classes: int, pretrained: bool = False, pretrained_path: str = "",
                drop_rate: float = 0.0, drop_path_rate: float = 0.0, img_size: int | None = None) -> nn.Module:
    """drop_rate / drop_path_rate of 0 keep the model's own default (None is dropped by timm); img_size goes
    to the architectures that take one (None = their default)."""
    check_model_name(name)
    kwargs = dict(num_classes=num_classes, pretrained=pretrained and not pretrained_path,
                  drop_rate=drop_rate or None, drop_path_rate=drop_path_rate or None)
    try:
        try:  # architectures with a fixed grid (ViTs, EfficientFormerV2) are built for the input size
            model = timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            model = timm.create_model(name, **kwargs)
    except TypeError as e:
        raise UserError(f"model {name!r} does not take these options ({e}); leave --drop_rate/--drop_path_rate at 0") from None
    if pretrained_path:
        load_weights(model, pretrained_path)
    return model


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise UserError(f"unknown model {name!r}; close timm names: {close or 'none'} (see timm.list_models())")


def check_input_size(model: nn.Module, name: str, img_size: int) -> None:
    """One forward pass on a blank image, so a size the architecture cannot take fails now, clearly."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, device=next(model.parameters()).device))
    except (AssertionError, RuntimeError, ValueError) as e:
        raise UserError(f"model {name!r} cannot take --img_size {img_size} ({str(e).splitlines()[0][:160]}); "
                        f"try a multiple of 32, or the size it was designed for") from None
    finally:
        model.train(was_training)


def load_weights(model: nn.Module, path: str) -> None:
    """Copy every tensor of the file whose name and shape match; the rest keeps its initialization."""
    if not os.path.isfile(path):
        raise UserError(f"--pretrained_path {path}: no such file")
    state = timm.models.load_state_dict(path, weights_only=True)
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not kept:
        raise UserError(f"--pretrained_path {path}: none of its tensors fits this model; "
                        f"is it a weight file for the same architecture?")
    fresh = model.load_state_dict(kept, strict=False).missing_keys
    print(f"loaded {len(kept)}/{len(own)} tensors from {path}" + (f"; freshly initialized: {fresh}" if fresh else ""))


def normalization(model: nn.Module) -> tuple[list[float], list[float]]:
    """The mean and std (0-1 pixel scale) the model expects, from its timm data config."""
    data_cfg = timm.data.resolve_model_data_config(model)
    return [float(m) for m in data_cfg["mean"]], [float(s) for s in data_cfg["std"]]
