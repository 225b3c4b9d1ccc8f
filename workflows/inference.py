"""Class probabilities of a model over a loader, with test-time augmentation: validation, test prediction,
predict.py and ensemble members alike.

Usage: probs = predict_probs(model, loader, device, amp_dtype, tta="flip")
"""
import numpy as np
import torch
from tqdm import tqdm

from datasets.transforms import TTA
from utils.device import to_input
from utils.stop import check_stop


@torch.no_grad()
def predict_probs(model, loader, device, amp_dtype=None, tta: str = "none", phase: str = "prediction") -> np.ndarray:
    """Class probabilities, averaged over the TTA views of each batch. A stop (utils/stop.py) ends it between
    batches, named by `phase`."""
    model.eval()
    views, out = TTA.build(tta), []
    for images, _, _ in tqdm(loader, desc=phase, leave=False, disable=None):
        check_stop(phase)
        x = to_input(images, device)
        probs = 0
        for view in views:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                probs = probs + model(view(x)).float().softmax(1)
        out.append((probs / len(views)).cpu())
    return torch.cat(out).numpy()
