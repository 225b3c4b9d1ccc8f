"""Register a data folder as a W&B dataset artifact, so runs trained on it link to it in W&B's lineage graph.

Usage:
    python register.py /data/comp --name comp-train                 # files copied into the artifact
    python register.py /data/comp --name comp-train --files reference   # large data: checksummed file:// refs
Then train with --data /data/comp (linked to this version while its images and labels are unchanged), or
anywhere online with --data wandb:ENTITY/PROJECT/comp-train:latest (downloaded first).

The artifact holds the images under their paths in the folder, the label CSVs (train.csv, meta.csv,
sample_submission.csv), and a table `samples` of every image: id, thumbnail, label, split, bytes, size.
Its metadata and its alias fp-<digest> carry the data fingerprint train.py records (workflows/lineage.py),
and PATH/.sweepcls-dataset.json remembers the registration for later runs. Offline, the artifact is
staged with the run under runs/register-<id>/; `wandb sync` it like any run.
"""
import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from PIL import Image

from datasets import load_data, load_image
from utils import UserError, tracking
from utils.files import atomic_write_bytes
from utils.runs import new_run_id
from workflows.config import HelpFormatter, add_config_flags
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("path", help="a data folder as train.py's --data reads it (ImageFolder or train.csv layout)")
    parser.add_argument("--name", default="", help="artifact name; '' = the folder's name")
    parser.add_argument("--description", default="")
    parser.add_argument("--files", default="auto", choices=("auto", "copy", "reference"),
                        help="copy the images into the artifact, or add checksummed file:// references (nothing "
                             "copied; the files must stay where they are); auto = references above --max_copy_gb")
    parser.add_argument("--max_copy_gb", type=float, default=2.0)
    parser.add_argument("--thumbnails", type=int, default=100_000,
                        help="images with a thumbnail in the table (the rest: none)")
    parser.add_argument("--out_dir", default="", help="'' = runs/register-<run id>")
    add_config_flags(parser, "image_col", "label_col", "group_col", "wandb_mode", "project", "entity")
    args = parser.parse_args(argv)
    args.name = args.name or re.sub(r"[^\w.-]", "-", Path(args.path).resolve().name)
    run_id = new_run_id()
    out_dir = Path(args.out_dir or Path("runs") / f"register-{run_id}")
    run = tracking.init({k: v for k, v in vars(args).items() if k != "out_dir"}, run_id, out_dir, args.wandb_mode,
                        project=args.project, entity=args.entity, name=f"register-{args.name}",
                        job_type="register-data")
    return run.run_to_end(lambda: run.set_summary(register(args, run)))


if __name__ == "__main__":
    sys.exit(main())
