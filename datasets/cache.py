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
deletes the least recently used others. A reuse counts as a use (the .npy's mtime: atime is often off),
and a cache some process holds is never deleted: each holder keeps a shared flock on <key>.lock for as
long as its CachedImages (or a view of it) lives, and eviction takes that lock exclusively or skips the
key. <key>.json records the image count and size for `python cache.py list`.
"""
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np

from datasets.files import decode_failure, load_image
from utils import UserError, cores
from utils.stop import check_stop, stop_requested

FORMAT = "sweepcls-cache/2"  # 2: 16-bit, 32-bit and float images rescaled by their range, not clipped
AUTO_MAX_GB = 50.0  # GB: the most that max_gb 0 (auto) allows, however much disk is free
HEADER_BYTES = 128  # the .npy header in front of the pixels (numpy pads it to a multiple of 64 bytes)
KEY_FILE = re.compile(r"^\.?([0-9a-f]{24})\.")  # <key>.npy/.bad.json/.json/.lock, .<key>.tmp-<pid>.npy


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
        hold = _lock(cache_dir, key, fcntl.LOCK_SH)  # kept while the images are in use: no eviction meanwhile
        if path.is_file():
            break
        hold.close()
        with _lock(cache_dir, key, fcntl.LOCK_EX):  # two trials starting together: the second waits, then maps
            if not path.is_file():
                _build(cache_dir, key, items, img_size, decode, max_gb)
        # loop: take the shared lock again (should an eviction come in between, it is built again)
    try:
        os.utime(path)  # this use, for least-recently-used eviction
    except OSError:  # another user's file in a shared folder: its recency stays as it was
        pass
    bad = {int(i): why for i, why in json.loads(bad_path.read_text()).items()} if bad_path.is_file() else {}
    return CachedImages(path=path, hold=_Hold(hold)), bad


def _build(cache_dir: Path, key: str, items: list, img_size: int, decode, max_gb: float) -> None:
    """Decode items into <key>.npy, .bad.json and .json, after making room under the bound. The caller holds
    <key>.lock exclusively; a build that fails or is stopped leaves no temporary file behind."""
    shape = (len(items), img_size, img_size, 3)
    for stale in cache_dir.glob(f".{key}.tmp-*.npy"):  # a build of this key that died: redone now
        stale.unlink(missing_ok=True)
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}.npy"
    with _dir_lock(cache_dir):  # room made and the file claimed at once: two builds never count the same space
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


@dataclass
class DecodeCache:
    """One key's files in a cache folder. state: ready (<key>.npy there), partial (only a temporary .npy: a
    build running, or one that died), leftover (only small sidecar files). in_use: None unless probed."""
    key: str
    bytes: int
    last_used: float  # s since the epoch: the .npy's mtime; 0 without one (evicted before any other)
    items: int | None
    img_size: int | None
    state: str
    in_use: bool | None = None


def list_decode_caches(cache_dir: Path, probe: bool = False) -> list[DecodeCache]:
    """The decode caches directly in cache_dir (its subfolders are not theirs), least recently used first.
    probe: also find which ones a process holds (in_use), by trying their lock."""
    names: dict[str, list[str]] = {}
    with os.scandir(cache_dir) as entries:
        for entry in entries:
            if (match := KEY_FILE.match(entry.name)) and entry.is_file(follow_symlinks=False):
                names.setdefault(match.group(1), []).append(entry.name)
    caches = [_describe(cache_dir, key, files) for key, files in names.items()]
    for cache in caches if probe else ():
        lock = _lock(cache_dir, cache.key, fcntl.LOCK_EX | fcntl.LOCK_NB)
        cache.in_use = lock is None
        if lock is not None:
            lock.close()
    return sorted(caches, key=lambda c: c.last_used)


def _describe(cache_dir: Path, key: str, files: list[str]) -> DecodeCache:
    stats = {}
    for name in files:
        try:
            stats[name] = (cache_dir / name).stat()
        except OSError:  # deleted meanwhile
            pass
    npy = stats.get(f"{key}.npy")
    state = "ready" if npy else "partial" if any(n.startswith(".") for n in stats) else "leftover"
    items, img_size = _shape(cache_dir, key) if npy else (None, None)
    return DecodeCache(key, sum(s.st_size for s in stats.values()), npy.st_mtime if npy else 0.0, items, img_size,
                       state)


def _shape(cache_dir: Path, key: str) -> tuple[int | None, int | None]:
    """(images, img_size) from <key>.json, or from the .npy's header for a cache made before that record."""
    try:
        record = json.loads((cache_dir / f"{key}.json").read_text())
        return int(record["items"]), int(record["img_size"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        shape = np.load(cache_dir / f"{key}.npy", mmap_mode="r").shape
        return int(shape[0]), int(shape[1])
    except (OSError, ValueError, IndexError):
        return None, None


def decode_bound(cache_dir: Path, max_gb: float = 0.0) -> tuple[int, str]:
    """(the most bytes the decode caches in cache_dir may hold together, where that figure comes from): max_gb
    GB, or for 0 (auto) the smaller of AUTO_MAX_GB and half of what they could reach, the disk's free space
    plus what they hold; that half does not move as they grow (a build takes from the one what it adds to the
    other), so the caches never take more than half of the disk they found."""
    if max_gb > 0:
        return int(max_gb * 1e9), f"--cache_max_gb {max_gb:g}"
    held = sum(c.bytes for c in list_decode_caches(cache_dir))
    half = (shutil.disk_usage(cache_dir).free + held) // 2
    return min(int(AUTO_MAX_GB * 1e9), half), (f"--cache_max_gb 0 = auto: the smaller of {AUTO_MAX_GB:g} GB and "
                                               f"half of the free disk plus the decode caches")


def make_room(cache_dir: Path, need: int, max_gb: float, what: str) -> None:
    """Delete the least recently used decode caches that no process holds until `need` more bytes fit under
    the bound, saying so in one line. One data set over the bound alone, or over the free disk, is a
    UserError. what: the data set, for the messages."""
    bound, how = decode_bound(cache_dir, max_gb)
    if need > bound:
        raise UserError(f"--cache disk: {what} need {size_text(need)} in {cache_dir}, over the decode caches' "
                        f"bound of {size_text(bound)} ({how}); pass --cache_max_gb {math.ceil(need / 1e8) / 10:g} "
                        f"or more, --cache ram (the same {size_text(need)} in memory) or --cache none (decode the "
                        f"images at every epoch)")
    caches = list_decode_caches(cache_dir)
    over = sum(c.bytes for c in caches) + need - bound
    evicted = []
    for cache in caches:  # least recently used first, builds that died before any
        if over <= 0:
            break
        if cache.state != "leftover" and evict_decode_cache(cache_dir, cache.key):
            evicted.append(cache)
            over -= cache.bytes
    if evicted:
        print(f"cache: evicted {len(evicted)} least recently used decode cache(s) from {cache_dir}, "
              f"{size_text(sum(c.bytes for c in evicted))} freed, to keep them under {size_text(bound)} ({how})")
    if over > 0:
        print(f"note: the decode caches in {cache_dir} go {size_text(over)} over their bound of {size_text(bound)}: "
              f"the others are in use by running processes (python cache.py list)")
    free = shutil.disk_usage(cache_dir).free
    if need > free:
        raise UserError(f"--cache disk: {what} need {size_text(need)} but {cache_dir} has {size_text(free)} free; "
                        f"free some space (python cache.py clear --all), put the cache on a larger disk "
                        f"(--cache_dir), or pass --cache ram or --cache none")


def evict_decode_cache(cache_dir: Path, key: str) -> bool:
    """Delete one key's files, unless a process holds its lock (then False). A process that mapped the .npy
    before keeps reading it: Linux frees the blocks when the last mapping goes."""
    lock = _lock(cache_dir, key, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if lock is None:
        return False
    with lock:
        try:
            for path in [cache_dir / f"{key}.npy", *cache_dir.glob(f".{key}.tmp-*.npy"), cache_dir / f"{key}.bad.json",
                         cache_dir / f"{key}.json", cache_dir / f"{key}.lock"]:  # the lock last, still held
                path.unlink(missing_ok=True)
        except OSError:  # another user's files in a shared folder
            return False
    return True


def clear_decode_caches(cache_dir: Path, before: float | None = None) -> tuple[list[DecodeCache], list[DecodeCache]]:
    """Delete the decode caches last used before `before` (s since the epoch; None = all), builds that died
    and leftover sidecars among them: (deleted, skipped because a process holds them)."""
    deleted, held = [], []
    for cache in list_decode_caches(cache_dir):
        if before is None or cache.last_used < before:
            (deleted if evict_decode_cache(cache_dir, cache.key) else held).append(cache)
    return deleted, held


def _lock(cache_dir: Path, key: str, how: int):
    """<key>.lock, opened and flocked (how: fcntl.LOCK_SH or LOCK_EX, | LOCK_NB to get None when it is taken).
    An eviction deletes the file it locked, so whoever then locks that deleted file tries again on the new one."""
    path = cache_dir / f"{key}.lock"
    while True:
        fh = open(path, "a")  # "a": created when missing, never truncated
        try:
            fcntl.flock(fh, how)
            same = os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
        except BlockingIOError:
            fh.close()
            return None
        except FileNotFoundError:
            same = False
        if same:
            return fh
        fh.close()


class _Hold:
    """An open <key>.lock with a shared flock on it, closed (the lock released) with the last image sequence
    that shares it."""

    def __init__(self, fh):
        self.fh = fh

    def __del__(self):
        self.fh.close()


@contextmanager
def _dir_lock(cache_dir: Path):
    """The folder's .evict.lock, held while one build makes room and claims it."""
    with open(cache_dir / ".evict.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def size_text(n: float) -> str:
    """Bytes as people read them, in powers of 1000 as --cache_max_gb: 1.23 GB, 750 MB, 12.3 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if abs(n) < 1000 * scale else f"{n / scale:,.0f} {unit}"
    return f"{int(n)} B"
