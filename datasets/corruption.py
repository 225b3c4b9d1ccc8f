"""The test set's measured corruption (datasets/shift.py settings) applied: the noisy validation images, corrupted
as the test images were (on the image as stored, in its own units), the same way in every epoch, fold and trial;
and the floor that covers what the measure may have missed.

Usage:
    val_images = noisy_copies(items, ids, settings, img_size)           # training and ensemble.py's validation
    noisy = corrupt(image, settings, seed=image_seed(sample_id))        # one image, the same corruption every time
    settings = with_floor(settings, cfg.aug_floor)                      # --aug_floor
"""
import zlib

import albumentations as A
import numpy as np

from datasets.files import load_image
from datasets.transforms import matched_ops, seed_pipeline
from utils.stop import check_stop


def image_seed(sample_id: str) -> int:
    """A seed from the image's id alone: the same corruption in every epoch, fold and sweep trial."""
    return zlib.crc32(str(sample_id).encode())


def corrupter(settings: dict, shared_draws: bool = False):
    """apply(image, seed): the measured corruption, built once, applied deterministically per seed, each operation
    drawing on its own (seed_pipeline). shared_draws: every operation from a generator of that same seed, as
    albumentations' set_random_seed seeds them: how the shift measure simulates the corruption it fits, the draws
    its thresholds were calibrated on (independent draws misread the shares of small rotations and a blur under
    noise: docs/noisy-test.md, seventh and eighth passes)."""
    tf = A.Compose(matched_ops(settings, 1.0))

    def apply(rgb: np.ndarray, seed: int) -> np.ndarray:
        if shared_draws:
            tf.set_random_seed(seed)
        else:
            seed_pipeline(tf, seed)
        return tf(image=rgb)["image"]
    return apply


def corrupt(rgb: np.ndarray, settings: dict, seed: int) -> np.ndarray:
    """The measured corruption applied once to an image, deterministically (noisy validation)."""
    return corrupter(settings)(rgb, seed)


FLOOR = {"tint": 20, "brightness": 0.1, "contrast": 0.2, "blur": 1.0, "noise": 0.05, "jpeg": 50}  # middle magnitudes
# (training units) of the photometric operations a test set often has and a measure can miss: blur under noise, JPEG


def with_floor(settings: dict | None, floor: float) -> dict | None:
    """The settings with every photometric operation the measure left off drawn for a share `floor` of the images at
    a middle magnitude (FLOOR), when the test set was measured shifted at all: cover what the measure may have
    missed. Turns, flips and rotations are left as measured (a wrong pose can change a class)."""
    if not floor or not any_on(settings):
        return settings
    return {**settings, **{op: {"p": floor, "magnitude": m} for op, m in FLOOR.items() if not settings[op]["p"]}}


def any_on(settings: dict | None) -> bool:
    return bool(settings) and any(v["p"] for k, v in settings.items() if isinstance(v, dict))


def noisy_copies(images: list, ids: list, settings: dict, side: int) -> list[np.ndarray]:
    """Each image as stored with the measured corruption, seeded by its id (noisy validation): corrupted where the test
    images were, before the resize to the training side, with the settings in the image's own units (stored_units):
    JPEG's blocks and noise's grain at the stored resolution, as the test set has them."""
    appliers = {}

    def one(img, sample_id):
        check_stop("making the noisy validation images")
        image = load_image(img)
        k = round(max(image.shape[:2]) / side, 2)
        if k not in appliers:
            appliers[k] = corrupter(stored_units(settings, k))
        return appliers[k](image, image_seed(sample_id))
    return [one(img, i) for img, i in zip(images, ids)]


def stored_units(settings: dict, k: float) -> dict:
    """The settings (in the training augmentation's units, after the resize) for an image stored at k times the
    training side: the inverse of training_units. A blur's sigma and a downscale's factor times k (a factor under
    1.25 is off), noise at its stored strength, drawn pixel by pixel (noise_scale 1)."""
    out = {**settings, "noise_scale": 1.0}
    for op in ("blur", "downscale"):
        if settings.get(op, {}).get("p"):
            magnitude = settings[op]["magnitude"] * k
            off = op == "downscale" and magnitude < 1.25
            out[op] = {"p": 0.0, "magnitude": 0.0} if off else {**settings[op], "magnitude": magnitude}
    if settings.get("noise", {}).get("p"):
        out["noise"] = {**settings["noise"], "magnitude": settings["noise"]["magnitude"] * max(1.0, k)}
    return out
