"""Files written whole or not at all: a reader (a live sweep runner, a resumed run) never sees half a file.

Usage: atomic_write_bytes(out_dir / "summary.json", json.dumps(summary).encode())
"""
import os
from pathlib import Path

from utils import UserError


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:  # disk full, quota, read-only: the old file is whole, say so
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({len(payload) / 2**20:.1f} MiB): {e.strerror or e}; the files "
                        f"already there are intact. Free space (or lower --keep_top_k) and resume with the same "
                        f"command") from None
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
