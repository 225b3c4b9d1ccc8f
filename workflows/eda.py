"""Per-image facts for exploratory analysis: size, appearance statistics and a perceptual hash, and
the near-duplicate pairs among them. eda.py turns them into a W&B run.

Usage:
    records = describe(data)                         # one dict per train and test image
    pairs = near_duplicates(np.array([r["hash"] for r in records], np.uint64), max_distance=4)
"""
from concurrent.futures import ThreadPoolExecutor

import cv2
import imagehash
import numpy as np
from PIL import Image

from datasets import load_image
from utils import cores
from utils.image_stats import dominant_orientation, noise_sigma, sharpness

STATS = ("brightness", "contrast", "noise", "sharpness", "orientation", "landscape")
def image_record(item, side: int = 128) -> dict:
    """Size, brightness and contrast (mean and std of grey, 0-255), noise (Immerkaer), sharpness
    (variance of the Laplacian), orientation (dominant gradient direction off the axes), landscape (1 when wider
    than tall), computed at most `side` px; and a 64-bit perceptual hash."""
    image = load_image(item)
    h, w = image.shape[:2]
    scale = side / max(h, w)
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA) \
        if scale < 1 else image
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    bits = imagehash.phash(Image.fromarray(small)).hash.flatten()
    return {"width": w, "height": h, "aspect": w / h, "brightness": float(gray.mean()), "contrast": float(gray.std()),
            "noise": noise_sigma(gray), "sharpness": sharpness(gray),
            "orientation": dominant_orientation(gray), "landscape": float(w > h),
            "hash": int(np.packbits(bits).view(">u8")[0])}


def describe(data) -> list[dict]:
    """One record per training image (split "train", with its class) and test image (split "test")."""
    entries = [("train", i, data.ids[i], data.items[i], data.classes[data.labels[i]]) for i in range(len(data.items))]
    test_labels = data.test_labels
    entries += [("test", i, data.test_ids[i], item, data.classes[test_labels[i]] if test_labels is not None else "")
                for i, item in enumerate(data.test_items or [])]
    with ThreadPoolExecutor(max(2, cores())) as pool:
        facts = list(pool.map(lambda e: image_record(e[3]), entries))
    return [{"split": split, "index": i, "id": sample_id, "label": label, **f}
            for (split, i, sample_id, _, label), f in zip(entries, facts)]


def near_duplicates(hashes: np.ndarray, max_distance: int = 4, chunk: int = 256) -> list[tuple[int, int, int]]:
    """(i, j, Hamming distance) for i < j whose 64-bit hashes differ in at most max_distance bits."""
    hashes = np.asarray(hashes, np.uint64)
    pairs = []
    for start in range(0, len(hashes), chunk):
        block = hashes[start:start + chunk, None] ^ hashes[None, :]
        distance = np.unpackbits(block.view(np.uint8), axis=1).reshape(len(block), len(hashes), 64).sum(-1)
        for a, b in zip(*np.nonzero(distance <= max_distance)):
            i = start + a
            if i < b:
                pairs.append((int(i), int(b), int(distance[a, b])))
    return sorted(pairs, key=lambda p: (p[2], p[0], p[1]))


def split_gap(records: list[dict]) -> list[dict]:
    """Per statistic: train and test mean and std, and the test-minus-train gap in train standard deviations."""
    rows = []
    for stat in STATS:
        train = np.array([r[stat] for r in records if r["split"] == "train"])
        test = np.array([r[stat] for r in records if r["split"] == "test"])
        if not len(train) or not len(test):
            continue
        rows.append({"stat": stat, "train_mean": float(train.mean()), "train_std": float(train.std()),
                     "test_mean": float(test.mean()), "test_std": float(test.std()),
                     "gap_in_train_std": float((test.mean() - train.mean()) / (train.std() or 1.0))})
    return rows
