"""The bundled demos, built from scikit-learn's 1,797 handwritten digits (8x8, no download), upscaled to RGB.

`digits`: a fixed, stratified 20% is held out as the test set and gets mild stacked noise (small
rotations, Gaussian noise, colour shift, blur): the demo, fast and nearly saturated.
`digits_hard`: the competition benchmark. A small, imbalanced, clean training set (8 classes, 17 to 80
images each) and a balanced test set about twice its size with the write-ups' noise stacked at random:
any right-angle turn, small rotations, flips, Gaussian noise, colour shift, brightness/contrast, blur,
JPEG. Digits that one of those turns or flips makes into another digit are left out (a half turn makes
a 6 a 9, a mirror makes a 5 a 2), so invariance to them is never wrong: the classes are 0-4, 6, 7, 8.
Usage: data = load_digits_data(); data = load_digits_data(hard=True)     # or --data digits / digits_hard
       python -m datasets.digits --export /tmp/digits-jpg --size 256     # the demo as an ImageFolder of JPEGs
       python -m datasets.digits --export /tmp/hard --hard              # a competition folder (CSV layout);
           its test labels go to /tmp/hard.answers.csv, beside the folder, not in it
       python -m datasets.digits --score runs/X/submission.csv --answers /tmp/hard.answers.csv
"""
import argparse
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from sklearn.datasets import load_digits
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split

from datasets.files import Data, read_csv, write_csv
from utils import UserError, report_error

SIZE = 64          # px, the demo's stored resolution (the training transform resizes to img_size)
TEST_FRACTION = 0.2
TEST_SEED = 2024   # fixed: the test split and its noise are the same for every run, like a leaderboard's

HARD_SIZE = 32     # px: small images, like the competition-like set this benchmark stands in for
HARD_CLASSES = [0, 1, 2, 3, 4, 6, 7, 8]  # 9 (a turned 6) and 5 (a mirrored 2) left out
HARD_TRAIN = [80, 64, 50, 40, 32, 26, 21, 17]  # training images per class, in a shuffled class order
HARD_TEST_PER_CLASS = 90                 # balanced test set: 720 images, 2.2x the 330 training images
HARD_SEED = 7


def demo_test_corruption() -> A.Compose:
    return A.Compose([
        A.Affine(rotate=(-15, 15), scale=(0.9, 1.1), p=0.8),
        A.RGBShift(r_shift_limit=50, g_shift_limit=50, b_shift_limit=50, p=0.7),
        A.GaussianBlur(blur_limit=(3, 7), p=0.6),
        A.GaussNoise(std_range=(0.05, 0.2), p=0.8),
    ], seed=TEST_SEED)


def hard_test_corruption() -> A.Compose:
    """The hard test set's corruption: every image turned by a random multiple of 90 degrees, the rest stacked
    at random, as in the document competition's test set."""
    return A.Compose([
        A.RandomRotate90(p=1.0),
        A.Affine(rotate=(-20, 20), scale=(0.9, 1.1), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.7),
        A.HorizontalFlip(p=0.5),
        A.RGBShift(r_shift_limit=60, g_shift_limit=60, b_shift_limit=60, p=0.6),
        A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.5),
        A.GaussianBlur(sigma_limit=(0.5, 1.5), p=0.4),
        A.GaussNoise(std_range=(0.05, 0.25), p=0.7),
        A.ImageCompression(quality_range=(30, 80), p=0.4),
    ], seed=HARD_SEED)


def _digit_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    gray = (digits.images * (255 / 16)).astype(np.uint8)  # pixel values 0..16 -> 0..255
    images = np.stack([cv2.resize(g, (size, size), interpolation=cv2.INTER_CUBIC) for g in gray])
    return np.repeat(images[..., None], 3, axis=-1), digits.target.astype(np.int64)  # N x size x size x 3, RGB


def load_digits_data(hard: bool = False) -> Data:
    if hard:
        return load_hard_data()
    images, labels = _digit_images(SIZE)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, stratify=labels, random_state=TEST_SEED)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    noise = demo_test_corruption()
    classes = [str(d) for d in range(10)]
    return Data(
        classes=classes, targets=list(range(10)),
        items=list(images[train_idx]), labels=labels[train_idx], ids=[f"digit-{i:04d}" for i in train_idx],
        test_items=[noise(image=images[i])["image"] for i in test_idx], test_labels=labels[test_idx],
        test_ids=[f"digit-{i:04d}" for i in test_idx],
    )


def load_hard_data() -> Data:
    """digits_hard (see the module docstring); the same images, split and noise on every call."""
    images, digit = _digit_images(HARD_SIZE)
    rng = np.random.default_rng(HARD_SEED)
    order = rng.permutation(len(HARD_CLASSES))  # which class gets which training count
    train_idx, test_idx = [], []
    for rank, c in enumerate(order):
        pool = rng.permutation(np.flatnonzero(digit == HARD_CLASSES[c]))
        n = HARD_TRAIN[rank]
        train_idx += list(pool[:n])
        test_idx += list(pool[n:n + HARD_TEST_PER_CLASS])
    train_idx, test_idx = np.sort(train_idx), rng.permutation(test_idx)  # test ids say nothing of the class
    label_of = {d: k for k, d in enumerate(HARD_CLASSES)}
    labels = np.array([label_of.get(d, -1) for d in digit], np.int64)  # -1: a left-out digit, never picked
    noise = hard_test_corruption()
    return Data(
        classes=[str(d) for d in HARD_CLASSES], targets=list(HARD_CLASSES),
        items=list(images[train_idx]), labels=labels[train_idx], ids=[f"tr_{i:04d}.png" for i in train_idx],
        test_items=[noise(image=images[i])["image"] for i in test_idx], test_labels=labels[test_idx],
        test_ids=[f"te_{n:04d}.png" for n in range(len(test_idx))],
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


def answers_path(folder: Path) -> Path:
    return Path(folder).with_name(Path(folder).name + ".answers.csv")


def export_hard(folder: Path) -> Path:
    """digits_hard as a competition folder: train.csv (ID,target) + train/*.png, sample_submission.csv + test/*.png
    (lossless PNG: the JPEG damage is in the pixels already). The test labels go to FOLDER.answers.csv beside it."""
    folder = Path(folder)
    data = load_hard_data()
    for split, items, ids in [("train", data.items, data.ids), ("test", data.test_items, data.test_ids)]:
        (folder / split).mkdir(parents=True, exist_ok=True)
        for image, sample_id in zip(items, ids):
            cv2.imwrite(str(folder / split / sample_id), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    write_csv(folder / "train.csv", ["ID", "target"], ([i, data.targets[y]] for i, y in zip(data.ids, data.labels)))
    write_csv(folder / "sample_submission.csv", ["ID", "target"], ([i, data.targets[0]] for i in data.test_ids))
    write_csv(answers_path(folder), ["ID", "target"],
              ([i, data.targets[y]] for i, y in zip(data.test_ids, data.test_labels)))
    return folder


def score(submission: Path, answers: Path) -> float:
    """Macro-F1 of a submission CSV (ID,target) against an answers CSV; every answer id must be predicted."""
    rows = {}
    for path in (submission, answers):
        try:
            header, table = read_csv(Path(path))
        except OSError as e:
            raise UserError(f"{path}: {e.strerror}") from None
        rows[path] = {r[header[0]]: r[header[-1]].strip() for r in table}
    truth, pred = rows[answers], rows[submission]
    missing = sorted(set(truth) - set(pred))
    if missing:
        raise UserError(f"{submission}: {len(missing)} test id(s) have no prediction, e.g. {missing[:3]}")
    return float(f1_score([truth[i] for i in truth], [pred[i] for i in truth], average="macro"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a digits demo as image files, or score a submission.")
    parser.add_argument("--export", help="folder to write (demo: train/<class>/*.jpg, test/<class>/*.jpg)")
    parser.add_argument("--hard", action="store_true", help="write digits_hard as a competition folder (CSV layout) "
                                                           "and its answers to FOLDER.answers.csv")
    parser.add_argument("--size", type=int, default=256, help="demo: side of each image in px")
    parser.add_argument("--score", help="a submission CSV to score (macro-F1) against --answers")
    parser.add_argument("--answers", help="the answers CSV written by --export DIR --hard")
    args = parser.parse_args()
    try:
        if args.score:
            if not args.answers:
                parser.error("--score needs --answers")
            print(f"macro-F1 {score(Path(args.score), Path(args.answers)):.4f}")
        elif args.export and args.hard:
            folder = export_hard(Path(args.export))
            print(f"wrote {folder} (test labels: {answers_path(folder)})")
        elif args.export:
            print(f"wrote {export(Path(args.export), args.size)}")
        else:
            parser.error("give --export DIR [--hard] or --score FILE --answers FILE")
    except UserError as e:
        raise SystemExit(report_error(e)) from None
