"""The back office of register.py: a data folder as a W&B dataset artifact (images or file:// references, the
label CSVs, a `samples` table), its fingerprint in the metadata, and the marker file later runs link by.

Usage: summary = register(args, run)   # args: register.py's flags; run: a tracking.Run
"""
import json
import os
import sys
import time
from pathlib import Path

from PIL import Image

from datasets import load_data, load_image
from utils import UserError
from utils.files import atomic_write_bytes
from workflows.lineage import MARKER_FILE, fingerprint, manifest

LABEL_FILES = ("train.csv", "meta.csv", "sample_submission.csv")


def image_size(path) -> tuple[int, int] | None:
    """(width, height) from the header; None for a file PIL cannot open."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
        return None


def decoded(path):
    """The image for its thumbnail (decoded on W&B's writer thread); None when only its header was readable."""
    try:
        return load_image(path)
    except Exception:  # noqa: BLE001 - a truncated file: PIL raises OSError, SyntaxError...
        return None


def register(args, run) -> dict:
    root = Path(args.path)
    if args.path == "digits":
        raise UserError("digits lives in scikit-learn, not in a folder: write it out first with "
                        "python -m datasets.digits --export DIR, then register DIR")
    if not root.is_dir():
        raise UserError(f"{args.path}: not a folder; pass a data folder as train.py's --data reads it")
    data = load_data(args.path, args.image_col, args.label_col, args.group_col)
    rows = manifest(data)
    fp = fingerprint(rows, data.classes)
    items = list(data.items) + list(data.test_items or [])
    missing = [str(p) for p, r in zip(items, rows) if r[2] < 0]
    if missing:
        raise UserError(f"{len(missing)} listed image(s) are missing, e.g. {missing[:3]}; fix the folder, "
                        f"then register it")
    files = [(p, Path(p).resolve().relative_to(root.resolve()).as_posix()) for p in items]
    files += [(root / f, f) for f in LABEL_FILES if (root / f).is_file()]
    total = sum(r[2] for r in rows)
    references = args.files == "reference" or (args.files == "auto" and total > args.max_copy_gb * 2**30)

    sizes = [image_size(p) for p in items]
    bad = [str(p) for p, wh in zip(items, sizes) if wh is None]
    if bad:
        print(f"warning: {len(bad)} image(s) cannot be read, e.g. {bad[:3]}; registered as they are (no thumbnail, no "
              f"size): replace them, or train with --skip_bad_images True", file=sys.stderr)
    table = [[i, (lambda p=p: decoded(p)) if k < args.thumbnails and wh else None, y, s, b, *(wh or (None, None))]
             for k, (p, wh, (s, i, b, y)) in enumerate(zip(items, sizes, rows))]
    metadata = {"fingerprint": fp, "classes": data.classes, "source": str(root.resolve()),
                "layout": "csv" if (root / "train.csv").is_file() else "imagefolder", "references": references}
    run.log_dataset(args.name, files, ["id", "image", "label", "split", "bytes", "width", "height"], table,
                    metadata, references, aliases=["latest", f"fp-{fp['digest']}"], description=args.description)
    project = args.project or os.environ.get("WANDB_PROJECT") or "sweepcls"
    entity = (run.entity if run.mode == "online" else "") or args.entity  # offline: the default entity at sync
    marker = {"name": args.name, "project": project, "entity": entity, "digest": fp["digest"],
              "registered": time.time(), "run_id": run.id}
    try:
        atomic_write_bytes(root / MARKER_FILE, json.dumps(marker, indent=1).encode())
    except UserError:  # a read-only data folder: the artifact is still logged; runs just are not linked by themselves
        print(f"note: could not write {root / MARKER_FILE}; runs on this folder will not link to the artifact by "
              f"themselves")
    print(f"registered {fp['train_images']} training and {fp['test_images']} test images ({total / 2**20:.1f} MiB, "
          f"{'checksummed references' if references else 'copied'}) as dataset artifact "
          f"{project}/{args.name}:fp-{fp['digest']}")
    return {"dataset/images": len(rows), "dataset/bytes": total, "dataset/digest": fp["digest"],
            "dataset/references": references, "dataset/unreadable": len(bad)}
