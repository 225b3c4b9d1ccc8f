"""What a data folder holds, read and written: the Data record, images (any mode to HxWx3 uint8), CSV files.

Usage: image = load_image("train/a.png"); header, rows = read_csv(path); write_csv(path, header, rows);
       side = native_side(items)  # the median stored side, from the file headers
The rest of datasets/ (readers, the cache, the demo data, pseudo-labels) builds on this module.
"""
import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from utils.files import atomic_write_bytes

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def take(items, idx):
    """items[idx] for a list of paths/arrays, or a sequence with its own take (a CachedImages: a view)."""
    return items.take(idx) if hasattr(items, "take") else [items[i] for i in idx]


@dataclass
class Data:
    classes: list[str]              # class names; the index is the model's output index
    targets: list                   # per class index, the label as the submission writes it (CSV int/name)
    items: list                     # training images: file paths or HxWx3 uint8 arrays
    labels: np.ndarray              # int64 class index per item
    ids: list[str]                  # sample id per item (CSV ID, relative path, digits index)
    groups: np.ndarray | None = None
    test_items: list | None = None
    test_ids: list[str] | None = None
    test_labels: np.ndarray | None = None  # known only for the digits demo and labelled test folders
    submission_columns: tuple[str, str] = ("ID", "target")
    submission_template: tuple[list, list] | None = None  # sample_submission.csv's (header, rows): columns kept
    given_val: np.ndarray | None = None  # bool per item: the data's own validation split (an ImageFolder's val/)

    def drop(self, rows) -> None:
        """Remove these training rows (indices) from items, ids, labels and groups alike."""
        keep = np.setdiff1d(np.arange(len(self.labels)), sorted(rows))
        self.items, self.ids, self.labels = take(self.items, keep), [self.ids[i] for i in keep], self.labels[keep]
        self.groups = self.groups[keep] if self.groups is not None else None
        self.given_val = self.given_val[keep] if self.given_val is not None else None


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL's 16-bit, 32-bit integer and float grayscale


def load_image(item) -> np.ndarray:
    """An HxWx3 uint8 RGB array from a path or an array (grayscale, RGBA, palette, CMYK become RGB). A 16-bit,
    32-bit or float grayscale image is rescaled from its own range (min to max) to 0-255: PIL's convert("RGB")
    would clip every value above 255 (a 12-bit X-ray, a depth map) to white."""
    if isinstance(item, np.ndarray):
        return item
    with Image.open(item) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode not in WIDE_MODES:
            return np.asarray(img.convert("RGB"))
        values = np.asarray(img, dtype=np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    scaled = (values - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(values)
    gray = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0).clip(0, 255).round().astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def unreadable(item) -> str | None:
    """Why an image file cannot be decoded, or None. JPEGs decode at reduced scale: every byte is still read."""
    if isinstance(item, np.ndarray):
        return None
    try:
        with Image.open(item) as img:
            img.draft("RGB", (64, 64))
            img.load()
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return decode_failure(e)


def decode_failure(e: Exception) -> str:
    """Why an image could not be read, as listed to the user: 'missing', or the exception in one line."""
    return "missing" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def write_csv(path: Path, header, rows) -> None:
    """A CSV file written atomically: a reader sees the old file or the whole new one."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(Path(path), text.getvalue().encode())


def native_side(items: list, n: int = 50) -> int:
    """Median side (the larger of width and height) of up to n images, read from the file headers alone; 0 when
    none can be read."""
    sides = []
    for item in items[:: max(1, len(items) // n)][:n]:
        if isinstance(item, np.ndarray):
            sides.append(max(item.shape[:2]))
            continue
        try:
            with Image.open(item) as img:
                sides.append(max(img.size))
        except Exception:  # noqa: BLE001 - an unreadable file is reported by name when the images are screened
            continue
    return int(np.median(sides)) if sides else 0
