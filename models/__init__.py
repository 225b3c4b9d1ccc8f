"""Models: any timm architecture by name. Usage: model = build_model("resnet18", num_classes=10)

Nothing is downloaded unless pretrained=True; pretrained_path loads a local weight file instead
(a timm/PyTorch state dict or a sweepcls checkpoint); layers whose shape differs, typically the
classifier of an ImageNet file, keep their fresh initialization.
adapt_batchnorm(model, loader) (--test_bn adapt) re-estimates BatchNorm statistics on unlabelled test images;
batchnorm_layers(model) are the layers it re-estimates (--test_bn auto adapts only a model that has some).
find_pretrained(name) (--pretrained auto) looks for a model's weights on this machine first, then on the
Hugging Face hub within a bounded time, and never hangs.
"""
import difflib
import os
import socket
import threading
from pathlib import Path

import timm
import torch
import torch.nn as nn

from utils import UserError
from utils.stop import check_stop


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
        raise UserError(f"model {name!r} does not take these options ({e}); "
                        f"leave --drop_rate/--drop_path_rate at 0") from None
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


MIN_FIT = 0.5  # of a model's tensors a --pretrained_path file must fill (name and shape), or it is refused


def load_weights(model: nn.Module, path: str) -> None:
    """Copy every tensor of the file whose name and shape match; the rest keeps its initialization. A file that
    fills less than MIN_FIT of the model (another architecture's weights) is refused, not trained on."""
    if not os.path.isfile(path):
        raise UserError(f"--pretrained_path {path}: no such file")
    state = timm.models.load_state_dict(path, weights_only=True)
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(kept) < MIN_FIT * len(own):  # a head for other classes does not fit: the rest must
        raise UserError(f"--pretrained_path {path}: {len(kept)} of this model's {len(own)} tensors "
                        f"({len(kept) / max(1, len(own)):.0%}) fit it; is it a weight file of another architecture? "
                        f"Pass weights of the same --model")
    fresh = model.load_state_dict(kept, strict=False).missing_keys
    print(f"loaded {len(kept)}/{len(own)} tensors from {path}" + (f"; freshly initialized: {fresh}" if fresh else ""))


def normalization(model: nn.Module) -> tuple[list[float], list[float]]:
    """The mean and std (0-1 pixel scale) the model expects, from its timm data config."""
    data_cfg = timm.data.resolve_model_data_config(model)
    return [float(m) for m in data_cfg["mean"]], [float(s) for s in data_cfg["std"]]


DEFAULT_MODEL = "resnet18"  # --model auto for a data folder
DEMO_MODEL = "resnet10t"    # --model auto for the digits demo
MIN_AUTO_SIZE = 64          # px: --img_size auto never goes below (stride-32 backbones need room)
PRETRAINED_TIMEOUT = 90.0  # s: the most --pretrained auto waits for a download before training from scratch


def weights_dir() -> Path:
    """Where --pretrained auto looks first: $SWEEPCLS_WEIGHTS_DIR or ~/.cache/sweepcls/weights, holding
    <model>.safetensors / .pth / .bin (copy them there on a server without internet)."""
    return Path(os.environ.get("SWEEPCLS_WEIGHTS_DIR") or Path.home() / ".cache" / "sweepcls" / "weights")


def pretrained_input_size(name: str) -> int:
    """The side the model's pretrained weights were trained at (224 where timm does not say)."""
    cfg = timm.get_pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224


def _hub_file(name: str) -> str | None:
    """The model's weight file in the local Hugging Face cache, if it is there (no network)."""
    from huggingface_hub import try_to_load_from_cache
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    names = ("model.safetensors", cfg.hf_hub_filename or "pytorch_model.bin", "pytorch_model.bin")
    for filename in dict.fromkeys(names):
        found = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def find_pretrained(name: str, timeout: float = PRETRAINED_TIMEOUT) -> tuple[str, str]:
    """(local weight file or '', one line saying where it came from or why there is none): weights_dir(), then the
    Hugging Face cache, then a download into that cache if the hub answers within `timeout` seconds."""
    for ext in (".safetensors", ".pth", ".bin"):
        path = weights_dir() / f"{name}{ext}"
        if path.is_file():
            return str(path), f"pretrained weights from {path}"
    cached = _hub_file(name)
    if cached:
        return cached, f"pretrained weights from the local Hugging Face cache ({cached})"
    if timm.get_pretrained_cfg(name) is None:
        return "", f"{name} has no pretrained weights in timm; training from random initialization"
    if not _hub_reachable():
        return "", (f"no {name} weights in {weights_dir()} or the Hugging Face cache, and the hub cannot be reached; "
                     f"training from random initialization")
    done = {}

    def fetch():
        try:
            timm.create_model(name, pretrained=True, num_classes=0)  # downloads into the Hugging Face cache
        except Exception as e:  # noqa: BLE001 - any download or hub error means: no weights
            done["error"] = e
    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(timeout)
    cached = _hub_file(name)
    if cached:
        return cached, f"pretrained weights downloaded to {cached}"
    why = f"({str(done['error']).splitlines()[0][:120]})" if "error" in done else f"(not within {timeout:.0f}s)"
    return "", f"{name} pretrained weights could not be fetched {why}; training from random initialization"


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The layers --test_bn adapt re-estimates: every BatchNorm (timm's BatchNormAct2d and SyncBatchNorm included)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, loader, device: torch.device) -> int:
    """Test-time adaptation to covariate shift (Schneider et al. 2020): every BatchNorm layer's running mean and
    variance replaced by their average over the loader's images (unlabelled test images), the weights untouched.
    Returns the number of BatchNorm layers (0: nothing to adapt, the model is unchanged)."""
    norms = batchnorm_layers(model)
    if not norms:
        return 0
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches
        m.train()
    for images, *_ in loader:
        check_stop("test-time BatchNorm adaptation")
        model(images.to(device, non_blocking=True))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return len(norms)


def adapt_test_bn(model: nn.Module, loader, device: torch.device, name: str) -> None:
    """--test_bn adapt: adapt_batchnorm, or one line saying the model has none."""
    if not adapt_batchnorm(model, loader, device):
        print(f"--test_bn adapt: {name} has no BatchNorm layers; predicting as trained")
