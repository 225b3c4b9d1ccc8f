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
import re
import sys
from pathlib import Path

from utils import tracking
from utils.runs import new_run_id, runs_dir
from workflows.flags import HelpFormatter, add_config_flags
from workflows.register import register


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("path", help="a data folder as train.py's --data reads it (ImageFolder or train.csv layout)")
    parser.add_argument("--name", default="", help="artifact name; '' = the folder's name")
    parser.add_argument("--description", default="", help="the artifact's description in W&B")
    parser.add_argument("--files", default="auto", choices=("auto", "copy", "reference"),
                        help="copy the images into the artifact, or add checksummed file:// references (nothing "
                             "copied; the files must stay where they are); auto = references above --max_copy_gb")
    parser.add_argument("--max_copy_gb", type=float, default=2.0,
                        help="--files auto: folders up to this size are copied into the artifact, larger ones "
                             "referenced")
    parser.add_argument("--thumbnails", type=int, default=100_000,
                        help="images with a thumbnail in the table (the rest: none)")
    parser.add_argument("--out_dir", default="",
                        help="'' = $SWEEPCLS_RUNS_DIR/register-<run id>, by default runs/register-<run id>")
    add_config_flags(parser, "image_col", "label_col", "group_col", "wandb_mode", "project", "entity")
    args = parser.parse_args(argv)
    args.name = args.name or re.sub(r"[^\w.-]", "-", Path(args.path).resolve().name)
    run_id = new_run_id()
    out_dir = Path(args.out_dir or runs_dir() / f"register-{run_id}")
    run = tracking.init({k: v for k, v in vars(args).items() if k != "out_dir"}, run_id, out_dir, args.wandb_mode,
                        tracking.RunOptions(project=args.project, entity=args.entity, name=f"register-{args.name}",
                                            job_type="register-data"))
    code = run.run_to_end(lambda: run.set_summary(register(args, run)))
    if not code:  # the last lines, after W&B's footer
        print(f"results in {out_dir}/ (the artifact, staged with the run" + (": wandb sync it first)" if run.mode ==
              "offline" else ")") + f"\nnext: python train.py --data {args.path} (linked to this version)")
    return code


if __name__ == "__main__":
    sys.exit(main())
