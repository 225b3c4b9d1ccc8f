"""Decode and resize every image once: one uint8 N x S x S x 3 array per (image list, img_size).

Usage:
    images, bad = cache_images(data.items, img_size=224, mode="disk", cache_dir=default_cache_dir())
    image = images[7]                  # HxWx3 uint8, already img_size x img_size
    train_images = images[train_idx]   # a view, still a CachedImages (cheap to hand to loader workers)

Every augmentation pipeline starts with a resize to img_size x img_size (datasets/transforms.py),
so resizing here with that same operation yields the same pixels the pipeline would have made: the
cache changes the speed, not the batches. "ram" holds the array in this process (loader workers
share it through fork). "disk" writes CACHE_DIR/<key>.npy and maps it read-only; the key hashes the
image size and each file's path, size and mtime, so every sweep trial and fold with the same data
and img_size reuses one decode, and an edited image is decoded again. Images that cannot be decoded
are listed with the reason (also kept beside the .npy, so a reuse reports them without decoding).

The decode caches of one folder are bounded together (max_gb, --cache_max_gb): building a new one first
deletes the least recently used others that no process holds (datasets/cache_folder.py). A CachedImages (or
a view of it) holds its cache's lock for as long as it lives.
"""
import fcntl
import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import albumentations as A
import numpy as np

from datasets.cache_folder import Hold, dir_lock, make_room, take_lock
from datasets.files import decode_failure, load_image
from utils import cores
from utils.stop import check_stop, stop_requested

FORMAT = "sweepcls-cache/2"  # 2: 16-bit, 32-bit and float images rescaled by their range, not clipped
HEADER_BYTES = 128  # the .npy header in front of the pixels (numpy pads it to a multiple of 64 bytes)


def default_cache_dir() -> Path:
    return Path(os.environ.get("SWEEPCLS_CACHE_DIR") or Path.home() / ".cache" / "sweepcls")


class CachedImages:
    """A read-only sequence of HxWx3 uint8 images backed by one array in RAM or one .npy on disk.
    Pickles as the file path (disk) so spawned loader workers map the file instead of copying it.
    hold: the open <key>.lock with a shared flock on it, shared by every view (forked workers inherit it):
    the cache is not evicted while any of them lives."""

    def __init__(self, array: np.ndarray | None = None, path: Path | None = None, index: np.ndarray | None = None,
                 hold=None):
        self._array, self.path = array, path
        self.index = index
        self._hold = hold

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else len(self.array)

    def __getitem__(self, key):
        if isinstance(key, (list, np.ndarray, range)):  # a subset: a view on the same storage
            key = np.asarray(key, dtype=np.int64)
            return CachedImages(self._array, self.path, key if self.index is None else self.index[key], self._hold)
        row = int(self.index[key]) if self.index is not None else int(key)
        return self.array[row]

    def take(self, idx) -> "CachedImages":
        return self[idx]

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.path is not None:
            state["_array"] = None
        state["_hold"] = None  # an open file does not pickle; the process that made this holds the lock
        return state


class JoinedImages:
    """Two image sequences read as one: the training images, then the pseudo-labelled test images."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, key):
        return self.first[key] if key < len(self.first) else self.second[key - len(self.first)]


def hash_items(h, items) -> None:
    """Feed a list of images to the hash h: array bytes, or each file's absolute path, size and mtime, so an
    edited file changes the digest (a missing one too, once it is there)."""
    for item in items:
        if isinstance(item, np.ndarray):
            h.update(item.tobytes())
        else:
            try:
                st = os.stat(item)
                h.update(f"|{os.path.abspath(item)}|{st.st_size}|{st.st_mtime_ns}".encode())
            except OSError:  # missing: its reader reports it
                h.update(f"|{os.path.abspath(item)}|missing".encode())


def _key(items, img_size: int) -> str:
    h = hashlib.sha256(f"{FORMAT}|{img_size}|{A.__version__}".encode())
    hash_items(h, items)
    return h.hexdigest()[:24]


def cache_images(items: list, img_size: int, mode: str, cache_dir: Path | None = None,
                 decode=None, max_gb: float = 0.0) -> tuple[CachedImages, dict[int, str]]:
    """(the images at img_size x img_size, {index: why} for those that could not be decoded: zeros there).
    mode "ram" or "disk"; decode(item) -> HxWx3 uint8 (datasets.load_image); max_gb: the bound of all decode
    caches in cache_dir together, 0 = auto (decode_bound)."""
    decode = decode or load_image
    if mode == "ram" or all(isinstance(i, np.ndarray) for i in items):  # in-memory data: nothing to save
        array = np.zeros((len(items), img_size, img_size, 3), np.uint8)
        return CachedImages(array), _fill(array, items, img_size, decode)
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _key(items, img_size)
    path, bad_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.bad.json"
    while True:
        hold = take_lock(cache_dir, key, fcntl.LOCK_SH)  # kept while the images are in use: no eviction meanwhile
        if path.is_file():
            break
        hold.close()
        with take_lock(cache_dir, key, fcntl.LOCK_EX):  # two trials starting together: the second waits, then maps
            if not path.is_file():
                _build(cache_dir, key, items, img_size, decode, max_gb)
        # loop: take the shared lock again (should an eviction come in between, it is built again)
    try:
        os.utime(path)  # this use, for least-recently-used eviction
    except OSError:  # another user's file in a shared folder: its recency stays as it was
        pass
    bad = {int(i): why for i, why in json.loads(bad_path.read_text()).items()} if bad_path.is_file() else {}
    return CachedImages(path=path, hold=Hold(hold)), bad


def _build(cache_dir: Path, key: str, items: list, img_size: int, decode, max_gb: float) -> None:
    """Decode items into <key>.npy, .bad.json and .json, after making room under the bound. The caller holds
    <key>.lock exclusively; a build that fails or is stopped leaves no temporary file behind."""
    shape = (len(items), img_size, img_size, 3)
    for stale in cache_dir.glob(f".{key}.tmp-*.npy"):  # a build of this key that died: redone now
        stale.unlink(missing_ok=True)
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}.npy"
    with dir_lock(cache_dir):  # room made and the file claimed at once: two builds never count the same space
        make_room(cache_dir, HEADER_BYTES + math.prod(shape), max_gb, f"{len(items)} images at {img_size} px")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    try:
        bad = _fill(array, items, img_size, decode)
        array.flush()
        del array
        (cache_dir / f"{key}.bad.json").write_text(json.dumps({str(i): why for i, why in bad.items()}))
        (cache_dir / f"{key}.json").write_text(json.dumps({"items": len(items), "img_size": img_size,
                                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        os.replace(tmp, cache_dir / f"{key}.npy")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fill(array: np.ndarray, items: list, img_size: int, decode) -> dict[int, str]:
    """A stop (utils/stop.py) leaves the images not yet decoded and raises Stopped once the threads are done: the
    caller must not keep a half-filled array."""
    resize = A.Resize(img_size, img_size)  # the first op of every transform pipeline, same interpolation

    def one(i):
        if stop_requested():
            return None
        try:
            array[i] = resize(image=decode(items[i]))["image"]
            return None
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            return decode_failure(e)

    with ThreadPoolExecutor(max(2, cores())) as pool:  # PIL and OpenCV release the GIL while decoding and resizing
        reasons = list(pool.map(one, range(len(items))))
    check_stop("decoding images")
    return {i: why for i, why in enumerate(reasons) if why}
