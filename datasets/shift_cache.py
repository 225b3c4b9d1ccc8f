"""The test set's measured shift (datasets/shift.py), kept as a small JSON per data set and img_size, so every sweep
trial and fold on the same data reads it instead of measuring again (300 + 300 images decoded, statistics and
a pose classifier: seconds on 2 cores, each time).

Usage:
    shift, key, source = measure_cached(data.items, data.test_items, img_size, native, cache_dir)
    # source: "cached", "measured" (now in CACHE_DIR/shift/<key>.json) or "not cached: WHY" (measured, not kept)

The measure is a pure function of what the key hashes: the training and the test images (files: path, size and
mtime; arrays: their bytes; a decode cache's .npy: its name, itself a hash of the files, and the rows taken),
img_size, the test images' native side, datasets.shift.VERSION and SEED, the source of the modules the measure
runs through and the versions of the libraries that compute it. So an edited image or an edit of the measure's
code measures again; a stale entry is never read, only left for `python cache.py clear --shift`. A cache folder
that cannot be written costs the measure, never the run.
"""
import hashlib
import json
import os
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import sklearn

from datasets import corruption, files, shift, transforms
from datasets.cache import default_cache_dir, hash_items
from utils import UserError, image_stats
from utils.files import atomic_write_bytes

SUBFOLDER = "shift"  # in the cache folder: no <key>.* name of its own there, so never read as a decode cache
CODE = (shift, corruption, transforms, image_stats, files)  # the measure, its corruptions, its statistics, the decoder
FIELDS = ("images", "gap", "poses", "settings")  # of a measure: a record without them is measured again


def _images_digest(items) -> str:
    h = hashlib.sha256(f"{len(items)}".encode())
    if getattr(items, "path", None) is not None:  # a --cache disk .npy: its name hashes the files, img_size, decoder
        index = items.index if items.index is not None else np.arange(len(items))
        h.update(f"|{Path(items.path).name}|".encode() + np.asarray(index, np.int64).tobytes())
    else:  # paths (stat only), arrays or a --cache ram array (bytes: ~1 GB/s)
        hash_items(h, items)
    return h.hexdigest()


def code_digest(modules=CODE) -> str:
    """The source of the modules the measure runs through, and the libraries' versions: an edit that forgets to
    raise shift.VERSION still measures again."""
    h = hashlib.sha256(f"{A.__version__}|{cv2.__version__}|{sklearn.__version__}|{np.__version__}".encode())
    for module in modules:
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


# read at import, just after the modules themselves: a file edited while this process runs (for hours) must not
# label the measure it makes with the code it loaded as the edited code's
CODE_DIGEST = code_digest()


def shift_key(train_items, test_items, img_size: int, native: int | None) -> str:
    parts = [shift.VERSION, shift.SEED, int(img_size), int(native or 0), CODE_DIGEST,
             _images_digest(train_items), _images_digest(test_items)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def measure_cached(train_items, test_items, img_size: int, native: int | None,
                   cache_dir: Path | str | None = None) -> tuple[dict, str, str]:
    """(shift.measure_data's result, its key, where it came from: "cached", "measured" (and written to
    CACHE_DIR/shift/<key>.json) or "not cached: WHY", measured but not kept (a folder that cannot be written))."""
    key = shift_key(train_items, test_items, img_size, native)
    path = Path(cache_dir or default_cache_dir()) / SUBFOLDER / f"{key}.json"
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and isinstance(record.get("shift"), dict) and set(FIELDS) <= set(record["shift"]):
            _touch(path)
            return record["shift"], key, "cached"
    except (OSError, ValueError):  # none yet, unreadable or torn: measured and written again
        pass
    measured = shift.measure_data(train_items, test_items, img_size, native)
    record = {"version": shift.VERSION, "img_size": img_size, "native": native,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "shift": measured}
    try:
        payload = json.dumps(record, allow_nan=False).encode()
    except (TypeError, ValueError) as e:  # a NaN or a numpy number would not read back as it was measured
        return measured, key, f"not cached: {e}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, payload)
    except OSError as e:
        return measured, key, f"not cached: {path.parent}: {e.strerror or e}"
    except UserError:  # atomic_write_bytes' message is about run outputs; the reason here is short
        return measured, key, f"not cached: {path.parent} cannot be written"
    return measured, key, "measured"


def _touch(path: Path) -> None:
    """A read counts as a use: `python cache.py clear --older_than` goes by the files' mtime."""
    try:
        os.utime(path)
    except OSError:  # another user's file in a shared folder
        pass
