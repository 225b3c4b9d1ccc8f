"""Albumentations pipelines. Usage: train_tf = AUGS["light"](img_size, mean, std); eval_tf = eval_transform(...)

Every pipeline ends with resize to img_size x img_size, normalization with the model's mean/std
(0-1 pixel scale) and conversion to a CHW float tensor.
"""
import albumentations as A
from albumentations.pytorch import ToTensorV2

from utils.registry import Registry

AUGS = Registry("augmentation preset")


def _finish(img_size, mean, std):
    return [A.Resize(img_size, img_size), A.Normalize(mean=mean, std=std), ToTensorV2()]


def eval_transform(img_size: int, mean, std) -> A.Compose:
    return A.Compose(_finish(img_size, mean, std))


@AUGS.register("none")
def no_aug(img_size, mean, std) -> A.Compose:
    return eval_transform(img_size, mean, std)


@AUGS.register("light")
def light(img_size, mean, std) -> A.Compose:
    """Small geometric jitter and mild photometric noise: safe for digits, documents and photos alike."""
    return A.Compose([
        A.Resize(img_size, img_size),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-12, 12), p=0.7),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.5),
        A.GaussNoise(std_range=(0.02, 0.1), p=0.3),
        A.GaussianBlur(blur_limit=(3, 5), p=0.2),
        *_finish(img_size, mean, std),
    ])
