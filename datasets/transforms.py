"""Albumentations presets scaled by one strength, and test-time augmentation (TTA) views.

Usage:
    train_tf = AUGS["test_noise"](img_size, strength, mean, std)   # strength in [0, 1]
    eval_tf = eval_transform(img_size, mean, std)
    probs = mean over view in TTA["d4"] of softmax(model(view(batch)))
    candidate = tta_for_shift(shift["settings"])                   # --tta auto: d4, rot4, flip or none
    train_tf = with_augmix(train_tf, 0.5)                          # --augmix: AugMix before the preset's ops
`strength` scales every probability and magnitude of a preset: 0 is exactly eval_transform
(resize + normalize), 1 is the preset at full force. Every pipeline ends with resize to
img_size x img_size, normalization with the model's mean/std (0-1 pixel scale) and a CHW tensor.
"""
import random
import zlib

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from timm.data.auto_augment import augment_and_mix_transform

from utils.registry import Registry

AUGS = Registry("augmentation preset")
TTA = Registry("tta")


def seed_pipeline(tf: A.BaseCompose, seed: int) -> None:
    """Seed a pipeline for one image: each operation its own generator, from the image's seed and the operation's
    place by name (its kind and how many of that kind come before it, nested under its OneOf). The operations draw
    independently of each other (albumentations' own set_random_seed gives every operation a generator of that same
    seed: operations of the same probability were then applied to an image all together or not at all), and an
    operation draws the same numbers for an image whatever other operations the pipeline has (one operation more
    leaves the others' draws as they were)."""
    tf.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def visit(node: A.BaseCompose, path: str) -> None:
        seen: dict[str, int] = {}
        for t in node.transforms:
            name = type(t).__name__
            seen[name] = seen.get(name, 0) + 1
            key = f"{path}/{name}{seen[name]}"
            sequence = np.random.SeedSequence([seed, zlib.crc32(key.encode())])
            t.set_random_state(np.random.default_rng(sequence), random.Random(int(sequence.generate_state(1)[0])))
            if isinstance(t, A.BaseCompose):
                visit(t, key)
    visit(tf, "")


def _finish(img_size, mean, std):
    return [A.Resize(img_size, img_size), A.Normalize(mean=mean, std=std), ToTensorV2()]


def eval_transform(img_size: int, mean, std) -> A.Compose:
    return A.Compose(_finish(img_size, mean, std))


def _preset(fn):
    """strength 0 -> eval_transform exactly; else the preset's ops between the resize and the normalization."""
    def build(img_size, strength, mean, std):
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"aug_strength must be in [0, 1], got {strength}")
        if strength == 0:
            return eval_transform(img_size, mean, std)
        return A.Compose([A.Resize(img_size, img_size), *fn(strength), *_finish(img_size, mean, std)[1:]])
    build.__doc__ = fn.__doc__
    return build


@AUGS.register("none")
def no_aug(img_size, strength, mean, std) -> A.Compose:
    """No augmentation: resize and normalize (strength is ignored)."""
    return eval_transform(img_size, mean, std)


@AUGS.register("light")
@_preset
def light(s):
    """Small geometric jitter and mild photometric noise: safe for digits, documents and photos alike."""
    return [
        A.Affine(scale=(1 - 0.12 * s, 1 + 0.12 * s), translate_percent=(-0.08 * s, 0.08 * s),
                 rotate=(-15 * s, 15 * s), p=s),
        A.ColorJitter(brightness=0.3 * s, contrast=0.3 * s, saturation=0.3 * s, hue=0.05 * s, p=0.7 * s),
        A.GaussNoise(std_range=(0.02 * s, 0.15 * s), p=0.5 * s),
        A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.1, 0.1 + 2.9 * s), p=0.3 * s),
    ]


@AUGS.register("test_noise")
@_preset
def test_noise(s):
    """Imitates a noisy test set: rotation by any angle, flips, strong Gaussian noise, colour shift,
    blur, JPEG artefacts. At full force every image is rotated; the rest stacks at random."""
    return [
        A.Rotate(limit=(-180 * s, 180 * s), border_mode=cv2.BORDER_CONSTANT, fill=0, p=s),
        A.HorizontalFlip(p=0.5 * s),
        A.VerticalFlip(p=0.5 * s),
        A.RGBShift(r_shift_limit=40 * s, g_shift_limit=40 * s, b_shift_limit=40 * s, p=0.6 * s),
        A.RandomBrightnessContrast(brightness_limit=0.3 * s, contrast_limit=0.3 * s, p=0.5 * s),
        A.GaussianBlur(sigma_limit=(0.1, 0.1 + 1.9 * s), p=0.5 * s),
        A.GaussNoise(std_range=(0.05 * s, 0.3 * s), p=0.8 * s),
        A.ImageCompression(quality_range=(round(100 - 85 * s), round(100 - 30 * s)), p=0.5 * s),
    ]


BORDERS = {"black": {"border_mode": cv2.BORDER_CONSTANT, "fill": 0},  # a rotation's corners (shift.FILLS)
           "white": {"border_mode": cv2.BORDER_CONSTANT, "fill": 255},
           "edge": {"border_mode": cv2.BORDER_REPLICATE}}


def matched_ops(settings: dict, scale: float) -> list:
    """The test set's measured corruption (datasets/shift.py settings) as albumentations operations, each
    probability and magnitude times `scale` (probabilities capped at 1): turns, flips, small rotation, downscale,
    tint, brightness/contrast, blur, Gaussian noise, JPEG, in the order a camera, a scanner and an upload add them. A
    magnitude m is the strongest an image gets; brightness, contrast, blur and JPEG draw from [m / 2, m] (noise from
    [m / 4, m], a downscale's factor from [1 + (m - 1) / 2, m]), rotations and tint from [0, m]: as the measure
    simulates them when it fits m and the share."""
    p = lambda op: min(1.0, settings.get(op, {}).get("p", 0.0) * scale)  # older checkpoints lack newer operations
    m = lambda op: settings.get(op, {}).get("magnitude", 0.0) * scale
    ops = []
    if p("turn"):
        ops.append(A.RandomRotate90(p=p("turn")))
    if p("flip"):
        ops.append(A.HorizontalFlip(p=min(0.5, p("flip"))))
    if p("rotate"):
        ops.append(A.Rotate(limit=(-m("rotate"), m("rotate")), p=p("rotate"),
                            **BORDERS[settings["rotate"].get("fill", "black")]))  # the corners the test set has
    if p("downscale"):  # shrunk by a factor of 1 + (m - 1) / 2 to m, stretched back: a low-resolution upload
        factor = 1 + (settings["downscale"]["magnitude"] - 1) * min(1.0, scale)
        ops.append(A.Downscale(scale_range=(1 / factor, 1 / (1 + (factor - 1) / 2)), p=p("downscale"),
                               interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}))
    if p("tint"):
        ops.append(A.RGBShift(r_shift_limit=m("tint"), g_shift_limit=m("tint"), b_shift_limit=m("tint"), p=p("tint")))
    if p("brightness"):  # a shift of m / 2 to m, up or down
        ops.append(_either_way(lambda lo, hi: A.RandomBrightnessContrast(brightness_limit=(lo, hi), contrast_limit=0,
                                                                        p=1.0), m("brightness"), p("brightness")))
    if p("contrast"):  # about the image's mean grey (RandomBrightnessContrast's contrast scales about 0: darker too)
        ops.append(_either_way(lambda lo, hi: A.ColorJitter(brightness=0, contrast=(1 + lo, 1 + hi), saturation=0,
                                                            hue=0, p=1.0), min(0.95, m("contrast")), p("contrast")))
    if p("blur"):
        ops.append(A.GaussianBlur(sigma_limit=(max(0.3, m("blur") / 2), max(0.3, m("blur"))), p=p("blur")))
    if p("noise"):
        ops.append(A.GaussNoise(std_range=(m("noise") / 4, min(1.0, m("noise"))), p=p("noise"),
                                noise_scale_factor=settings.get("noise_scale", 1.0)))  # at the test's native resolution
    if p("jpeg"):  # the upload's compression comes last; magnitude = 100 - the lowest quality
        worst, best = max(1, round(100 - m("jpeg"))), max(1, round(100 - m("jpeg") / 2))
        ops.append(A.ImageCompression(quality_range=(worst, best), p=p("jpeg")))
    return ops


def _either_way(make, m: float, p: float):
    """make(lo, hi) with a strength drawn from [m / 2, m] or from [-m, -m / 2], each half the time, for a share p
    of the images: a corrupted image is corrupted by at least half the magnitude, as the measure (datasets/shift.py)
    simulates and reads it: the share it measures is the share visibly corrupted, not one diluted by near-zero
    strengths."""
    return A.OneOf([make(m / 2, m), make(-m, -m / 2)], p=p)


class AugMix(A.ImageOnlyTransform):
    """AugMix (Hendrycks et al. 2020) by timm's augment_and_mix_transform: a mix of 3 chains of 1-3 random PIL
    operations (rotate, shear, translate, posterize, solarize, equalize, autocontrast...) blended with the image.
    It adds none of the test-set corruptions itself; it widens what the model has seen around them."""

    def __init__(self, magnitude: int = 3, width: int = 3, p: float = 0.5):
        super().__init__(p=p)
        self.magnitude, self.width = magnitude, width
        self.augmix = augment_and_mix_transform(f"augmix-m{magnitude}-w{width}", {"img_mean": (128, 128, 128)})

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        """timm draws from the global numpy and random generators: seeded here from the pipeline's own (which the
        dataset seeds per sample), so a sample's AugMix is the same whatever the loader workers, then put back."""
        seed = int(self.random_generator.integers(2**32))
        states = np.random.get_state(), random.getstate()
        np.random.seed(seed)
        random.seed(seed)
        try:
            return np.asarray(self.augmix(Image.fromarray(img)))
        finally:
            np.random.set_state(states[0])
            random.setstate(states[1])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("magnitude", "width")


def with_augmix(tf: A.Compose, p: float) -> A.Compose:
    """The pipeline with AugMix applied to a share p of the images right after the resize, before the preset's own
    operations (the measured corruptions land on the mixed image, as they land on a test image); p 0: as it was."""
    if not p:
        return tf
    first, *rest = tf.transforms
    return A.Compose([first, AugMix(p=p), *rest])


@AUGS.register("auto")
def auto(img_size, strength, mean, std, settings: dict | None = None) -> A.Compose:
    """Test-matched: every operation the test set shows (turns, flips, rotation, noise, blur, tint,
    brightness/contrast), with the probability and magnitude measured on it (datasets/shift.py), plus the
    small scale/shift jitter of `light`. aug_strength 1 (the default) applies them as measured, lower values
    scale every probability and magnitude down. The default whenever the data has a test set; without one, `light`."""
    if settings is None:
        return AUGS["light"](img_size, strength, mean, std)

    def ops(s):  # s = 1: the measured probabilities and magnitudes
        jitter = A.Affine(scale=(1 - 0.1 * s, 1 + 0.1 * s), translate_percent=(-0.06 * s, 0.06 * s),
                          p=min(1.0, 0.8 * s), **BORDERS[settings.get("rotate", {}).get("fill", "edge")])  # no
        # black frame on white paper: the corners the test's rotations have, else the border pixels repeated
        return [jitter, *matched_ops(settings, s)]
    return _preset(ops)(img_size, strength, mean, std)


# ----------------------------------------------------------------------------- TTA: views of an NCHW batch
def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _hflip(x):
    return x.flip(-1)


def _rotations(x, k):
    return torch.rot90(x, k, dims=(-2, -1))


@TTA.register("none")
def tta_none():
    """The image as is."""
    return [_identity]


@TTA.register("flip")
def tta_flip():
    """The image and its horizontal mirror (2 views)."""
    return [_identity, _hflip]


@TTA.register("rot4")
def tta_rot4():
    """The four right-angle rotations (4 views): for test sets rotated at random."""
    return [lambda x, k=k: _rotations(x, k) for k in range(4)]


@TTA.register("d4")
def tta_d4():
    """All eight rotations and mirrors of the square (8 views): rotated and flipped test sets."""
    return [lambda x, k=k, f=f: _rotations(_hflip(x) if f else x, k) for f in (0, 1) for k in range(4)]


def tta_for_shift(settings: dict | None) -> str:
    """The views the test set's measured right-angle turns and mirrors make plausible (both: d4, turns: rot4,
    mirrors: flip, neither: none), checked at the end of training on the validation images with the best checkpoint
    and kept unless they lower macro-F1 beyond chance; predict.py and ensemble.py use what the run kept.

    settings: datasets/shift.py's (p of `turn` and `flip`); None (nothing measured) gives none."""
    turned, mirrored = (bool(settings and settings.get(op, {}).get("p")) for op in ("turn", "flip"))
    return {(True, True): "d4", (True, False): "rot4", (False, True): "flip"}.get((turned, mirrored), "none")
