"""The bundled demo: scikit-learn's 1,797 handwritten digits (8x8, no download), upscaled to RGB.

A fixed, stratified 20% is held out as the test set and gets the competition's kind of stacked
noise (small rotations, Gaussian noise, colour shift, blur; no flips or large turns, which change
what a digit means), so the demo shows the real problem: a clean train set, a noisy test set.
Usage: data = load_digits_data()
       python -m datasets.digits --export /tmp/digits-jpg --size 256   # the same images as a folder of JPEGs
"""
import argparse
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from datasets import Data

SIZE = 64          # px, the stored resolution (the training transform resizes to img_size)
TEST_FRACTION = 0.2
TEST_SEED = 2024   # fixed: the test split and its noise are the same for every run, like a leaderboard's


def test_noise() -> A.Compose:
    return A.Compose([
        A.Affine(rotate=(-15, 15), scale=(0.9, 1.1), p=0.8),
        A.RGBShift(r_shift_limit=50, g_shift_limit=50, b_shift_limit=50, p=0.7),
        A.GaussianBlur(blur_limit=(3, 7), p=0.6),
        A.GaussNoise(std_range=(0.05, 0.2), p=0.8),
    ], seed=TEST_SEED)


def load_digits_data() -> Data:
    digits = load_digits()
    gray = (digits.images * (255 / 16)).astype(np.uint8)  # pixel values 0..16 -> 0..255
    images = np.stack([cv2.resize(g, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC) for g in gray])
    images = np.repeat(images[..., None], 3, axis=-1)     # N x SIZE x SIZE x 3, RGB
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, stratify=labels, random_state=TEST_SEED)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    noise = test_noise()
    classes = [str(d) for d in range(10)]
    return Data(
        classes=classes, targets=list(range(10)),
        items=list(images[train_idx]), labels=labels[train_idx], ids=[f"digit-{i:04d}" for i in train_idx],
        test_items=[noise(image=images[i])["image"] for i in test_idx], test_labels=labels[test_idx],
        test_ids=[f"digit-{i:04d}" for i in test_idx],
    )


def export(folder: Path, size: int, quality: int = 90) -> Path:
    """Write the demo as an ImageFolder of JPEG files (train/<class>/, labelled test/<class>/), size x size
    px: real files to decode, for the loader benchmark and for trying the folder layout."""
    data = load_digits_data()
    for split, items, labels, ids in [("train", data.items, data.labels, data.ids),
                                      ("test", data.test_items, data.test_labels, data.test_ids)]:
        for image, label, sample_id in zip(items, labels, ids):
            out = Path(folder) / split / data.classes[label] / f"{sample_id}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            big = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(out), cv2.cvtColor(big, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return Path(folder)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the digits demo as a folder of JPEG images.")
    parser.add_argument("--export", required=True, help="folder to write (train/<class>/*.jpg, test/<class>/*.jpg)")
    parser.add_argument("--size", type=int, default=256, help="side of each image in px")
    args = parser.parse_args()
    print(f"wrote {export(Path(args.export), args.size)}")
