"""The decode caches' folder: which caches it holds, the locks that say a process uses one, and the bound they are
kept under together by evicting the least recently used (datasets/cache.py builds and maps one cache).
A reuse counts as a use (the .npy's mtime: atime is often off), and a cache some process holds is never deleted:
each holder keeps a shared flock on <key>.lock for as long as its images live, and eviction takes that lock
exclusively or skips the key. <key>.json records the image count and size for `python cache.py list`.
Usage: make_room(cache_dir, need_bytes, max_gb, "240 images at 32 px"); list_decode_caches(cache_dir, probe=True)
"""
import fcntl
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils import UserError

AUTO_MAX_GB = 50.0  # GB: the most that max_gb 0 (auto) allows, however much disk is free
KEY_FILE = re.compile(r"^\.?([0-9a-f]{24})\.")  # <key>.npy/.bad.json/.json/.lock, .<key>.tmp-<pid>.npy


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
        lock = take_lock(cache_dir, cache.key, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
    lock = take_lock(cache_dir, key, fcntl.LOCK_EX | fcntl.LOCK_NB)
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


def take_lock(cache_dir: Path, key: str, how: int):
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


class Hold:
    """An open <key>.lock with a shared flock on it, closed (the lock released) with the last image sequence
    that shares it."""

    def __init__(self, fh):
        self.fh = fh

    def __del__(self):
        self.fh.close()


@contextmanager
def dir_lock(cache_dir: Path):
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

