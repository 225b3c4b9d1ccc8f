"""The cache folder as a whole: the decode caches (datasets/cache.py) and the subfolders other commands fill,
listed and cleared.

Usage:
    lines = listing(Path("~/.cache/sweepcls").expanduser(), max_gb=0)
    lines = clear(cache_dir, {"decode", "preds"}, older_than_days=30)
Subfolders: preds/ (predict.py, ensemble.py, eda.py --diff: predictions), artifacts/ (ensemble.py: model
artifacts), datasets/ (--data wandb:...: dataset artifacts), shift/ (train.py: the test set's measured shift,
datasets/shift_cache.py), weights/ (pretrained weights a user put there for --pretrained auto: listed, never
cleared). The decode caches are the <key>.* files directly in the folder; nothing in a subfolder is one.
"""
import shutil
import time
from pathlib import Path

from datasets.cache_folder import DecodeCache, clear_decode_caches, decode_bound, list_decode_caches, size_text

FOLDERS = {"preds": "predictions (predict.py, ensemble.py, eda.py --diff)",
           "artifacts": "downloaded model artifacts (ensemble.py)",
           "datasets": "downloaded dataset artifacts (--data wandb:...)",
           "shift": "test-set shift measures (--aug_preset auto, --val_noise auto)",
           "weights": "pretrained weights for --pretrained auto (never cleared)"}
CLEARABLE = ("decode", "preds", "artifacts", "datasets", "shift")  # what clear may delete: all but weights/


def _entries(folder: Path) -> list[tuple[Path, int, float]]:
    """(path, bytes, last written) of each entry directly in folder; a subfolder counts its files, newest one."""
    out = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        folder_entry = entry.is_dir() and not entry.is_symlink()
        files = [f for f in entry.rglob("*") if f.is_file()] if folder_entry else [entry]
        stats = [f.lstat() for f in files]
        out.append((entry, sum(s.st_size for s in stats), max((s.st_mtime for s in stats), default=0.0)))
    return out


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _decode_line(cache: DecodeCache) -> str:
    shape = (f"{cache.items:,} images x {cache.img_size} px" if cache.items is not None
             else "images x size unknown")
    if cache.state == "partial":
        return (f"  {cache.key}  {'a build running' if cache.in_use else 'a build that died'}, "
                f"{size_text(cache.bytes)}")
    return (f"  {cache.key}  {shape:<24} {size_text(cache.bytes):>9}  last used {_when(cache.last_used)}"
            f"{'  in use' if cache.in_use else ''}")


def listing(cache_dir: Path, max_gb: float = 0.0) -> list[str]:
    """The lines `python cache.py list` prints: each decode cache (key, images x size, size, last use, whether a
    running process holds it), each subfolder's total, the whole and the decode caches' bound."""
    caches = [c for c in list_decode_caches(cache_dir, probe=True) if c.state != "leftover"]
    decode_bytes = sum(c.bytes for c in caches)
    bound, how = decode_bound(cache_dir, max_gb)
    lines = [f"{cache_dir}", f"decode caches (--cache disk), least recently used first: {len(caches)}, "
                              f"{size_text(decode_bytes)}", *[_decode_line(c) for c in caches],
             f"their bound: {size_text(bound)} ({how})"]
    total = decode_bytes
    for name, what in FOLDERS.items():
        if not (cache_dir / name).is_dir():
            continue
        entries = _entries(cache_dir / name)
        size = sum(e[1] for e in entries)
        total += size
        lines.append(f"{name + '/':<11} {len(entries):>5} entries {size_text(size):>9}  {what}")
    lines.append(f"total {size_text(total)}")
    return lines


def clear(cache_dir: Path, what: set[str], older_than_days: float | None = None) -> list[str]:
    """Delete the decode caches and the entries of the subfolders named in `what` (of CLEARABLE), those last
    used (decode caches; shift/, whose reads touch its files) or written (the rest) more than older_than_days ago
    when given; decode caches a running process holds are kept. Returns the lines saying what was freed and what
    was kept."""
    before = None if older_than_days is None else time.time() - older_than_days * 86400
    lines, freed = [], 0
    if "decode" in what:
        deleted, held = clear_decode_caches(cache_dir, before)
        deleted = [c for c in deleted if c.state != "leftover"]
        freed += sum(c.bytes for c in deleted)
        lines.append(f"decode caches: deleted {len(deleted)}, {size_text(sum(c.bytes for c in deleted))}")
        if held := [c for c in held if c.state != "leftover"]:
            lines.append(f"decode caches: kept {len(held)} in use by a running process "
                         f"({size_text(sum(c.bytes for c in held))}): {', '.join(c.key for c in held)}")
    for name in (n for n in CLEARABLE if n in what and n != "decode"):
        gone = [(path, size) for path, size, written in _entries(cache_dir / name)
                if before is None or written < before]
        for path, _ in gone:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        freed += sum(size for _, size in gone)
        lines.append(f"{name}/: deleted {len(gone)} entries, {size_text(sum(size for _, size in gone))}")
    lines.append(f"freed {size_text(freed)} in {cache_dir}")
    return lines
